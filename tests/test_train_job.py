"""jobs.train against the real local stack: ray job submit, stop and resubmit, a killed worker,
the registry, and bad input failing fast before any worker starts.

One small synthetic QVHighlights-shaped dataset (tiny dims) is sharded to S3 once per module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pyarrow.fs
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient
from torch._utils import ExceptionWrapper

from cluster.local.common import free_port, wait_for
from cluster.local.ray_head import start_ray_worker_node
from jobs.predict import main as predict_main
from jobs.predict import shard_inputs
from jobs.preflight import PreflightError, check_capacity, check_data
from jobs.shard import run as shard_run
from jobs.train import (
    build_parser,
    check_init_weights,
    closes_run,
    local_copy,
    main,
    manifest_digest,
    prepare,
    read_fatal_record,
    take_previous_failure,
    write_fatal_record,
    write_run_record,
)
from tests.jobs import client_env, submit
from vl import tracking
from vl.checkpoint import complete_checkpoints
from vl.config import ExperimentConfig
from vl.data.shards import ShardCorruptError, read_manifest
from vl.data.synthetic import SyntheticConfig, generate
from vl.model import build_model

REPO = Path(__file__).resolve().parents[1]
DIMS = {"slowfast": 8, "clip": 8}
FAST = ["--set", "train.eval_every=1", "--set", "data.batch_size=8", "--set",
        "data.eval_batch_size=32"]

pytestmark = pytest.mark.integration


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _shard_to_s3(layout, prefix: str, stack_env: dict, rows_per_shard: int) -> str:
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


@pytest.fixture(scope="module")
def stack_env(local_stack_env: dict[str, str]) -> dict[str, str]:
    return client_env(local_stack_env)


@pytest.fixture(scope="module")
def shards(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """s3://vl-data/test_train_job/<uid> holding train/ (48 queries) and val/ (16 queries)."""
    layout = generate(
        SyntheticConfig("qvhighlights", videos=32, seed=3, dims=DIMS,
                        video_sets=("slowfast", "clip"), text_sets=("clip",), val_fraction=0.25),
        tmp_path_factory.mktemp("synthetic"),
    )
    return _shard_to_s3(layout, f"s3://vl-data/test_train_job/{_uid()}", stack_env, 12)


def _entrypoint(*args: str) -> list[str]:
    # The local head's PATH may not hold the venv: name its interpreter explicitly.
    return [sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml", *args]


def _s3(env: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def _checkpoints(env: dict[str, str], run_path: str) -> list[str]:
    fs = _s3(env)
    if not fs.exists(run_path):
        return []
    return sorted(p for p in fs.ls(run_path, refresh=True)
                  if Path(p).name.startswith("checkpoint_") and fs.exists(f"{p}/state.pt"))


def _checkpoint_folders(env: dict[str, str], run_path: str) -> list[str]:
    """The checkpoint folders under a run's storage that hold any object (SeaweedFS goes on
    listing a folder whose objects were deleted)."""
    fs = _s3(env)
    return sorted(Path(p).name for p in fs.ls(run_path, refresh=True)
                  if Path(p).name.startswith("checkpoint_") and fs.isdir(p)
                  and any(f.rstrip("/") != p.rstrip("/") for f in fs.find(p)))


def _newest_complete_epoch(env: dict[str, str], run_uri: str) -> int | None:
    """The epoch (0-based) of the newest complete (sealed) checkpoint in a run's storage."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        found = complete_checkpoints(run_uri)
    return found[-1][1]["epoch"] if found else None


def _epochs_trained(log: str) -> int:
    """Rank 0's progress lines ("epoch K/N loss ..."), one per epoch trained (without the log
    tail the CLI repeats after "Status message:")."""
    return len(re.findall(r"\bepoch \d+/\d+ loss ", log.split("Status message:")[0]))


def _continued_epochs(log: str) -> list[int]:
    """The 1-based epoch each (re)started worker group continued with, in order."""
    return [int(n) for n in re.findall(r"continuing with epoch (\d+)/\d+", log)]


def _job_client(env: dict[str, str]) -> JobSubmissionClient:
    """The job API client in-process, its token in an explicit header rather than RAY_AUTH_*
    in this process: Ray caches its auth mode per process, and other tests in the session run
    Ray with auth disabled."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"})


