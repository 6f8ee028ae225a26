"""An MLflow tracking server on loopback: SQLite metadata, artifacts proxied to the local S3.

Why a server and not a `sqlite:///` URI in every process: Ray workers, the job driver and the
user's shell must all see the same runs, and with `--serve-artifacts` only the server needs S3
credentials for artifacts. Why `--workers 1` and the job runner off: the defaults cost ~2 GB and
13 processes on a 2-core machine (STACK.md).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.common import NO_TELEMETRY_ENV, free_port, quiet_env, wait_for
from cluster.local.ray_head import process_start_ticks, stop_session
from cluster.local.s3 import S3Server


def _search_answers(uri: str) -> bool:
    """True once the server answers a tracking API call, which proves its database is migrated
    (the bare /health route answers before that)."""
    url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class MlflowServer:
    """A running MLflow server; `uri` is the MLFLOW_TRACKING_URI clients use."""

    pid: int
    port: int
    data_dir: Path
    artifacts_destination: str
    start_ticks: int | None = None
    log_path: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Client variables: where to track, and no telemetry."""
        return {**NO_TELEMETRY_ENV, "MLFLOW_TRACKING_URI": self.uri}

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of the server's session, then SIGKILL what is left."""
        stop_session(
            self.pid, grace_s=grace_s, popen=self.popen, start_ticks=self.start_ticks, term_all=True
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the tracking API answers; stop the server and raise otherwise."""

        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
                raise RuntimeError(
                    f"mlflow server exited with code {self.popen.returncode}; "
                    f"see {self.log_path}:\n{tail}"
                )
            return _search_answers(self.uri)

        try:
            wait_for(ready, timeout_s, f"MLflow server {self.uri} (log {self.log_path})", 0.3)
        except BaseException:
            self.stop()
            raise


def start_mlflow(
    data_dir: Path,
    s3: S3Server,
    bucket: str = "mlflow",
    port: int | None = None,
    timeout_s: float = 60.0,
    wait: bool = True,
) -> MlflowServer:
    """Start `mlflow server` in its own session and wait until its tracking API answers.

    With `wait=False` it returns right after launching (the URI is fixed by then, so a Ray head
    can be started with it meanwhile); call `wait_ready()` before use.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    destination = f"s3://{bucket}/artifacts"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination",
        destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = quiet_env(s3.env())
    env["MLFLOW_S3_ENDPOINT_URL"] = s3.endpoint
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not proxy to another server
    log_path = data_dir / "mlflow-server.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(
        pid=popen.pid,
        port=port,
        data_dir=data_dir,
        artifacts_destination=destination,
        start_ticks=process_start_ticks(popen.pid),
        log_path=log_path,
        popen=popen,
    )
    if wait:
        server.wait_ready(timeout_s)
    return server
