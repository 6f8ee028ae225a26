"""The embedded local stack: S3 (SeaweedFS), MLflow and a Ray head on 127.0.0.1, as one unit.

Started in dependency order (MLflow stores artifacts in S3; Ray workers need both addresses in
their environment), stopped in reverse. The CLI leaves the servers running in their own process
sessions and records PIDs in a state file, so `down` can stop exactly these processes later:

    python -m cluster.local.stack up [--dir .local-stack]     # prints `export ...` lines
    python -m cluster.local.stack status [--dir .local-stack]
    python -m cluster.local.stack down [--dir .local-stack]

The state directory is private (0700; one owned by another user, or a symlink, is refused) and
its state.json and env.sh (0600) hold every credential a client needs: the S3 keys, the MLflow
admin user and password, the Ray token's path. `eval "$(python -m cluster.local.stack up)"`
exports them into a shell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.local.common import NO_TELEMETRY_ENV
from cluster.local.mlflow_server import MlflowServer, start_mlflow
from cluster.local.ray_head import (
    MAX_TEMP_DIR_CHARS,
    RayHead,
    process_start_ticks,
    session_members,
    start_ray_head,
    stop_session,
)
from cluster.local.s3 import S3Server, remove_grpc_sockets, start_s3
from vl.private import UnsafePathError, private_dir, write_private

BUCKETS = ["vl-data", "vl-runs", "mlflow"]
STATE_FILE = "state.json"
ENV_FILE = "env.sh"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ray_temp_dir(root: Path) -> Path:
    """`root/ray` when short enough for Ray's socket paths, else a stable short path in /tmp
    named after this user and `root`. The Ray head creates it private and refuses one that
    another user (or a symlink) holds (`ray_head._prepare_temp_dir`)."""
    candidate = root.resolve() / "ray"
    if len(str(candidate)) <= MAX_TEMP_DIR_CHARS:
        return candidate
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"vl-ray-{os.geteuid()}-{digest}"


@dataclass
class LocalStack:
    """The three running services. Use `LocalStack.start(...)`, then `env()` and `stop()`."""

    root: Path
    s3: S3Server
    mlflow: MlflowServer
    ray: RayHead

    @classmethod
    def start(
        cls,
        root: Path,
        num_cpus: int = 2,
        progress: Callable[[str], None] = _stderr,
        s3_keys: tuple[str, str] | None = None,
    ) -> LocalStack:
        """Bring up S3, then MLflow (artifacts to S3), then Ray (workers see both).

        If a later service fails, the ones already up are stopped before the error propagates.
        `root` is made private (0700); one owned by another user, or a symlink, is refused.
        """
        root = private_dir(Path(root).absolute())
        started: list[S3Server | MlflowServer | RayHead] = []
        try:
            t0 = time.monotonic()
            progress("starting S3 (SeaweedFS) ...")
            access, secret = s3_keys or (None, None)
            s3 = start_s3(root / "s3", BUCKETS, access_key=access, secret_key=secret)
            started.append(s3)
            progress(f"  S3 up at {s3.endpoint} ({time.monotonic() - t0:.1f} s)")
            # MLflow's port is fixed at launch, so Ray (whose workers need the tracking URI)
            # can start while MLflow is still migrating its database: ~half the cold start.
            t1 = time.monotonic()
            progress("starting MLflow server and Ray head ...")
            mlflow = start_mlflow(root / "mlflow", s3, wait=False)
            started.append(mlflow)
            worker_env = {**s3.env(), **mlflow.env()}
            ray = start_ray_head(ray_temp_dir(root), num_cpus=num_cpus, env=worker_env, wait=False)
            started.append(ray)
            mlflow.wait_ready()
            progress(f"  MLflow up at {mlflow.uri} ({time.monotonic() - t1:.1f} s)")
            ray.wait_ready()
            progress(f"  Ray up, dashboard {ray.dashboard_url} ({time.monotonic() - t1:.1f} s)")
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
        return cls(root=root, s3=s3, mlflow=mlflow, ray=ray)

    def env(self) -> dict[str, str]:
        """Every variable a client needs: AWS_*, MLFLOW_TRACKING_URI and the MLflow user,
        RAY_ADDRESS, the token."""
        return {**NO_TELEMETRY_ENV, **self.s3.env(), **self.mlflow.env(), **self.ray.env()}

    def stop(self) -> None:
        """Stop Ray, then MLflow, then S3 (reverse start order); each by its process session."""
        self.ray.stop()
        self.mlflow.stop()
        self.s3.stop()

    def state(self) -> dict:
        """What `down` and `status` need after this process has exited."""

        def proc(pid: int) -> dict:
            return {"pid": pid, "start_ticks": process_start_ticks(pid)}

        return {
            "s3": {
                **proc(self.s3.pid),
                "endpoint": self.s3.endpoint,
                "access_key": self.s3.access_key,
                "secret_key": self.s3.secret_key,
                "ports": self.s3.ports,
            },
            "mlflow": {
                **proc(self.mlflow.pid),
                "uri": self.mlflow.uri,
                "username": self.mlflow.username,
                "password": self.mlflow.password,
            },
            "ray": {
                **proc(self.ray.pid),
                "dashboard_url": self.ray.dashboard_url,
                "gcs_address": self.ray.gcs_address,
                "temp_dir": str(self.ray.temp_dir),
            },
            "env": self.env(),
        }


# --- CLI -------------------------------------------------------------------------------------

SERVICES = ("ray", "mlflow", "s3")  # stop order


def _read_state(root: Path) -> dict | None:
    path = root / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        _stderr(f"ignoring unreadable state file {path}: line {err.lineno}: {err.msg}")
        return None


def write_state(stack: LocalStack) -> None:
    """state.json and env.sh in the stack's root, each created 0600 atomically: they hold the
    S3 secret key and the MLflow password."""
    write_private(stack.root / STATE_FILE, json.dumps(stack.state(), indent=2))
    write_private(stack.root / ENV_FILE, exports(stack.env()))


def _service_alive(record: dict) -> bool:
    pid, ticks = record["pid"], record.get("start_ticks")
    return process_start_ticks(pid) == ticks and bool(session_members(pid))


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code  # Ray's dashboard answers 401 without a token: it is up
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _stop_recorded(state: dict) -> list[int]:
    """Stop every recorded service session (dead or alive); return the PIDs that were alive."""
    stopped = []
    for name in SERVICES:
        record = state.get(name)
        if not record:
            continue
        if _service_alive(record):
            stopped.append(record["pid"])
        stop_session(
            record["pid"],
            grace_s=15.0,
            start_ticks=record.get("start_ticks"),
            term_all=name != "ray",  # Ray's --block leader stops its own children in order
        )
    remove_grpc_sockets(state.get("s3", {}).get("ports", {}))
    return stopped


def exports(env: dict[str, str]) -> str:
    """`export K=V` lines a shell can eval or source."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))