def _runs(experiment: str, name: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`vl.run_name` = '{name}'")


def test_submit_stop_resubmit_register_and_predict(shards, stack_env, mlflow_env, tmp_path,
                                                   monkeypatch):
    """The product path: ray job submit; `ray job stop` as soon as the first checkpoint is
    complete in storage (whether or not Ray Train recorded it yet); resubmit with the same name
    -> it resumes right after the newest complete checkpoint (nothing redone at eval_every=1),
    ONE MLflow run holds every epoch exactly once, the best checkpoint is registered as
    champion and the pyfunc loads and predicts."""
    name, model_name = f"e2e-{_uid()}", f"vl-test-{_uid()}"
    storage = "s3://vl-runs/test_train_job"
    epochs = 6
    entry = _entrypoint("--data", shards, "--storage", storage, "--name", name,
                        "--register-as", model_name, "--set", f"train.epochs={epochs}", *FAST)
    first = f"{name}-a"
    started = submit(stack_env, first, entry, wait=False)
    assert started.returncode == 0, started.stderr[-3000:]
    run_path = f"vl-runs/test_train_job/{name}"
    # The job API client in-process: stopping must come right after the first checkpoint (a
    # `ray job stop` subprocess takes seconds to import on a loaded machine).

    jobs = _job_client(stack_env)
    run_uri = f"{storage}/{name}"
    try:
        wait_for(lambda: _newest_complete_epoch(stack_env, run_uri) is not None, 180,
                 "first checkpoint", poll_s=0.2)
    finally:
        jobs.stop_job(first)
    wait_for(lambda: jobs.get_job_status(first).is_terminal(), 60, "the stopped job")
    assert jobs.get_job_status(first) == JobStatus.STOPPED
    checkpointed = _newest_complete_epoch(stack_env, run_uri)
    trained_first = _epochs_trained(jobs.get_job_logs(first))
    # the stopped job closed its MLflow run (KILLED), rather than leaving it RUNNING
    assert [r.info.status for r in _runs("videolights-smoke", name)] == ["KILLED"]

    done = submit(stack_env, f"{name}-b", entry)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    continued = _continued_epochs(log)
    assert continued, log[-5000:]
    first_epoch = continued[0]
    assert first_epoch == checkpointed + 2  # right after the newest complete checkpoint
    # Epochs the stopped job finished that the resumed one trained again: none at eval_every=1
    # (a line the stopped job's log lost would only lower the count).
    assert trained_first - (first_epoch - 1) <= 0
    assert _epochs_trained(log) == epochs - (first_epoch - 1)
    assert f"epoch {epochs}/{epochs}" in log

    # Checkpoints on S3: Ray's kept set (the best two and the latest), nothing else left
    # behind; the newest is the last epoch's and carries its evaluation.
    kept = _checkpoints(stack_env, run_path)
    assert 1 <= len(kept) <= 3
    assert _checkpoint_folders(stack_env, run_path) == [Path(p).name for p in kept]
    newest = json.loads(_s3(stack_env).cat_file(f"{kept[-1]}/metrics.json"))
    assert newest["epoch"] == epochs - 1 and "MR-full-R1_at_0.5" in newest

    # One MLflow run, FINISHED, with every epoch's metrics and the artifacts.
    runs = _runs("videolights-smoke", name)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(epochs))  # each epoch exactly once
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                            "MR-full-R1_at_0.5")) \
        == list(range(epochs))
    _assert_each_step_logged_once(run.info.run_id)
    for key in ("train_loss_span", "train_loss_saliency", "lr", "samples_per_s", "val_loss"):
        assert key in run.data.metrics, key
    assert any(key.startswith("system/cpu") for key in run.data.metrics)  # system metrics
    # The shard sets as dataset inputs, logged once although the run was submitted twice.
    inputs = {(d.dataset.name, d.dataset.digest, d.dataset.source)
              for d in run.inputs.dataset_inputs}
    assert inputs == {
        (f"qvhighlights-{context}", manifest_digest(read_manifest(f"{shards}/{split}")),
         json.dumps({"uri": f"{shards}/{split}"}))
        for context, split in (("training", "train"), ("validation", "val"))}

    smoke = ExperimentConfig.from_yaml("configs/smoke.yaml")
    assert run.data.params["model.hidden_dim"] == str(smoke.model.hidden_dim)  # flattened config
    assert not any("secret" in k.lower() or "SECRET" in v for k, v in run.data.params.items())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/curves.png", "plots/saliency_examples.png"} <= artifacts
    final = json.loads(Path(client.download_artifacts(
        run.info.run_id, "metrics/final_metrics.json", str(tmp_path))).read_text())
    assert final["selection_metric"] == "MR-full-R1_at_0.5"
    preds = client.download_artifacts(run.info.run_id, "predictions/val_predictions.jsonl",
                                       str(tmp_path))
    rows = [json.loads(line) for line in Path(preds).read_text().splitlines()]
    n_windows = smoke.model.num_queries  # one ranked window per decoder query
    assert len(rows) == 16 and all(len(r["pred_relevant_windows"]) == n_windows for r in rows)

    # The registry: version 1 is the champion; its pyfunc predicts on the held-out shards.
    version = client.get_model_version_by_alias(model_name, "champion")
    assert version.version == "1" and version.run_id == run.info.run_id

    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    inputs, _ = shard_inputs(f"{shards}/val", model.unwrap_python_model().cfg)
    out = model.predict(inputs)
    assert len(out) == 16 and {r["qid"] for r in out} == {r["qid"] for r in rows}
    pred_file = tmp_path / "pred.jsonl"
    assert predict_main(["--model", f"models:/{model_name}@champion", "--data", f"{shards}/val",
                         "--out", str(pred_file), "--gt"]) == 0
    assert len(pred_file.read_text().splitlines()) == 16


