"""Shared plumbing for the local stack: free ports, the no-telemetry environment, polling."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

# Every process the local stack or the tests start gets these (../shared/docs/STACK.md):
# nothing may send traffic off this machine.
NO_TELEMETRY_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# What Ray's --working-dir upload must skip (it packs the directory into a zip per job): used by
# the demo and by the tests that `ray job submit` this checkout.
WORKING_DIR_EXCLUDES = [".venv", ".git", ".local-stack", "**/__pycache__", ".pytest_cache",
                        ".ruff_cache", "*.egg-info", "*.db", "mlruns", "build", "dist"]


def quiet_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment plus the no-telemetry switches (and `extra`)."""
    env = dict(os.environ)
    env.update(NO_TELEMETRY_ENV)
    if extra:
        env.update(extra)
    return env


def free_port(low: int = 20000, high: int = 40000) -> int:
    """A TCP port on 127.0.0.1 that is free right now, in [low, high)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high:
            return port
    # Fall back to probing the range directly.
    for port in range(low, high):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Poll `check` until it returns True; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
