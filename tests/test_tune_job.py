"""tune.tvsum through `ray job submit` on the local Ray head, with a trial that crashes once on
purpose and is retried from its checkpoint, and one whose loss turns NaN, which ends that trial
at once (a retry would diverge again); the search goes on."""

from __future__ import annotations

import json
import sys
import uuid

import pytest
from mlflow.tracking import MlflowClient

from jobs.shard import run as shard
from tests.jobs import client_env, submit
from vl.data.synthetic import TINY_DIMS, SyntheticConfig, generate

SMOKE = "configs/tvsum_search_smoke.yaml"
EPOCHS = 8
FAULT_EPOCH = 5  # after the evaluations (and checkpoints) of epochs 2 and 4
NAN_EPOCH = 3  # after the evaluation of epoch 2

pytestmark = pytest.mark.integration


def test_search_submitted_as_a_ray_job_survives_a_crashing_trial(local_stack_env, tmp_path,
                                                                 monkeypatch):

    for key, value in local_stack_env.items():
        monkeypatch.setenv(key, value)
    tag = uuid.uuid4().hex[:8]
    layout = generate(SyntheticConfig(
        "tvsum", videos=5, seed=2, dims=dict(TINY_DIMS), video_sets=("i3d",),
        text_sets=("clip",), tvsum_domain_concepts=True), tmp_path / "raw")  # fmt: skip
    data = f"s3://vl-data/test_tune_job/{tag}"
    for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
        shard(dataset="tvsum", annotations=str(jsonl), video_features=layout.video_arg(),
              text_features=layout.text_arg(), out=f"{data}/{split}", ray_mode="off",
              log=lambda *_: None)  # fmt: skip
    experiment = f"test-tune-job-{tag}"
    # Two trials: the first two corners of the box, both at hl 5 and scsl 1: the one at al 0.1
    # crashes once, the one at al 0.8 meets NaN features.
    entry = [sys.executable, "-m", "tune.tvsum", "--config", SMOKE, "--data", data,
             "--domains", "VT", "--features", "i3d", "--search", "optuna", "--scheduler", "none",
             "--num-samples", "2", "--epochs", str(EPOCHS), "--max-concurrent", "1",
             "--storage", f"s3://vl-runs/test_tune_job/{tag}", "--name", "job",
             "--experiment", experiment, "--registered-prefix", f"test-tune-job-{tag}"]
    done = submit(client_env(local_stack_env), f"tune-{tag}", entry, timeout=800,
                  env_vars={"VL_TUNE_FAULT": f"once:{FAULT_EPOCH}:5:0.1,nan:{NAN_EPOCH}:5:0.8"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert f"injected fault in domain VT at epoch {FAULT_EPOCH}" in log, log[-5000:]
    diverged = [line for line in log.splitlines() if "(diverged): non-finite loss" in line]
    assert len(diverged) == 1 and f"non-finite loss at epoch {NAN_EPOCH}" in diverged[0] \
        and "non-finite input features in qid(s)" in diverged[0], log[-5000:]
    summary_line = [line for line in log.splitlines() if line.startswith('{"interrupted"')]
    summary = json.loads(summary_line[-1])
    assert summary["interrupted"] is False and summary["best"]["VT"] is not None

    client = MlflowClient(local_stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("vl.kind") == "tvsum-domain-search"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 2  # a retry continues its trial's run, it does not add one
    by_al = {float(c.data.params["loss.al_coef"]): c for c in children}
    crashed, nan = by_al[0.1], by_al[0.8]
    assert crashed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(crashed.info.run_id, "top5_map")]
    assert max(steps) == EPOCHS  # trained to the end after the crash
    assert len(steps) == len(set(steps)), steps  # each epoch logged once despite the retry
    # The diverged trial: FAILED at once, its error on the run; not retried (a retry from its
    # epoch-2 checkpoint would have logged the line again and ended as Tune's error).
    assert nan.info.status == "FAILED"
    assert nan.data.tags["vl.trial_status"] == "diverged"
    assert nan.data.tags["vl.diverged"].startswith(f"non-finite loss at epoch {NAN_EPOCH}")
    assert [m.step for m in client.get_metric_history(nan.info.run_id, "top5_map")] == [2]
    version = client.get_model_version_by_alias(f"test-tune-job-{tag}-VT", "champion")
    assert version.run_id == parent[0].data.tags["vl.registered_from_run"]