def _assert_each_step_logged_once(run_id: str) -> None:
    """Every metric key's history, in logging order, has strictly increasing steps: no epoch
    logged twice by a resumed attempt (MLflow cannot delete a metric point afterwards)."""
    client = MlflowClient()
    for key in client.get_run(run_id).data.metrics:
        history = sorted(client.get_metric_history(run_id, key),
                         key=lambda m: (m.timestamp, m.step))
        steps = [m.step for m in history]
        assert all(a < b for a, b in zip(steps, steps[1:])), f"{key}: steps {steps}"


def test_workers_lost_during_the_report_and_mid_epoch_resume_from_the_newest_checkpoint(
        shards, stack_env, mlflow_env):
    """Two faults in one job (eval_every=2 over 4 epochs, 3 steps per epoch, so epochs 1 and 3
    (0-based) checkpoint):

    1. scale.fail_at_report=2: rank 1 dies once rank 0's checkpoint of epoch 1 is complete in
       storage and before its own report reaches Ray Train, so the controller never records
       that checkpoint. The restarted group finds it in storage and continues with epoch 2
       (nothing redone; Ray's own latest checkpoint would be none, a restart from scratch) and
       reports it again so Ray keeps it.
    2. scale.fail_at_step=10: rank 1 exits hard inside epoch 3; the group restarts from that
       adopted checkpoint, so epoch 2 is trained (and offered to MLflow) a second time: at most
       eval_every - 1 epochs redone.

    Ray starts the group exactly three times (both ranks restore their checkpoint side by side
    without one reading a file the other is writing), one MLflow run holds every epoch's
    metrics exactly once, and a checkpoint folder whose upload never finished is removed."""
    name = f"faults-{_uid()}"
    epochs, eval_every, steps_per_epoch = 4, 2, 3  # 48 queries / 2 ranks / batch 8
    fail_at_report, fail_at_step = 2, 10  # the report of epoch 2 (1-based); global steps 9..11
    run_path = f"vl-runs/test_train_job/{name}"
    fs = _s3(stack_env)
    half = f"{run_path}/checkpoint_2000-01-01_00-00-00.000000"  # an upload cut short
    fs.pipe_file(f"{half}/state.pt", b"partial")
    entry = _entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", f"train.epochs={epochs}",
                        "--set", f"scale.fail_at_report={fail_at_report}",
                        "--set", f"scale.fail_at_step={fail_at_step}", *FAST,
                        "--set", f"train.eval_every={eval_every}")
    done = submit(stack_env, name, entry, env_vars={"RAY_DEDUP_LOGS": "0"})
    log = (done.stdout + done.stderr).split("Status message:")[0]
    assert done.returncode == 0, log[-5000:]
    assert f"[fault injection] rank 1 exits during the report of epoch {fail_at_report}" in log
    assert "not recorded by Ray Train" in log, log[-5000:]
    assert f"[fault injection] rank 1 exits at global step {fail_at_step}" in log
    assert log.count("Started training worker group of size") == 3, log[-5000:]
    # Both restarts continue with epoch 3 (1-based): after the adopted checkpoint of epoch 2.
    assert _continued_epochs(log) == [fail_at_report + 1] * 2, log[-5000:]
    redone = fail_at_step // steps_per_epoch - fail_at_report  # completed epochs trained again
    assert 0 <= redone <= eval_every - 1
    assert _epochs_trained(log) == epochs + redone

    # The adopted checkpoint (epoch 1) and the last (epoch 3) are kept; the cut-short one is gone.
    kept = _checkpoints(stack_env, run_path)
    assert not fs.exists(f"{half}/state.pt")
    assert [json.loads(fs.cat_file(f"{p}/metrics.json"))["epoch"] for p in kept] == [1, 3]
    assert _checkpoint_folders(stack_env, run_path) == [Path(p).name for p in kept]

    runs = _runs("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) \
        == list(range(epochs))  # each epoch exactly once
    assert [m.value for m in client.get_metric_history(run_id, "global_step")
            if m.step == 0] == [steps_per_epoch]
    assert sorted(m.step for m in client.get_metric_history(run_id, "MR-full-R1_at_0.5")) \
        == [1, 3]
    _assert_each_step_logged_once(run_id)


def test_a_lost_node_costs_its_rank_and_the_job_finishes_on_the_nodes_left(
        shards, stack_env, mlflow_env, ray_head, s3_server, mlflow_server):
    """A second Ray node (1 CPU) joins the head; scale.placement_strategy=SPREAD puts rank 1 on
    it; once the first checkpoint is complete in storage the node dies (its raylet and every
    process on it SIGKILLed, as a machine that is lost). Ray Train restarts the group on the
    head's 2 CPUs from the newest checkpoint, within scale.max_failures, and the job finishes:
    one MLflow run, every epoch's metrics exactly once."""
    name = f"node-{_uid()}"
    epochs = 4
    entry = _entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", f"train.epochs={epochs}",
                        "--set", "scale.placement_strategy=SPREAD", *FAST)
    jobs = _job_client(stack_env)
    node = start_ray_worker_node(ray_head, {**s3_server.env(), **mlflow_server.env()},
                                 num_cpus=1)
    try:
        started = submit(stack_env, name, entry, wait=False,
                         env_vars={"RAY_DEDUP_LOGS": "0"})
        assert started.returncode == 0, started.stderr[-3000:]
        wait_for(lambda: _newest_complete_epoch(stack_env, f"s3://vl-runs/test_train_job/{name}")
                 is not None, 180, "first checkpoint", poll_s=0.2)
        node.kill()
        wait_for(lambda: jobs.get_job_status(name).is_terminal(), 240, "the job")
    finally:
        node.stop()
    log = jobs.get_job_logs(name)
    assert jobs.get_job_status(name) == JobStatus.SUCCEEDED, log[-5000:]
    groups = log.split("Started training worker group of size")[1:]
    assert len(groups) == 2, log[-5000:]
    assert "node_rank=1" in groups[0] and "node_rank=1" not in groups[1], log[-5000:]
    continued = _continued_epochs(log)
    assert len(continued) == 1 and continued[0] >= 2, log[-5000:]
    runs = _runs("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert sorted(m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")) \
        == list(range(epochs))
    _assert_each_step_logged_once(run_id)


