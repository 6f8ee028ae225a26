"""Integration tests of the embedded local stack: MLflow -> S3 artifacts, Ray job submission
with token auth and inherited S3/MLflow variables, and the `stack up/status/down` CLI.

All servers are real (SeaweedFS, `mlflow server`, `ray start --head`) and bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.local.common import quiet_env, wait_for
from cluster.local.ray_head import session_members, start_ray_head

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _s3_client(s3_server):
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def test_mlflow_run_metric_and_artifact_land_in_s3(mlflow_env, s3_server):
    client = MlflowClient()
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "val_mAP", 42.5, step=3)
    client.log_text(run_id, "hello from the stack test", "notes/hello.txt")
    client.set_terminated(run_id)

    assert client.get_metric_history(run_id, "val_mAP")[0].value == 42.5
    keys = [
        obj["Key"]
        for obj in _s3_client(s3_server).list_objects_v2(Bucket="mlflow").get("Contents", [])
    ]
    matches = [k for k in keys if run_id in k and k.endswith("notes/hello.txt")]
    assert len(matches) == 1, keys
    body = _s3_client(s3_server).get_object(Bucket="mlflow", Key=matches[0])["Body"].read()
    assert body == b"hello from the stack test"


def test_ray_dashboard_requires_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/version", timeout=5)
    assert err.value.code == 401
    token = ray_head.token_path.read_text().strip()
    request = urllib.request.Request(
        f"{ray_head.dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response)["ray_version"] == "2.60.0"


def _submit(env: dict[str, str], workdir: Path, script: str, extra: list[str] | None = None):
    """Start `ray job submit` (it blocks until the job ends) without waiting for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "script.py").write_text(textwrap.dedent(script))
    command = [
        _ray_cli(), "job", "submit", "--working-dir", str(workdir), "--entrypoint-num-cpus=0",
        *(extra or []), "--", "python", "script.py",
    ]
    return subprocess.Popen(
        command, env=quiet_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=workdir,
    )


@pytest.fixture(scope="module")
def finished_jobs(local_stack_env, s3_server, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Two jobs submitted at once (a job costs ~12 s, mostly start-up, so they overlap well):
    `ok` reads a runtime-env variable and an S3 object through the head's inherited AWS
    variables; `fail` exits with an error. Values: (exit code of `ray job submit`, output)."""
    key = f"probe/{uuid.uuid4().hex}.txt"
    _s3_client(s3_server).put_object(Bucket="vl-data", Key=key, Body=b"shard-bytes")
    ok_script = f"""
        import os, sys
        import boto3, requests
        assert os.environ["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
        body = boto3.client("s3").get_object(Bucket="vl-data", Key="{key}")["Body"].read()
        mlflow = requests.get(
            os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1",
            auth=(os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]),
            timeout=30)
        print("JOB-SAW", os.environ["VL_MARKER"], body.decode(), "mlflow", mlflow.status_code)
        sys.exit(0 if body == b"shard-bytes" else 5)
    """
    runtime_env = json.dumps({"env_vars": {"VL_MARKER": "m-123"}})
    root = tmp_path_factory.mktemp("jobs")
    procs = {
        "ok": _submit(local_stack_env, root / "ok", ok_script, ["--runtime-env-json", runtime_env]),
        "fail": _submit(local_stack_env, root / "fail", "raise SystemExit('deliberate failure')"),
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results[name] = (proc.returncode, out)
    return results


def test_ray_job_reads_env_and_s3(finished_jobs):
    """The job gets a variable from --runtime-env-json and the S3/MLflow ones (the MLflow
    user included) from the head."""
    code, out = finished_jobs["ok"]
    assert code == 0, out[-4000:]
    assert "JOB-SAW m-123 shard-bytes mlflow 200" in out


def test_ray_job_failure_exits_nonzero(finished_jobs):
    code, out = finished_jobs["fail"]
    assert code != 0
    assert "deliberate failure" in out


# A job run with Ray Train's logging (its workers log the root logger at INFO): matplotlib logs
# "generated new fontManager" when it finds no font cache, and the job reports the preemption
# watcher switch as Ray Train's controller reads it.
_QUIET_JOB = """
import logging
logging.basicConfig(level=logging.INFO)
import matplotlib.pyplot
from ray._private.ray_constants import env_bool
from ray.train.v2._internal import constants
print("PREEMPTION-WATCHER", env_bool(constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
                                     constants.DEFAULT_ENABLE_PREEMPTION_WATCHER))
"""


def _path_without(directory: Path) -> str:
    """This process's PATH without `directory` (entries compared resolved)."""
    return os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if entry and Path(entry).resolve() != directory.resolve())


