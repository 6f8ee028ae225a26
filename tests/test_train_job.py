"""jobs.train against the real local stack: ray job submit, stop and resubmit, the registry, a
NaN loss, and bad input failing fast before any worker starts (lost workers and nodes:
test_train_faults.py).

One small synthetic QVHighlights-shaped dataset (tiny dims) is sharded to S3 once per module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pyarrow.fs
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus
from torch._utils import ExceptionWrapper

from cluster.local.common import free_port, wait_for
from jobs.predict import main as predict_main
from jobs.predict import shard_inputs
from jobs.preflight import PreflightError, check_capacity, check_data
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
from tests.jobs import submit
from tests.train_runs import (
    DIMS,
    FAST,
    assert_each_step_logged_once,
    checkpoint_folders,
    checkpoints,
    continued_epochs,
    entrypoint,
    epochs_trained,
    job_client,
    newest_complete_epoch,
    runs_named,
    s3,
    shard_to_s3,
    uid,
)
from vl import tracking
from vl.config import ExperimentConfig
from vl.data.shards import MANIFEST_NAME, ShardCorruptError, ShardManifest, read_manifest
from vl.data.synthetic import SyntheticConfig, generate
from vl.model import build_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_submit_stop_resubmit_register_and_predict(shards, stack_env, mlflow_env, tmp_path,
                                                   monkeypatch):
    """The product path: ray job submit; `ray job stop` as soon as the first checkpoint is
    complete in storage (whether or not Ray Train recorded it yet); resubmit with the same name
    -> it resumes right after the newest complete checkpoint (nothing redone at eval_every=1),
    ONE MLflow run holds every epoch exactly once, the best checkpoint is registered as
    champion and the pyfunc loads and predicts. The first submission asks for one epoch less;
    the resubmission extends it with --allow-config-change train.epochs (the param keeps its
    first value, the change is a tag)."""
    name, model_name = f"e2e-{uid()}", f"vl-test-{uid()}"
    storage = "s3://vl-runs/test_train_job"
    epochs = 6
    entry = entrypoint("--data", shards, "--storage", storage, "--name", name,
                        "--register-as", model_name, "--set", f"train.epochs={epochs - 1}",
                        *FAST)
    first = f"{name}-a"
    started = submit(stack_env, first, entry, wait=False)
    assert started.returncode == 0, started.stderr[-3000:]
    run_path = f"vl-runs/test_train_job/{name}"
    # The job API client in-process: stopping must come right after the first checkpoint (a
    # `ray job stop` subprocess takes seconds to import on a loaded machine).

    jobs = job_client(stack_env)
    run_uri = f"{storage}/{name}"
    try:
        # a running run asks the autoscaler for its workers (what `ray status` lists)
        wait_for(lambda: "request_resources()" in cluster_status(stack_env), 120,
                 "the run's resource request")
        wait_for(lambda: newest_complete_epoch(stack_env, run_uri) is not None, 180,
                 "first checkpoint", poll_s=0.2)
    finally:
        jobs.stop_job(first)
    wait_for(lambda: jobs.get_job_status(first).is_terminal(), 60, "the stopped job")
    assert jobs.get_job_status(first) == JobStatus.STOPPED
    # the stopped run no longer asks the autoscaler for its workers (`ray status`)
    wait_for(lambda: "request_resources()" not in cluster_status(stack_env), 30,
             "the stopped run's resource request withdrawn")
    checkpointed = newest_complete_epoch(stack_env, run_uri)
    trained_first = epochs_trained(jobs.get_job_logs(first))
    # the stopped job closed its MLflow run (KILLED), rather than leaving it RUNNING
    assert [r.info.status for r in runs_named("videolights-smoke", name)] == ["KILLED"]

    done = submit(stack_env, f"{name}-b", [*entry, "--set", f"train.epochs={epochs}",
                                           "--allow-config-change", "train.epochs"])
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    continued = continued_epochs(log)
    assert continued, log[-5000:]
    first_epoch = continued[0]
    assert first_epoch == checkpointed + 2  # right after the newest complete checkpoint
    # Epochs the stopped job finished that the resumed one trained again: none at eval_every=1
    # (a line the stopped job's log lost would only lower the count).
    assert trained_first - (first_epoch - 1) <= 0
    assert epochs_trained(log) == epochs - (first_epoch - 1)
    assert f"epoch {epochs}/{epochs}" in log

    # Checkpoints on S3: Ray's kept set (the best two and the latest), nothing else left
    # behind; the newest is the last epoch's and carries its evaluation.
    kept = checkpoints(stack_env, run_path)
    assert 1 <= len(kept) <= 3
    assert checkpoint_folders(stack_env, run_path) == [Path(p).name for p in kept]
    newest = json.loads(s3(stack_env).cat_file(f"{kept[-1]}/metrics.json"))
    assert newest["epoch"] == epochs - 1 and "MR-full-R1_at_0.5" in newest

    # One MLflow run, FINISHED, with every epoch's metrics and the artifacts.
    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(epochs))  # each epoch exactly once
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                            "MR-full-R1_at_0.5")) \
        == list(range(epochs))
    assert_each_step_logged_once(run.info.run_id)
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
    assert run.data.params["train.epochs"] == str(epochs - 1)  # params are immutable
    assert [v for k, v in run.data.tags.items() if k.startswith("vl.config_change.")] \
        == ["train.epochs"]
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


def cluster_status(env: dict[str, str]) -> str:
    """The text `ray status` prints, from the head's dashboard (no Ray client in this
    process)."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{env['RAY_ADDRESS']}/api/cluster_status?format=1",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]["clusterStatus"] or ""


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
    prefix = f"s3://vl-data/test_train_job/nan-{uid()}"
    return shard_to_s3(layout, prefix, stack_env, 6), qid