def test_each_rank_restores_from_a_copy_of_its_own(tmp_path):
    """Ray's `as_directory` hands every rank of a node the same temporary folder, and a late
    rank downloads into it again while another reads from it; `local_copy` gives each caller
    its own folder, whole, removed afterwards."""
    payload = os.urandom(1 << 16)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(payload)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    checkpoint = ray.train.Checkpoint(path="ckpt", filesystem=remote)
    with local_copy(checkpoint) as first, local_copy(checkpoint) as second:
        assert first != second
        assert (Path(first) / "state.pt").read_bytes() == payload
        assert (Path(second) / "state.pt").read_bytes() == payload
    assert not Path(first).exists() and not Path(second).exists()


@pytest.fixture(scope="module")
def nan_shards(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
               ) -> tuple[str, int]:
    """(prefix, qid): a small shard set whose train split holds one query with a NaN in its
    text features, as a broken feature extractor leaves it (12 train / 4 val queries)."""
    layout = generate(
        SyntheticConfig("qvhighlights", videos=8, seed=5, dims=DIMS,
                        video_sets=("slowfast", "clip"), text_sets=("clip",), val_fraction=0.25),
        tmp_path_factory.mktemp("synthetic-nan"),
    )
    qid = json.loads(layout.train_jsonl.read_text().splitlines()[3])["qid"]
    feature_file = layout.text_dirs[0] / f"qid{qid}.npz"
    with np.load(feature_file) as stored:
        arrays = dict(stored)
    arrays["last_hidden_state"][1, 0] = np.nan
    np.savez(feature_file, **arrays)
    prefix = f"s3://vl-data/test_train_job/nan-{_uid()}"
    return _shard_to_s3(layout, prefix, stack_env, 6), qid


