"""Submitting this checkout as a Ray job to the test session's local head, the way a user does:
the `ray job submit` CLI with `--working-dir .`. Shared by the job tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.local.common import WORKING_DIR_EXCLUDES

REPO = Path(__file__).resolve().parents[1]


def client_env(local_stack_env: dict[str, str]) -> dict[str, str]:
    """The client environment, plus the venv's bin on PATH (for the `ray` CLI)."""
    env = {**os.environ, **local_stack_env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def submit(env: dict[str, str], submission_id: str, entrypoint: list[str], *, wait: bool = True,
           env_vars: dict[str, str] | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """`ray job submit` (following the job's log unless `wait` is False); `env_vars` go into the
    job's runtime env. Entrypoints name `sys.executable`, the interpreter the head puts first
    on its PATH anyway, so a test never depends on which `python` that PATH finds."""
    runtime_env: dict = {"excludes": WORKING_DIR_EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
         env["RAY_ADDRESS"], "--submission-id", submission_id, "--working-dir", ".",
         "--entrypoint-num-cpus", "0", "--runtime-env-json", json.dumps(runtime_env),
         *([] if wait else ["--no-wait"]), "--", *entrypoint],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