def test_nan_loss_names_the_qid_and_is_not_retried(nan_shards, stack_env, mlflow_env):
    """A NaN in one query's features is a deterministic failure: the job exits non-zero with
    one line naming that qid, Ray starts the worker group at most twice (the restarted group
    finds the failure record and returns) although scale.max_failures=2 would allow three
    starts, and the MLflow run is FAILED with the message as its `vl.failure` tag."""
    prefix, qid = nan_shards
    log, summary, tags = failed_job(stack_env, prefix, f"nan-{uid()}", epochs=2, max_failures=2)
    assert f"non-finite input features in qid(s) [{qid}]" in summary
    assert "in the batch of qids [" in summary
    assert log.count("Started training worker group of size") == 2, log[-5000:]
    assert log.count("not training again") == 1, log[-5000:]
    assert f"qid(s) [{qid}]" in tags["vl.failure"]


def failed_job(stack_env: dict[str, str], prefix: str, name: str, epochs: int,
               max_failures: int) -> tuple[str, str, dict[str, str]]:
    """Submit a train job on `prefix` that must stop on a deterministic error: (the job's log,
    its one summary line, the tags of its one MLflow run, which is FAILED). The log keeps
    every line (Ray folds identical lines of several processes into one unless told not to),
    without the tail the CLI repeats after "Status message:"."""
    entry = entrypoint("--data", prefix, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", f"train.epochs={epochs}", "--set",
                        f"scale.max_failures={max_failures}", *FAST)
    done = submit(stack_env, name, entry, env_vars={"RAY_DEDUP_LOGS": "0"})
    log = done.stdout.split("Status message:")[0]
    assert done.returncode != 0, log[-5000:]
    summary = [line for line in log.splitlines() if line.startswith("jobs.train: training")]
    assert len(summary) == 1, log[-5000:]
    assert summary[0].startswith("jobs.train: training stopped on a deterministic error, not "
                                 "retried"), summary
    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    return log, summary[0], runs[0].data.tags


@pytest.fixture(scope="module")
def corrupt_shards(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                   ) -> tuple[str, str]:
    """(prefix, shard uri): a small shard set on S3 whose first train shard had one byte
    flipped after it was written (its manifest entry still holds the original size and
    sha256), as a bad disk or a partial overwrite leaves it."""
    layout = generate(
        SyntheticConfig("qvhighlights", videos=8, seed=7, dims=DIMS,
                        video_sets=("slowfast", "clip"), text_sets=("clip",), val_fraction=0.25),
        tmp_path_factory.mktemp("synthetic-corrupt"),
    )
    prefix = shard_to_s3(layout, f"s3://vl-data/test_train_job/corrupt-{uid()}", stack_env, 6)
    fs = s3(stack_env)
    manifest = ShardManifest.from_json(fs.cat_file(f"{prefix}/train/{MANIFEST_NAME}").decode())
    uri = f"{prefix}/train/{manifest.shards[0].path}"
    data = bytearray(fs.cat_file(uri))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(uri, bytes(data))
    return prefix, uri