def test_nan_loss_names_the_qid_and_is_not_retried(nan_shards, stack_env, mlflow_env):
    """A NaN in one query's features is a deterministic failure: the job exits non-zero with
    one line naming that qid, Ray starts the worker group at most twice (the restarted group
    finds the failure record and returns) although scale.max_failures=2 would allow three
    starts, and the MLflow run is FAILED with the message as its `vl.failure` tag."""
    prefix, qid = nan_shards
    name = f"nan-{_uid()}"
    entry = _entrypoint("--data", prefix, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", "train.epochs=2", "--set",
                        "scale.max_failures=2", *FAST)
    # The job's own log, every line kept (Ray folds identical lines of several processes into
    # one unless told not to), without the tail the CLI repeats after "Status message:".
    done = submit(stack_env, name, entry, env_vars={"RAY_DEDUP_LOGS": "0"})
    log = done.stdout.split("Status message:")[0]
    assert done.returncode != 0, log[-5000:]
    summary = [line for line in log.splitlines()
               if line.startswith("jobs.train: training stopped")]
    assert len(summary) == 1, log[-5000:]
    assert f"non-finite input features in qid(s) [{qid}]" in summary[0]
    assert "in the batch of qids [" in summary[0] and "not retried" in summary[0]
    assert log.count("Started training worker group of size") == 2, log[-5000:]
    assert log.count("not training again") == 1, log[-5000:]
    runs = _runs("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert f"qid(s) [{qid}]" in runs[0].data.tags["vl.failure"]


def test_a_failure_record_holds_one_line_and_lasts_one_submission(tmp_path):
    """A corrupt shard met in a DataLoader worker arrives with that worker's traceback in its
    message (torch's ExceptionWrapper, as the loader re-raises it): the record keeps its one
    line. A resubmission takes the record (to print it) and removes it, so its own worker
    groups train again."""
    run_uri = str(tmp_path / "run")
    try:
        raise ShardCorruptError("shard s3://b/p/shard-00002.parquet: row group 1 does not decode")
    except ShardCorruptError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ShardCorruptError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value)
    write_fatal_record(run_uri, 1, caught.value)
    assert read_fatal_record(run_uri)["message"] == (
        "vl.data.shards.ShardCorruptError: shard s3://b/p/shard-00002.parquet: row group 1 does "
        "not decode")
    assert take_previous_failure(run_uri)["rank"] == 1
    assert read_fatal_record(run_uri) is None and take_previous_failure(run_uri) is None


# ---- bad input fails fast, before any worker (no Ray needed) --------------------------------
def _train_main(argv: list[str], capsys) -> tuple[int, str]:

    code = main(argv)
    assert not ray.is_initialized()  # nothing Ray was started
    return code, capsys.readouterr().err


def test_missing_shard_prefix_fails_fast(s3_env, mlflow_env, capsys):
    t0 = time.monotonic()
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data",
                             "s3://vl-data/test_train_job/does-not-exist"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no shard manifest at s3://vl-data/test_train_job/does-not-exist/train" in err
    assert "jobs.shard" in err
    assert time.monotonic() - t0 < 30


