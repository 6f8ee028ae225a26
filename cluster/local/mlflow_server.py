"""An MLflow tracking server on loopback: SQLite metadata, artifacts proxied to the local S3.

Why a server and not a `sqlite:///` URI in every process: Ray workers, the job driver and the
user's shell must all see the same runs, and with `--serve-artifacts` only the server needs S3
credentials for artifacts. Why `--workers 1` and the job runner off: the defaults cost ~2 GB and
13 processes on a 2-core machine (STACK.md).

Why MLflow's basic-auth app: a plain server takes anonymous writes from anyone on the host (an
alias moved to another version, a run deleted). Every request but /health needs the admin
user's password, generated at the first start of a data directory and kept in its private
`basic_auth.ini` (0600); clients get it as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
which the MLflow client sends as HTTP basic auth.
"""

from __future__ import annotations

import base64
import configparser
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.common import NO_TELEMETRY_ENV, free_port, quiet_env, wait_for
from cluster.local.ray_head import process_start_ticks, stop_session
from cluster.local.s3 import S3Server
from vl.private import private_dir, write_private

ADMIN_USERNAME = "vl-admin"
AUTH_CONFIG = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
# Variables a parent may carry that would override this server's auth configuration.
_AUTH_VARS = ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_FLASK_SERVER_SECRET_KEY")


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    """The Authorization header the basic-auth app checks."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _search_answers(uri: str, headers: dict[str, str]) -> bool:
    """True once the server answers an authenticated tracking API call, which proves its
    database is migrated and the admin user exists (the bare /health route answers before)."""
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def admin_credentials(data_dir: Path) -> tuple[str, str]:
    """(username, password) of the admin user of the server in `data_dir`: the ones its
    basic_auth.ini holds, or new ones for a directory without users yet.

    The auth database keeps the password the admin was created with, so a database without
    its ini is refused rather than paired with a password it would reject.
    """
    ini = data_dir / AUTH_CONFIG
    if ini.exists():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ini)
        section = parser["mlflow"] if parser.has_section("mlflow") else {}
        if section.get("admin_username") and section.get("admin_password"):
            return section["admin_username"], section["admin_password"]
    if (data_dir / AUTH_DB).exists():
        raise RuntimeError(
            f"{data_dir / AUTH_DB} holds MLflow users but {ini} with their admin password is "
            f"missing or incomplete: restore it, or delete {data_dir / AUTH_DB} to start over")
    return ADMIN_USERNAME, secrets.token_urlsafe(24)


def _write_auth_config(data_dir: Path, username: str, password: str) -> Path:
    """basic_auth.ini (0600): the users database next to it, the bootstrap admin, and no
    permission for any other user unless granted."""
    db = data_dir / AUTH_DB
    if "%" in str(db):  # MLflow reads the file with configparser's % interpolation
        raise ValueError(f"MLflow data directory {data_dir} must not contain '%'")
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{db}\n"
        f"admin_username = {username}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A verified password is cached for this long instead of re-running PBKDF2 on every
        # request (~0.1-0.5 s each, per metric logged); with `--workers 1` the cache is the
        # only copy, so a password change through the API takes effect at once.
        "auth_cache_ttl_seconds = 600\n"
    )
    return write_private(data_dir / AUTH_CONFIG, text)


@dataclass
class MlflowServer:
    """A running MLflow server; `uri` is the MLFLOW_TRACKING_URI clients use."""

    pid: int
    port: int
    data_dir: Path
    artifacts_destination: str
    username: str = ""
    password: str = field(default="", repr=False)
    start_ticks: int | None = None
    log_path: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Client variables: where to track, as whom, and no telemetry."""
        return {
            **NO_TELEMETRY_ENV,
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def auth_header(self) -> dict[str, str]:
        return basic_auth_header(self.username, self.password)

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
            return _search_answers(self.uri, self.auth_header())

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

    With `wait=False` it returns right after launching (the URI and credentials are fixed by
    then, so a Ray head can be started with them meanwhile); call `wait_ready()` before use.
    `data_dir` must be new or a private directory of this user (`vl.private.private_dir`).
    """
    data_dir = private_dir(data_dir)
    username, password = admin_credentials(data_dir)
    auth_config = _write_auth_config(data_dir, username, password)
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
        "--app-name",
        "basic-auth",
    ]
    env = quiet_env(s3.env())
    for name in _AUTH_VARS:
        env.pop(name, None)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)  # CSRF key of the auth UI
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
        username=username,
        password=password,
        start_ticks=process_start_ticks(popen.pid),
        log_path=log_path,
        popen=popen,
    )
    if wait:
        server.wait_ready(timeout_s)
    return server