def cmd_up(root: Path, num_cpus: int) -> int:
    state = _read_state(root)
    if state is not None:
        if all(_service_alive(state[name]) for name in SERVICES if name in state):
            _stderr(f"local stack already running (state in {root / STATE_FILE})")
            print(exports(state["env"]), end="")
            return 0
        _stderr("found a stale state file; cleaning up what is left of the previous stack")
        _stop_recorded(state)
        (root / STATE_FILE).unlink(missing_ok=True)
    keys = None
    if state and "s3" in state:  # keep the keys so data and MLflow runs from before stay usable
        keys = (state["s3"]["access_key"], state["s3"]["secret_key"])
    t0 = time.monotonic()
    stack = LocalStack.start(root, num_cpus=num_cpus, s3_keys=keys)
    write_state(stack)
    _stderr(f"local stack up in {time.monotonic() - t0:.1f} s; state in {root / STATE_FILE}")
    print(exports(stack.env()), end="")
    print(f"# MLflow UI:      {stack.mlflow.uri}  (user {stack.mlflow.username}, password in "
          f"MLFLOW_TRACKING_PASSWORD)")
    print(f"# Ray dashboard:  {stack.ray.dashboard_url}  (token: {stack.ray.token_path})")
    print(f"# or: source {root / ENV_FILE}")
    return 0


def cmd_down(root: Path) -> int:
    state = _read_state(root)
    if state is None:
        _stderr(f"no local stack recorded in {root}; nothing to stop")
        return 0
    t0 = time.monotonic()
    stopped = _stop_recorded(state)
    (root / STATE_FILE).unlink(missing_ok=True)
    (root / ENV_FILE).unlink(missing_ok=True)
    _stderr(f"stopped {len(stopped)} service(s) in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_status(root: Path) -> int:
    state = _read_state(root)
    if state is None:
        print(f"local stack: not running (no {root / STATE_FILE})")
        return 1
    probes = {
        "s3": state.get("s3", {}).get("endpoint"),
        "mlflow": state.get("mlflow", {}).get("uri", "") + "/health",
        "ray": state.get("ray", {}).get("dashboard_url", "") + "/api/gcs_healthz",
    }
    healthy = True
    for name in reversed(SERVICES):
        record = state.get(name) or {"pid": -1}
        alive = record["pid"] > 0 and _service_alive(record)
        url = probes[name] or "?"
        up = alive and url.startswith("http") and _http_status(url) is not None
        healthy &= up
        print(f"{name:7s} pid {record['pid']:<8d} {'up' if up else 'DOWN':5s} {url}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".local-stack"),
        help="state and data directory (default: .local-stack)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the Ray head offers")
    args = parser.parse_args(argv)
    root = args.dir.absolute()
    try:
        if args.command == "up" or root.exists() or root.is_symlink():
            root = private_dir(root)  # state files are read or written only in a private dir
        if args.command == "up":
            return cmd_up(root, args.num_cpus)
        if args.command == "down":
            return cmd_down(root)
        return cmd_status(root)
    except UnsafePathError as err:
        _stderr(f"cluster.local.stack: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
