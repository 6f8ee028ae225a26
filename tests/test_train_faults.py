"""jobs.train under lost workers and a lost node, on the real local stack: the job goes on from
the newest complete checkpoint, redoes at most what the checkpoint interval allows, and its one
MLflow run holds every epoch exactly once. Its own module so that pytest-xdist runs these long
jobs beside the rest of the train-job tests."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus

from cluster.local.common import wait_for
from cluster.local.ray_head import start_ray_worker_node, train_worker_pids
from jobs.train import hold_marker
from tests.jobs import submit
from tests.train_runs import (
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
    uid,
)

pytestmark = pytest.mark.integration


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
    # three worker-group starts: minutes on a loaded 2-core machine
    done = submit(stack_env, name, entry, env_vars={"RAY_DEDUP_LOGS": "0"}, timeout=600)
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


def test_rank_0_killed_from_outside_restarts_and_max_failures_ends_the_run_in_one_line(
        shards, stack_env, mlflow_env, ray_head):
    """scale.max_failures=1 allows one restart. scale.hold_at_step=5 stops rank 1 in the
    middle of epoch 1 (0-based; 3 steps per epoch, a checkpoint after every epoch) and there
    rank 0 (the chief: it evaluates, checkpoints and logs) is SIGKILLed from outside, as the
    OOM killer would: the group restarts from epoch 0's checkpoint. In the restarted group
    rank 1 exits at step 8 (scale.fail_at_step), a second failure: Ray Train gives up, no third
    start, and the job ends with one line naming the ranks and the retry budget, its MLflow run
    FAILED with that line as `vl.failure`, epochs 0 and 1 each logged once."""
    name = f"rank0-{uid()}"
    hold_at, fail_at = 5, 8
    run_uri = f"s3://vl-runs/test_train_job/{name}"
    entry = entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", "train.epochs=4", "--set", "scale.max_failures=1",
                        "--set", f"scale.hold_at_step={hold_at}",
                        "--set", f"scale.fail_at_step={fail_at}", *FAST)
    jobs = job_client(stack_env)
    fs = s3(stack_env)
    started = submit(stack_env, name, entry, wait=False, env_vars={"RAY_DEDUP_LOGS": "0"})
    assert started.returncode == 0, started.stderr[-3000:]
    marker = hold_marker(run_uri, hold_at)
    wait_for(lambda: fs.exists(marker) or jobs.get_job_status(name).is_terminal(), 180,
             "rank 1 held at its step", poll_s=0.2)
    assert fs.exists(marker), jobs.get_job_logs(name)[-5000:]
    rank1 = int(re.search(r"pid (\d+)", fs.cat(marker).decode()).group(1))
    workers = train_worker_pids(ray_head)
    assert len(workers) == 2 and rank1 in workers, workers
    os.kill(next(pid for pid in workers if pid != rank1), signal.SIGKILL)
    wait_for(lambda: jobs.get_job_status(name).is_terminal(), 480, "the job")
    log = jobs.get_job_logs(name).split("Status message:")[0]
    assert jobs.get_job_status(name) == JobStatus.FAILED, log[-5000:]
    assert log.count("Started training worker group of size") == 2, log[-5000:]
    assert continued_epochs(log) == [2], log[-5000:]  # 1-based: epoch 1 again
    assert f"[fault injection] rank 1 exits at global step {fail_at}" in log, log[-5000:]
    summary = [ln for ln in log.splitlines() if ln.startswith("jobs.train: training failed")]
    assert len(summary) == 1, log[-5000:]
    assert "(scale.max_failures=1): rank " in summary[0] and "rank 1: " in summary[0], summary
    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["vl.failure"] == summary[0].removeprefix("jobs.train: ")
    history = MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1]


def test_a_node_lost_mid_epoch_costs_its_rank_and_the_job_finishes_on_the_nodes_left(
        shards, stack_env, mlflow_env, ray_head, s3_server, mlflow_server):
    """A second Ray node (1 CPU) joins the head; scale.placement_strategy=SPREAD puts rank 1 on
    it. scale.hold_at_step=5 stops rank 1 in the middle of epoch 1 (0-based; 3 steps per epoch,
    a checkpoint after every epoch), and there the node dies (its raylet and every process on
    it SIGKILLed, as a machine that is lost). Ray Train restarts the group on the head's 2 CPUs
    from epoch 0's checkpoint, within scale.max_failures, and the job finishes: only the
    interrupted epoch is trained again, one MLflow run holds every epoch's metrics exactly
    once."""
    name = f"node-{uid()}"
    epochs, hold_at = 4, 5
    run_uri = f"s3://vl-runs/test_train_job/{name}"
    entry = entrypoint("--data", shards, "--storage", "s3://vl-runs/test_train_job",
                        "--name", name, "--set", f"train.epochs={epochs}",
                        "--set", "scale.placement_strategy=SPREAD",
                        "--set", f"scale.hold_at_step={hold_at}", *FAST)
    jobs = job_client(stack_env)
    fs = s3(stack_env)
    node = start_ray_worker_node(ray_head, {**s3_server.env(), **mlflow_server.env()},
                                 num_cpus=1)
    try:
        started = submit(stack_env, name, entry, wait=False,
                         env_vars={"RAY_DEDUP_LOGS": "0"})
        assert started.returncode == 0, started.stderr[-3000:]
        marker = hold_marker(run_uri, hold_at)
        wait_for(lambda: fs.exists(marker) or jobs.get_job_status(name).is_terminal(), 180,
                 "rank 1 held at its step", poll_s=0.2)
        assert fs.exists(marker), jobs.get_job_logs(name)[-5000:]
        assert newest_complete_epoch(stack_env, run_uri) == 0
        node.kill()
        wait_for(lambda: jobs.get_job_status(name).is_terminal(), 480, "the job")
    finally:
        node.stop()
    log = jobs.get_job_logs(name)
    assert jobs.get_job_status(name) == JobStatus.SUCCEEDED, log[-5000:]
    groups = log.split("Started training worker group of size")[1:]
    assert len(groups) == 2, log[-5000:]
    assert "node_rank=1" in groups[0] and "node_rank=1" not in groups[1], log[-5000:]
    assert f"rank 1 holds at global step {hold_at}" in groups[0], log[-5000:]
    assert continued_epochs(log) == [2], log[-5000:]  # 1-based: epoch 1 again
    assert epochs_trained(log) == epochs, log[-5000:]  # the interrupted epoch, nothing more
    runs = runs_named("videolights-smoke", name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert sorted(m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")) \
        == list(range(epochs))
    assert_each_step_logged_once(run_id)