def test_a_corrupt_shard_names_itself_and_is_not_retried(corrupt_shards, stack_env,
                                                          mlflow_env):
    """A shard whose bytes no longer match its manifest is a deterministic failure like a NaN
    (whose test shows that the restarted group does not train again): the failing rank records
    it, so the job ends with the "deterministic error, not retried" line naming the shard, not
    the line of a failure Ray gave up on (scale.max_failures=0 keeps this to one worker-group
    start), and the MLflow run is FAILED with the line as `vl.failure`."""
    prefix, uri = corrupt_shards
    _, summary, tags = failed_job(stack_env, prefix, f"corrupt-{uid()}", epochs=1,
                                  max_failures=0)
    assert f"checksum mismatch for shard {uri}" in summary
    assert uri in tags["vl.failure"]


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


def test_more_ranks_than_row_groups_fails_fast_naming_the_workers(shards, stack_env, mlflow_env,
                                                                   capsys):
    """More ranks than the train shards have row groups: some rank would train on nothing
    (and wait forever in the first all-reduce). Refused before Ray, naming scale.num_workers and
    the cure."""
    groups = sum(s.num_row_groups for s in read_manifest(f"{shards}/train").shards)
    workers = groups + 1
    code, err = _train_main(["--config", "configs/smoke.yaml", "--data", shards,
                             "--set", f"scale.num_workers={workers}"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "a rank would get no samples" in err and f"(scale.num_workers={workers})" in err
    assert "--rows-per-shard" in err


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
    name = f"drift-{uid()}"
    plan = prepare(build_parser().parse_args(_resume_args(shards, tmp_path, name)))
    write_run_record(plan)  # what the first submission wrote before training
    run_id = tracking.start_or_resume_run(plan.experiment, name)
    tracking.finish_run(run_id, "KILLED")

    code, err = _train_main(_resume_args(shards, tmp_path, name, "--set", "train.lr=0.001",
                                         "--set", "train.epochs=9"), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"train.lr: {plan.cfg.train.lr!r} -> 0.001" in err and "train.epochs: " in err
    assert "--allow-config-change train.epochs to accept" in err
    assert "train.lr cannot change on a resume" in err and "--init-from" in err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"  # the run is untouched

    code, err = _train_main(_resume_args(shards, tmp_path, name, "--experiment", "elsewhere"),
                            capsys)
    assert code == 2 and "experiment: 'videolights-smoke' -> 'elsewhere'" in err

    allowed = prepare(build_parser().parse_args(_resume_args(
        shards, tmp_path, name, "--set", "train.epochs=9",
        "--allow-config-change", "train.epochs")))
    assert allowed.changed == ["train.epochs"] and allowed.finished is None
    code, err = _train_main(_resume_args(shards, tmp_path, name, "--set", "train.lr=0.001",
                                         "--allow-config-change", "train.lr"), capsys)
    assert code == 2 and "train.lr cannot change on a resume" in err

    plan.shards["val"] = "0" * 64  # the run started on other val data under the same prefix
    write_run_record(plan)
    code, err = _train_main(_resume_args(shards, tmp_path, name), capsys)
    assert code == 2 and "shards.val: '0000" in err


def test_resubmitting_a_finished_run_is_a_no_op(shards, stack_env, mlflow_env, tmp_path,
                                                capsys):
    name = f"done-{uid()}"
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
    return runs_named(experiment, name)


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
    name = f"small-{uid()}"
    t0 = time.monotonic()
    proc = subprocess.run(entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                                      "--name", name, "--set", "scale.num_workers=4"),
                          cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jobs.train:")]
    assert len(lines) == 1 and "too small for scale.num_workers=4" in lines[0], proc.stderr
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
    run_id = tracking.start_or_resume_run(f"close-{uid()}", "r")
    expected = {"error": ValueError, "ctrl-c": KeyboardInterrupt, "sigterm": SystemExit}[ending]
    with pytest.raises(expected), closes_run(run_id):
        if ending == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
        raise {"error": ValueError, "ctrl-c": KeyboardInterrupt}[ending]()
    assert MlflowClient().get_run(run_id).info.status == status
