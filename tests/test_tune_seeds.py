"""tune.seeds submitted with `ray job submit`: two seeds of the smoke config trained as Tune
trials of jobs.train, child runs of one MLflow parent whose mean/std metrics are the seeds'."""

from __future__ import annotations

import json
import statistics
import sys
import uuid

import pytest
from mlflow.tracking import MlflowClient

from jobs.shard import run as shard
from tests.jobs import client_env, submit
from vl.data.synthetic import SyntheticConfig, generate

pytestmark = pytest.mark.integration


def test_two_seeds_train_as_child_runs_and_the_parent_has_their_spread(local_stack_env, tmp_path,
                                                                       monkeypatch):
    for key, value in local_stack_env.items():
        monkeypatch.setenv(key, value)
    tag = uuid.uuid4().hex[:8]
    layout = generate(SyntheticConfig(
        "qvhighlights", videos=24, seed=5, dims={"slowfast": 8, "clip": 8},
        video_sets=("slowfast", "clip"), text_sets=("clip",), val_fraction=0.25),
        tmp_path / "raw")  # fmt: skip
    data = f"s3://vl-data/test_tune_seeds/{tag}"
    for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
        shard(dataset="qvhighlights", annotations=str(jsonl), video_features=layout.video_arg(),
              text_features=layout.text_arg(), out=f"{data}/{split}", ray_mode="off",
              log=lambda *_: None)  # fmt: skip
    experiment = f"test-tune-seeds-{tag}"
    entry = [sys.executable, "-m", "tune.seeds", "--config", "configs/smoke.yaml", "--data", data,
             "--seeds", "2", "--first-seed", "3", "--storage", f"s3://vl-runs/test_tune_seeds/{tag}",
             "--name", "seeds", "--experiment", experiment,
             "--set", "train.epochs=2", "--set", "train.eval_every=1",
             "--set", "data.batch_size=8", "--set", "scale.num_workers=1",
             "--set", "scale.cpus_per_worker=0.8"]
    done = submit(client_env(local_stack_env), f"seeds-{tag}", entry, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    result = json.loads([ln for ln in log.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert result["seeds"] == [3, 4]

    client = MlflowClient(local_stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50)
    parents = [r for r in runs if r.data.tags.get("vl.kind") == "seeds"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["vl.seed"]) for r in children) == [3, 4]
    assert all(r.info.status == "FINISHED" for r in children)

    # The parent's spread is the seeds' own: recompute it from the children's final metrics.
    key = "MR-full-R1_at_0.5"
    values = []
    for r in children:
        path = client.download_artifacts(r.info.run_id, "metrics/final_metrics.json",
                                         str(tmp_path))
        with open(path) as f:
            values.append(float(json.load(f)["metrics"][key]))
    assert parent.data.metrics[f"mean_{key}"] == pytest.approx(statistics.fmean(values))
    assert parent.data.metrics[f"std_{key}"] == pytest.approx(statistics.stdev(values))
    table = client.download_artifacts(parent.info.run_id, "seeds/summary.md", str(tmp_path))
    with open(table) as f:
        text = f.read()
    assert "| seed 3 | seed 4 |" in text and f"| {key} |" in text
