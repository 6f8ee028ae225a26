"""The train-job tests' shared parts: their synthetic shard set on the stack's S3, the job's
entrypoint, and what they read back (checkpoints in storage, the job log, MLflow runs)."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from jobs.shard import run as shard_run
from vl.checkpoint import complete_checkpoints
from vl.data.synthetic import SyntheticConfig, generate

DIMS = {"slowfast": 8, "clip": 8}
FAST = ["--set", "train.eval_every=1", "--set", "data.batch_size=8", "--set",
        "data.eval_batch_size=32"]


def uid() -> str:
    return uuid.uuid4().hex[:8]


def shard_to_s3(layout, prefix: str, stack_env: dict, rows_per_shard: int) -> str:
    """Shard both splits of a synthetic layout to prefix/{train,val} on the stack's S3."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack_env.items():
            mp.setenv(key, value)
        for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
            shard_run(dataset="qvhighlights", annotations=str(jsonl),
                      video_features=layout.video_arg(), text_features=layout.text_arg(),
                      out=f"{prefix}/{split}", rows_per_shard=rows_per_shard, ray_mode="off",
                      log=lambda *_: None)
    return prefix


def entrypoint(*args: str) -> list[str]:
    # The local head's PATH may not hold the venv: name its interpreter explicitly.
    return [sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml", *args]


def s3(env: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def checkpoints(env: dict[str, str], run_path: str) -> list[str]:
    fs = s3(env)
    if not fs.exists(run_path):
        return []
    return sorted(p for p in fs.ls(run_path, refresh=True)
                  if Path(p).name.startswith("checkpoint_") and fs.exists(f"{p}/state.pt"))


def checkpoint_folders(env: dict[str, str], run_path: str) -> list[str]:
    """The checkpoint folders under a run's storage that hold any object (SeaweedFS goes on
    listing a folder whose objects were deleted)."""
    fs = s3(env)
    return sorted(Path(p).name for p in fs.ls(run_path, refresh=True)
                  if Path(p).name.startswith("checkpoint_") and fs.isdir(p)
                  and any(f.rstrip("/") != p.rstrip("/") for f in fs.find(p)))


def newest_complete_epoch(env: dict[str, str], run_uri: str) -> int | None:
    """The epoch (0-based) of the newest complete (sealed) checkpoint in a run's storage."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        found = complete_checkpoints(run_uri)
    return found[-1][1]["epoch"] if found else None


def epochs_trained(log: str) -> int:
    """Rank 0's progress lines ("epoch K/N loss ..."), one per epoch trained (without the log
    tail the CLI repeats after "Status message:")."""
    return len(re.findall(r"\bepoch \d+/\d+ loss ", log.split("Status message:")[0]))


def continued_epochs(log: str) -> list[int]:
    """The 1-based epoch each (re)started worker group continued with, in order."""
    return [int(n) for n in re.findall(r"continuing with epoch (\d+)/\d+", log)]


def job_client(env: dict[str, str]) -> JobSubmissionClient:
    """The job API client in-process, its token in an explicit header rather than RAY_AUTH_*
    in this process: Ray caches its auth mode per process, and other tests in the session run
    Ray with auth disabled."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"})


def runs_named(experiment: str, name: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`vl.run_name` = '{name}'")


def make_shards(stack_env: dict[str, str], folder: Path) -> str:
    """s3://vl-data/test_train_job/<uid> holding train/ (48 queries) and val/ (16 queries), in
    shards of 12 rows."""
    layout = generate(
        SyntheticConfig("qvhighlights", videos=32, seed=3, dims=DIMS,
                        video_sets=("slowfast", "clip"), text_sets=("clip",), val_fraction=0.25),
        folder,
    )
    return shard_to_s3(layout, f"s3://vl-data/test_train_job/{uid()}", stack_env, 12)


def assert_each_step_logged_once(run_id: str) -> None:
    """Every metric key's history, in logging order, has strictly increasing steps: no epoch
    logged twice by a resumed attempt (MLflow cannot delete a metric point afterwards)."""
    client = MlflowClient()
    for key in client.get_run(run_id).data.metrics:
        history = sorted(client.get_metric_history(run_id, key),
                         key=lambda m: (m.timestamp, m.step))
        steps = [m.step for m in history]
        assert all(a < b for a, b in zip(steps, steps[1:])), f"{key}: steps {steps}"
