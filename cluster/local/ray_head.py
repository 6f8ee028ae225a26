"""A single-node Ray head on loopback, started as `ray start --head --block` in its own session.

Why a `--block` child and not `ray.init()`: the head must outlive the process that started it
(the `stack up` CLI) and accept `ray job submit`, which needs the dashboard. Why its own session:
`ray stop` kills every Ray process on the machine, so the only safe way to stop *this* head is
to signal *its* process session (see `stop_session`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.common import NO_TELEMETRY_ENV, free_port, quiet_env, wait_for
from vl.private import private_dir, write_private

# Ray makes its --temp-dir and session dirs world-writable (0777, for machines shared by several
# users), so it gets a subdirectory of our private (0700) temp dir: nobody else can reach it.
RAY_SUBDIR = "r"
# Ray puts AF_UNIX sockets at <temp-dir>/session_<date>_<usec>_<pid>/sockets/plasma_store.N; the
# kernel caps a socket path at 107 bytes and everything after Ray's temp dir takes up to ~66.
MAX_TEMP_DIR_CHARS = 40 - len(RAY_SUBDIR) - 1

# The head's HOME (holding ray_bootstrap_config.yaml) and matplotlib's config and font-cache dir
# (MPLCONFIGDIR), both private subdirectories of the temp dir that outlive one `stack up`.
HOME_SUBDIR = "home"
MPL_SUBDIR = "mpl"

# Ray Train V2 starts a PreemptionWatcher actor per worker group (it polls Ray Core for nodes
# drained as preempted, i.e. spot instances being reclaimed); creating it logs a core_worker.cc
# error line (its constructor arguments sit in the object store and max_restarts=-1) into
# every training job's log. A local stack has no spot nodes to reclaim, so the head turns the
# watcher off (ray/train/v2/_internal/constants.py; the controller then never registers its
# callback, and a lost node is an ordinary worker failure under FailureConfig.max_failures).
# A value already in the environment wins.
HEAD_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray's default worker port range is 10002..19999; every fixed port we pick lies outside it.
_PORT_LOW, _PORT_HIGH = 20000, 40000

# Variables a parent may carry that would point `ray start --head` at another cluster, or (the
# pytest one) switch Ray into its own test-suite behaviour.
_INHERITED_VARS = (
    "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "PYTEST_CURRENT_TEST",
)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot: with the PID it names one process.

    Recording it next to a PID lets `stop_session` refuse to signal a recycled PID.
    """
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def session_members(sid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose session id is `sid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat and int(stat[3]) == sid and stat[0] != "Z":
            members.append(int(entry.name))
    return members


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def stop_session(
    pid: int,
    grace_s: float = 10.0,
    popen: subprocess.Popen | None = None,
    start_ticks: int | None = None,
    term_all: bool = False,
) -> None:
    """Stop the session led by `pid`: SIGTERM, wait for the leader, then SIGKILL what is left.

    By default only the leader gets SIGTERM, because Ray's `--block` handler stops its children
    in order (a SIGTERM to every Ray process at once makes them race and log crash reports);
    `term_all` sends it to every member, for servers whose workers each shut down cleanly on
    their own (MLflow's uvicorn). The session-wide SIGKILL afterwards catches whatever escaped.
    `start_ticks` (from `process_start_ticks` at start time) guards against signalling a PID the
    kernel has since handed to an unrelated process.
    """
    if start_ticks is not None and process_start_ticks(pid) not in (None, start_ticks):
        return  # the recorded PID now belongs to someone else: its session is gone
    for target in session_members(pid) if term_all else [pid] if _alive(pid) else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            break
        if popen is None and not _alive(pid):
            break
        time.sleep(0.1)
    for member in session_members(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)
    wait_for(lambda: not session_members(pid), 10, f"processes of session {pid} to exit")


def write_token(path: Path) -> str:
    """Write a fresh 256-bit auth token to `path` (created 0600, atomically) and return it."""
    token = secrets.token_hex(32)
    write_private(path, token)
    return token


def _dashboard_ready(url: str, token: str) -> bool:
    """True once the dashboard's job API answers an authenticated request.

    /api/version is behind the token check, so a 200 proves both that the HTTP server is up
    and that our token is the one the cluster expects (a 401/403 here would mean it is not).
    """
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _raylet_ready(agent_port: int) -> bool:
    """True once the node's dashboard agent reports its raylet healthy (no token needed).

    The dashboard head answers before the raylet is up; a job submitted in that gap waits, so
    readiness means both.
    """
    url = f"http://127.0.0.1:{agent_port}/api/local_raylet_healthz"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class RayHead:
    """A running Ray head. `env()` is what a client (`ray job submit`, `ray.init`) needs."""

    pid: int
    gcs_port: int
    dashboard_port: int
    agent_port: int
    temp_dir: Path
    token_path: Path
    start_ticks: int | None = None
    log_path: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)
    font_cache: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def gcs_address(self) -> str:
        """For an in-process `ray.init(address=...)` driver."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """For `ray job ...` (RAY_ADDRESS) and a browser."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Client variables: the job API address, the token switches, no telemetry."""
        return {
            **NO_TELEMETRY_ENV,
            "RAY_ADDRESS": self.dashboard_url,
            "VL_RAY_GCS_ADDRESS": self.gcs_address,  # what a driver run outside `ray job` joins
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def alive(self) -> bool:
        return _alive(self.pid) and process_start_ticks(self.pid) in (None, self.start_ticks)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the `--block` leader, reap it, SIGKILL the rest of its session."""
        if self.font_cache is not None and self.font_cache.poll() is None:
            self.font_cache.kill()
            self.font_cache.wait()
        stop_session(self.pid, grace_s=grace_s, popen=self.popen, start_ticks=self.start_ticks)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the job API and the raylet answer and matplotlib's font cache is built
        (`_build_font_cache`); stop the head and raise otherwise."""

        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
                raise RuntimeError(
                    f"ray start exited with code {self.popen.returncode}; see {self.log_path}:\n"
                    + tail
                )
            token = self.token_path.read_text().strip()
            return _dashboard_ready(self.dashboard_url, token) and _raylet_ready(self.agent_port)

        try:
            wait_for(ready, timeout_s, f"Ray head ({self.dashboard_url}, log {self.log_path})")
            if self.font_cache is not None:
                try:  # a failed build only means the first job builds the cache itself
                    self.font_cache.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.font_cache.kill()
                    self.font_cache.wait()
        except BaseException:
            self.stop()
            raise


def train_worker_pids(head: RayHead) -> list[int]:
    """The live Ray Train worker processes (`ray::RayTrainWorker...`) of the head's session:
    what a fault test or benchmark kills from outside, as the OOM killer would."""
    found = []
    for pid in session_members(os.getsid(head.pid)):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


def start_ray_head(
    temp_dir: Path,
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    object_store_bytes: int = 700_000_000,
    timeout_s: float = 60.0,
    wait: bool = True,
) -> RayHead:
    """Start a Ray head on 127.0.0.1 with token auth and wait until its job API answers.

    `env` (S3 and MLflow variables) goes into the head's environment; Ray workers, job drivers
    and job supervisors are spawned by the head's raylet and inherit it, which is how a job
    reads S3 and logs to MLflow without passing credentials through `--runtime-env-json`.
    With `wait=False` it returns right after launching; call `wait_ready()` before use (lets a
    caller start other services meanwhile).
    """
    temp_dir, home, token_path = _prepare_temp_dir(temp_dir)
    ports = {name: free_port(_PORT_LOW, _PORT_HIGH) for name in _HEAD_PORTS}
    if len(set(ports.values())) != len(ports):  # free_port may hand out one port twice
        return start_ray_head(temp_dir, num_cpus, env, object_store_bytes, timeout_s, wait)
    log_path = temp_dir / "ray-head.log"
    head_env = _head_env(env, temp_dir, token_path)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            _head_command(temp_dir, num_cpus, object_store_bytes, ports),
            env=head_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = RayHead(
        pid=popen.pid,
        gcs_port=ports["port"],
        dashboard_port=ports["dashboard-port"],
        agent_port=ports["dashboard-agent-listen-port"],
        temp_dir=temp_dir,
        token_path=token_path,
        start_ticks=process_start_ticks(popen.pid),
        log_path=log_path,
        popen=popen,
        font_cache=_build_font_cache(head_env),
    )
    if wait:
        head.wait_ready(timeout_s)
    return head


# Every port `ray start --head` opens, each fixed outside Ray's worker port range.
_HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def _prepare_temp_dir(temp_dir: Path) -> tuple[Path, Path, Path]:
    """(temp dir, the head's HOME, its auth token file), created private (0700, owner-checked:
    the dir may sit in a shared /tmp); the path length checked."""
    temp_dir = private_dir(Path(temp_dir).absolute())  # a symlink there is refused
    if len(str(temp_dir)) > MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"Ray temp dir {temp_dir} is {len(str(temp_dir))} characters; Ray's socket paths "
            f"overflow past {MAX_TEMP_DIR_CHARS}. Use a shorter path (e.g. under /tmp)."
        )
    home = private_dir(temp_dir / HOME_SUBDIR)
    private_dir(temp_dir / MPL_SUBDIR)
    # With this file present Ray believes it runs on a launched cluster with a local provider
    # and skips the cloud-metadata probes its dashboard otherwise sends (STACK.md).
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    token_path = temp_dir / "auth_token"
    write_token(token_path)
    return temp_dir, home, token_path


def _head_command(temp_dir: Path, num_cpus: int, object_store_bytes: int,
                  ports: dict[str, int]) -> list[str]:  # fmt: skip
    ray_bin = Path(sys.executable).with_name("ray")
    return [
        str(ray_bin) if ray_bin.exists() else "ray",
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp_dir / RAY_SUBDIR}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_bytes}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]


def _head_env(env: dict[str, str] | None, temp_dir: Path, token_path: Path) -> dict[str, str]:
    """The head's environment: `env` with the no-telemetry switches, token auth, its own HOME
    and MPLCONFIGDIR, this interpreter's directory first on PATH, `HEAD_ENV_DEFAULTS`, and
    nothing inherited that would point it at another cluster.

    PATH: `ray job submit -- python ...` runs `python` as found on the PATH of the head (its
    raylet spawns the job), so the directory of the interpreter that starts the head (the
    venv's bin, holding `python` and `ray`) goes first, whether or not the venv is activated.
    Not resolved: a venv's `python` is a symlink to the base interpreter, whose directory lacks
    the venv's packages.
    """
    child_env = quiet_env(env)
    for name in _INHERITED_VARS:
        child_env.pop(name, None)
    for name, value in HEAD_ENV_DEFAULTS.items():
        child_env.setdefault(name, value)
    bin_dir = str(Path(sys.executable).parent)
    rest = [entry for entry in child_env.get("PATH", "").split(os.pathsep)
            if entry and entry != bin_dir]
    child_env.update(
        {
            "PATH": os.pathsep.join([bin_dir, *rest]),
            "HOME": str(temp_dir / HOME_SUBDIR),
            # matplotlib's font cache, built once per temp dir (`_build_font_cache`) instead
            # of by the first process of every fresh stack, which logs "generated new
            # fontManager" (at INFO: Ray Train's workers log the root logger at INFO).
            "MPLCONFIGDIR": str(temp_dir / MPL_SUBDIR),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    return child_env


def _build_font_cache(head_env: dict[str, str]) -> subprocess.Popen | None:
    """Start building matplotlib's font cache in the head's MPLCONFIGDIR (~1 s, beside the
    head's own start) unless it is there already or matplotlib is not installed; the handle
    goes to `RayHead.wait_ready`, so no job starts before the cache is in place."""
    mpl_dir = Path(head_env["MPLCONFIGDIR"])
    if importlib.util.find_spec("matplotlib") is None or any(mpl_dir.glob("fontlist-v*.json")):
        return None
    return subprocess.Popen(
        [sys.executable, "-c", "import matplotlib.font_manager"], env=head_env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


# The ports a worker node's `ray start` opens besides its workers' (the GCS is the head's).
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
)
# A worker node's own worker port range: two raylets on one host must not hand out one port
# twice (the head keeps Ray's default, 10002-19999; the fixed ports are in 20000-40000).
_NODE_WORKER_PORTS = (40001, 40999)


def loopback_name() -> str:
    """A name of this machine that resolves to 127.0.0.1 but is not spelled as loopback, for a
    node joining the loopback head: Ray replaces a literal 127.0.0.1 / localhost in the join
    address by the machine's routed IP (where the head does not listen) once multi-node is
    enabled, which joining needs."""
    for name in dict.fromkeys([socket.gethostname(), socket.getfqdn()]):
        with contextlib.suppress(OSError):
            if name not in ("localhost", "127.0.0.1") and \
                    socket.gethostbyname(name) == "127.0.0.1":
                return name
    raise RuntimeError("no name of this machine resolves to 127.0.0.1 (see /etc/hosts): a "
                       "second Ray node cannot join the loopback head")


@dataclass
class RayWorkerNode:
    """A second Ray node on this machine, joined to a `RayHead`: what a multi-node cluster
    looks like to Ray (its own raylet, CPUs and workers), for node-loss runs."""

    pid: int
    log_path: Path
    start_ticks: int | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def kill(self) -> None:
        """SIGKILL the node's raylet and every process on it at once: a machine that dies."""
        for member in session_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        stop_session(self.pid, grace_s=grace_s, popen=self.popen, start_ticks=self.start_ticks)


def start_ray_worker_node(
    head: RayHead,
    env: dict[str, str] | None = None,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    timeout_s: float = 60.0,
) -> RayWorkerNode:
    """`ray start --address` a worker node with `num_cpus` CPUs (and custom `resources`) into
    `head`'s cluster, in its own session, with the head's environment rules (`env`, token
    auth, no telemetry); returns once its raylet is up."""
    ports = {name: free_port(_PORT_LOW, _PORT_HIGH) for name in _NODE_PORTS}
    if len(set(ports.values())) != len(ports):
        return start_ray_worker_node(head, env, num_cpus, resources, timeout_s)
    # Its own temp dir: two nodes sharing one session folder each forward the other's worker
    # logs too, and every line of a job's log would arrive twice.
    node_dir = private_dir(head.temp_dir / "rn")  # as short as the head's (socket paths)
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin) if ray_bin.exists() else "ray", "start",
        f"--address={loopback_name()}:{head.gcs_port}", "--block", f"--num-cpus={num_cpus}",
        "--num-gpus=0", "--node-ip-address=127.0.0.1", f"--temp-dir={node_dir}",
        "--disable-usage-stats", f"--resources={json.dumps(resources or {})}",
        f"--min-worker-port={_NODE_WORKER_PORTS[0]}", f"--max-worker-port={_NODE_WORKER_PORTS[1]}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    log_path = head.temp_dir / f"ray-node-{ports['node-manager-port']}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command, env={**_head_env(env, head.temp_dir, head.token_path),
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},  # joining is multi-node
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # fmt: skip
    node = RayWorkerNode(pid=popen.pid, log_path=log_path,
                         start_ticks=process_start_ticks(popen.pid), popen=popen)

    def ready() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"ray start (worker node) exited with code {popen.returncode}; "
                               f"see {log_path}:\n" + log_path.read_text(errors="replace")[-3000:])
        return _raylet_ready(ports["dashboard-agent-listen-port"])

    try:
        wait_for(ready, timeout_s, f"Ray worker node (log {log_path})")
    except BaseException:
        node.stop()
        raise
    return node