def test_missing_storage_bucket_fails_fast(shards, stack_env, mlflow_env, capsys):
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", shards,
                             "--storage", "s3://no-such-bucket-vl/runs"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "bucket 'no-such-bucket-vl' does not exist" in err


def test_unreachable_mlflow_fails_fast(shards, stack_env, mlflow_env, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", shards], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"MLflow tracking server at {dead} is unreachable" in err
    assert "MLFLOW_TRACKING_URI" in err


def test_config_typo_fails_fast_through_the_cli(tmp_path):
    """The real CLI: exit 2, one line naming the key and the file, no traceback."""
    bad = tmp_path / "typo.yaml"
    bad.write_text("preset: tiny\ntrain:\n  epoch: 3\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(bad), "--data",
                           "s3://vl-data/x"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{bad}: unknown key 'train.epoch' (did you mean 'train.epochs'?)" in lines[0]
    assert time.monotonic() - t0 < 60


def test_help_explains_every_option():
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for option in ("--config", "--set", "--data", "--storage", "--name", "--register-as"):
        assert option in proc.stdout
    assert "resume" in proc.stdout.lower()


def _smoke_model_state(shards: str, *overrides: str) -> dict:
    """A state_dict of the smoke model with the shards' input dims (plus overrides)."""
    cfg = ExperimentConfig.from_yaml("configs/smoke.yaml",
                                     [f"data.train={shards}/train", f"data.val={shards}/val"])
    shape = check_data(cfg)
    cfg = ExperimentConfig.from_yaml(
        "configs/smoke.yaml",
        [f"model.video_dim={shape.video_dim}", f"model.text_dim={shape.text_dim}", *overrides],
    )
    return build_model(cfg.model).state_dict(), cfg


def test_init_from_with_wrong_shapes_fails_fast_naming_tensors(shards, stack_env, mlflow_env,
                                                               tmp_path, capsys):
    state, _ = _smoke_model_state(shards, "model.dim_feedforward=48")
    path = tmp_path / "pretrained.pt"
    torch.save({"model": state}, path)
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", shards,
                             "--init-from", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--init-from {path}" in err and "linear1.weight" in err


def test_init_from_missing_source_fails_fast(shards, stack_env, mlflow_env, tmp_path, capsys):
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", shards,
                             "--init-from", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "cannot load weights" in err


def test_init_from_compatible_weights_passes_preflight(shards, stack_env, mlflow_env, tmp_path):
    state, cfg = _smoke_model_state(shards)
    path = tmp_path / "pretrained.pt"
    torch.save({"model": state}, path)
    check_init_weights(cfg, str(path))  # no PreflightError


# ---- a resume is the run it claims to be (driver level: no worker starts) -------------------
def _resume_args(shards: str, storage: Path, name: str, *extra: str) -> list[str]:
    return ["--config", "configs/smoke.yaml", "--data", shards, "--storage", str(storage),
            "--name", name, *extra]


def test_resume_with_another_config_is_refused_naming_the_keys(shards, stack_env, mlflow_env,
                                                               tmp_path, capsys):
    name = f"drift-{_uid()}"
    plan = prepare(build_parser().parse_args(_resume_args(shards, tmp_path, name)))
    write_run_record(plan)  # what the first submission wrote before training
    run_id = tracking.start_or_resume_run(plan.experiment, name)
    tracking.finish_run(run_id, "KILLED")

    code, err = _train_main(_resume_args(shards, tmp_path, name, "--set", "train.lr=0.001",
                                         "--set", "train.epochs=9"), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"train.lr: {plan.cfg.train.lr!r} -> 0.001" in err and "train.epochs: " in err
    assert "--allow-config-change train.epochs,train.lr" in err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"  # the run is untouched

    code, err = _train_main(_resume_args(shards, tmp_path, name, "--experiment", "elsewhere"),
                            capsys)
    assert code == 2 and "experiment: 'videolights-smoke' -> 'elsewhere'" in err

    allowed = prepare(build_parser().parse_args(_resume_args(
        shards, tmp_path, name, "--set", "train.epochs=9",
        "--allow-config-change", "train.epochs")))
    assert allowed.changed == ["train.epochs"] and allowed.finished is None

    plan.shards["val"] = "0" * 64  # the run started on other val data under the same prefix
    write_run_record(plan)
    code, err = _train_main(_resume_args(shards, tmp_path, name), capsys)
    assert code == 2 and "shards.val: '0000" in err


def test_resubmitting_a_finished_run_is_a_no_op(shards, stack_env, mlflow_env, tmp_path,
                                                capsys):
    name = f"done-{_uid()}"
    plan = prepare(build_parser().parse_args(_resume_args(shards, tmp_path, name)))
    write_run_record(plan, finished={"run_name": name, "version": "1"})
    code = main(_resume_args(shards, tmp_path, name))
    out = capsys.readouterr().out
    assert code == 0 and not ray.is_initialized()
    assert "already finished" in out and '"version": "1"' in out
    assert _runs_or_none(plan.experiment, name) == []  # no MLflow run was opened


def _runs_or_none(experiment: str, name: str) -> list:
    if MlflowClient().get_experiment_by_name(experiment) is None:
        return []
    return _runs(experiment, name)


@pytest.mark.parametrize("override,key", [("train.lr=nan", "train.lr"),
                                          ("train.lr=0", "train.lr"),
                                          ("train.lr_drop=0", "train.lr_drop"),
                                          ("data.batch_size=-8", "data.batch_size"),
                                          ("scale.placement_strategy=ANYWHERE",
                                           "scale.placement_strategy")])
def test_impossible_training_values_exit_2_before_anything(override, key, capsys):
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", "s3://vl-data/x",
                             "--set", override], capsys)
    assert code == 2 and err.count("\n") == 1 and f"key '{key}'" in err



def test_bad_s3_retry_setting_exits_2_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "zero")
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", "s3://vl-data/x"],
                            capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "AWS_MAX_ATTEMPTS='zero': expected a positive integer" in err


