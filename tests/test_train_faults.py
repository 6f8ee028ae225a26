"""jobs.train under lost workers and a lost node, on the real local stack: the job goes on from
the newest complete checkpoint, redoes at most what the checkpoint interval allows, and its one
MLflow run holds every epoch exactly once. Its own module so that pytest-xdist runs these long
jobs beside the rest of the train-job tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus

from cluster.local.common import wait_for
from cluster.local.ray_head import start_ray_worker_node
from tests.jobs import client_env, submit
from tests.train_runs import (
    FAST,
    assert_each_step_logged_once,
    checkpoint_folders,
    checkpoints,
    continued_epochs,
    entrypoint,
    epochs_trained,
    job_client,
    make_shards,
    newest_complete_epoch,
    runs_named,
    s3,
    uid,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack_env(local_stack_env: dict[str, str]) -> dict[str, str]:
    return client_env(local_stack_env)


@pytest.fixture(scope="module")
def shards(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_shards(stack_env, tmp_path_factory.mktemp("synthetic"))


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
    name = f"faults-{uid()}"
    epochs, eval_every, steps_per_epoch = 4, 2, 3  # 48 queries / 2 ranks / batch 8
    fail_at_report, fail_at_step = 2, 10  # the report of epoch 2 (1-based); global steps 9..11
    run_path = f"vl-runs/test_train_job/{name}"
    fs = s3(stack_env)
    half = f"{run_path}/checkpoint_2000-01-01_00-00-00.000000"  # an upload cut short
    fs.pipe_file(f"{half}/state.pt", b"partial")
    entry = entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
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
    assert continued_epochs(log) == [fail_at_report + 1] * 2, log[-5000:]
    redone = fail_at_step // steps_per_epoch - fail_at_report  # completed epochs trained again
    assert 0 <= redone <= eval_every - 1
    assert epochs_trained(log) == epochs + redone

    # The adopted checkpoint (epoch 1) and the last (epoch 3) are kept; the cut-short one is gone.
    kept = checkpoints(stack_env, run_path)
    assert not fs.exists(f"{half}/state.pt")
    assert [json.loads(fs.cat_file(f"{p}/metrics.json"))["epoch"] for p in kept] == [1, 3]
    assert checkpoint_folders(stack_env, run_path) == [Path(p).name for p in kept]

    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) \
        == list(range(epochs))  # each epoch exactly once
    assert [m.value for m in client.get_metric_history(run_id, "global_step")
            if m.step == 0] == [steps_per_epoch]
    assert sorted(m.step for m in client.get_metric_history(run_id, "MR-full-R1_at_0.5")) \
        == [1, 3]
    assert_each_step_logged_once(run_id)


def test_a_lost_node_costs_its_rank_and_the_job_finishes_on_the_nodes_left(
        shards, stack_env, mlflow_env, ray_head, s3_server, mlflow_server):
    """A second Ray node (1 CPU) joins the head; scale.placement_strategy=SPREAD puts rank 1 on
    it; once the first checkpoint is complete in storage the node dies (its raylet and every
    process on it SIGKILLed, as a machine that is lost). Ray Train restarts the group on the
    head's 2 CPUs from the newest checkpoint, within scale.max_failures, and the job finishes:
    one MLflow run, every epoch's metrics exactly once."""
    name = f"node-{uid()}"
    epochs = 4
    entry = entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", f"train.epochs={epochs}",
                        "--set", "scale.placement_strategy=SPREAD", *FAST)
    jobs = job_client(stack_env)
    node = start_ray_worker_node(ray_head, {**s3_server.env(), **mlflow_server.env()},
                                 num_cpus=1)
    try:
        started = submit(stack_env, name, entry, wait=False,
                         env_vars={"RAY_DEDUP_LOGS": "0"})
        assert started.returncode == 0, started.stderr[-3000:]
        wait_for(lambda: newest_complete_epoch(stack_env, f"s3://vl-runs/test_train_job/{name}")
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
    continued = continued_epochs(log)
    assert len(continued) == 1 and continued[0] >= 2, log[-5000:]
    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert sorted(m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")) \
        == list(range(epochs))
    assert_each_step_logged_once(run_id)