@pytest.fixture(scope="module")
def fresh_head_jobs() -> dict[str, tuple[JobStatus, str]]:
    """Two jobs at once on a Ray head of their own, started the way `stack up` is from a shell
    where the venv is not activated (its bin not on PATH), in a fresh temp dir (no matplotlib
    font cache yet): `python` runs a bare `python` entrypoint that needs the venv's packages;
    `quiet` runs `_QUIET_JOB` with this interpreter. Values: (final status, job log)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vlf", dir="/tmp"))
    head = start_ray_head(temp_dir, num_cpus=1, object_store_bytes=200_000_000,
                          env={"PATH": _path_without(Path(sys.executable).parent)})
    try:
        token = head.token_path.read_text().strip()
        client = JobSubmissionClient(head.dashboard_url,
                                     headers={"Authorization": f"Bearer {token}"})
        entrypoints = {
            "python": "python -c " + shlex.quote(
                "import sys, ray, vl; print('JOB-PREFIX', sys.prefix)"),
            "quiet": shlex.join([sys.executable, "-c", _QUIET_JOB]),
        }
        ids = {name: client.submit_job(entrypoint=entrypoint, entrypoint_num_cpus=0)
               for name, entrypoint in entrypoints.items()}
        wait_for(lambda: all(client.get_job_status(i).is_terminal() for i in ids.values()),
                 180, "the jobs on the fresh head")
        return {name: (client.get_job_status(i), client.get_job_logs(i))
                for name, i in ids.items()}
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_bare_python_in_a_job_is_the_interpreter_that_started_the_head(fresh_head_jobs):
    """`ray job submit -- python ...` finds the venv's python (and so ray, vl) although the
    venv's bin was not on PATH when the head started."""
    status, logs = fresh_head_jobs["python"]
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    prefix = re.search(r"^JOB-PREFIX (.+)$", logs, re.MULTILINE)
    assert prefix and Path(prefix.group(1)).resolve() == Path(sys.prefix).resolve(), logs


def test_the_first_job_on_a_fresh_head_does_not_build_the_font_cache(fresh_head_jobs):
    """matplotlib's font cache is built when the head starts, in its private MPLCONFIGDIR:
    no job log carries matplotlib's "generated new fontManager", not even the first."""
    status, logs = fresh_head_jobs["quiet"]
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "generated new fontManager" not in logs, logs[-3000:]


def test_ray_train_preemption_watcher_is_off_in_jobs(fresh_head_jobs):
    """Asserted through the switch, read by Ray Train's own reader and default as its
    controller does, rather than by a training run (~30 s here), whose log would otherwise
    carry the watcher's `core_worker.cc` error line."""
    status, logs = fresh_head_jobs["quiet"]
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "PREEMPTION-WATCHER False" in logs, logs[-3000:]


def _cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.local.stack", *args, "--dir", str(root)],
        env=quiet_env(), capture_output=True, text=True, timeout=180, cwd=REPO,
    )


def test_cli_up_status_down_leaves_no_process(tmp_path):
    root = tmp_path / "stack"
    up = _cli("up", root=root)
    state = json.loads((root / "state.json").read_text()) if (root / "state.json").exists() else {}
    pids = [state[name]["pid"] for name in ("s3", "mlflow", "ray") if name in state]
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert len(pids) == 3 and all(session_members(pid) for pid in pids)
        exports = dict(
            line[len("export "):].split("=", 1)
            for line in up.stdout.splitlines() if line.startswith("export ")
        )
        assert exports["MLFLOW_TRACKING_URI"] == state["mlflow"]["uri"]
        assert exports["RAY_ADDRESS"] == state["ray"]["dashboard_url"]
        assert {"AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN_PATH", "MLFLOW_DISABLE_TELEMETRY"} <= set(
            exports
        )
        assert (root / "env.sh").read_text().count("export ") == len(exports)
        assert oct((root / "env.sh").stat().st_mode & 0o777) == "0o600"
        assert oct((root / "state.json").stat().st_mode & 0o777) == "0o600"
        assert oct(root.stat().st_mode & 0o777) == "0o700"
        # The exported MLflow user is what the (basic-auth) server accepts; nobody else is.
        search = f"{state['mlflow']['uri']}/api/2.0/mlflow/experiments/search?max_results=1"
        auth = tuple(shlex.split(exports[k])[0]
                     for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
        assert requests.get(search, timeout=30).status_code == 401
        assert requests.get(search, auth=auth, timeout=30).status_code == 200

        status = _cli("status", root=root)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count(" up ") == 3

        again = _cli("up", root=root)  # idempotent: reports the running stack
        assert again.returncode == 0 and "already running" in again.stderr
        assert json.loads((root / "state.json").read_text())["ray"]["pid"] == state["ray"]["pid"]

        down = _cli("down", root=root)
        assert down.returncode == 0, down.stderr
        assert [pid for pid in pids if session_members(pid)] == []
        assert not (root / "state.json").exists()
        assert _cli("status", root=root).returncode == 1
    finally:
        for pid in pids:  # never leak servers, even when an assertion above failed
            for member in session_members(pid):
                os.kill(member, 9)
        if state.get("ray"):
            shutil.rmtree(state["ray"]["temp_dir"], ignore_errors=True)


def test_cli_down_tolerates_a_stale_state_file(tmp_path):
    root = tmp_path / "stale"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    dead.wait()
    record = {"pid": dead.pid, "start_ticks": 1}
    (root / "state.json").write_text(json.dumps({"s3": record, "mlflow": record, "ray": record}))
    status = _cli("status", root=root)
    assert status.returncode == 1 and "DOWN" in status.stdout
    down = _cli("down", root=root)
    assert down.returncode == 0, down.stderr
    assert "stopped 0 service(s)" in down.stderr
    assert not (root / "state.json").exists()