def test_check_capacity_counts_whole_workers_per_node():
    check_capacity(2, 1.0, [2.0])
    check_capacity(3, 1.5, [3.0, 1.5])
    with pytest.raises(PreflightError, match=r"too small .*num_workers=2 x .*cpus_per_worker=1\.5"):
        check_capacity(2, 1.5, [2.0, 1.0])  # 3.0 CPUs in total, but one worker per node fits
    check_capacity(2, 1.0, [4.0, 4.0], gpus_per_worker=1.0, node_gpus=[2.0, 0.0])
    with pytest.raises(PreflightError, match=r"have 4, 4 CPUs and 1, 0 GPUs \(1 of 2 fit\)"):
        check_capacity(2, 1.0, [4.0, 4.0], gpus_per_worker=1.0, node_gpus=[1.0, 0.0])


def test_direct_run_joins_the_stack_and_fails_fast_when_it_is_too_small(shards, stack_env):
    """README: after `stack up`, RAY_ADDRESS is the dashboard URL; `python -m jobs.train` run
    directly joins the head anyway, and a cluster too small for the workers fails in seconds
    with one line instead of waiting for resources forever (no MLflow run opened)."""
    name = f"small-{_uid()}"
    t0 = time.monotonic()
    proc = subprocess.run(_entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                                      "--name", name, "--set", "scale.num_workers=5"),
                          cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jobs.train:")]
    assert len(lines) == 1 and "too small for scale.num_workers=5" in lines[0], proc.stderr
    assert time.monotonic() - t0 < 90
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(key, stack_env[key])
        assert _runs_or_none("videolights-smoke", name) == []


@pytest.mark.parametrize("ending,status", [("error", "FAILED"), ("ctrl-c", "KILLED"),
                                           ("sigterm", "KILLED")])
def test_a_job_that_ends_closes_its_run(mlflow_env, ending, status):
    """However the driver ends (an error, Ctrl-C, `ray job stop`'s SIGTERM), its MLflow run is
    FAILED or KILLED, never left RUNNING."""
    run_id = tracking.start_or_resume_run(f"close-{_uid()}", "r")
    expected = {"error": ValueError, "ctrl-c": KeyboardInterrupt, "sigterm": SystemExit}[ending]
    with pytest.raises(expected), closes_run(run_id):
        if ending == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
        raise {"error": ValueError, "ctrl-c": KeyboardInterrupt}[ending]()
    assert MlflowClient().get_run(run_id).info.status == status
