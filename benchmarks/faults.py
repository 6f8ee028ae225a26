"""The fault matrix of jobs.train on the local stack: each fault is done to a real smoke-config
job and measured against a fault-free run of the same config.

Faults: a worker killed mid-epoch (`scale.fail_at_step`: rank 1 exits hard, as after `kill -9`),
a Ray Train worker process SIGKILLed from outside after the first checkpoint (as the OOM killer
or an operator does), a worker lost during the report of an evaluation epoch
(`scale.fail_at_report`), a whole node lost (a second `ray start --address` node on this machine
holds rank 1 under `scale.placement_strategy=SPREAD` and is SIGKILLed, raylet and workers, in
the middle of the epoch after the first checkpoint, where `scale.hold_at_step` stops rank 1),
the S3 server (SeaweedFS) paused 30 s and 90 s (SIGSTOP) after the first checkpoint and
`--pause-s` while rank 0 uploads the first checkpoint, the MLflow server paused 30 s, `ray job
stop` after the first checkpoint then a resubmit with the same --name, and a resubmit with a
changed config (which must be refused with exit 2, the run untouched).

Per fault one JSON line: survived (the job succeeded, or, for the changed config, was
refused), epochs_redone (epochs trained beyond the config's, from rank 0's progress lines),
worker_group_starts (Ray Train's starts over the fault's submissions),
wall_s and wall_s_lost (against the fault-free run), and metric points duplicated or lost in
the MLflow run (each metric's step history against the fault-free run's).

    python -m benchmarks.faults [--epochs 6] [--eval-every 2] [--pause-s 30] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.local.common import WORKING_DIR_EXCLUDES, wait_for
from cluster.local.ray_head import session_members, start_ray_worker_node, train_worker_pids
from cluster.local.stack import LocalStack
from jobs.shard import run as shard_run
from jobs.train import hold_marker
from vl.checkpoint import checkpoint_folders, complete_checkpoints
from vl.data.synthetic import SyntheticConfig, generate
from vl.storage import exists

REPO = Path(__file__).resolve().parents[1]
STORAGE = "s3://vl-runs/faults"
EXPERIMENT = "videolights-smoke"
STEPS_PER_EPOCH = 3  # 48 train queries / 2 ranks / batch 8
FAULTS = ("worker_kill_mid_epoch", "worker_sigkill", "worker_kill_during_report", "node_kill",
          "s3_outage", "s3_outage_90s", "s3_outage_during_upload", "mlflow_outage",
          "job_stop_resubmit", "resubmit_changed_config")
LONG_OUTAGE_S = 90.0  # s3_outage_90s: longer than one request's retries, within VL_S3_RETRY_TOTAL_S


@dataclass
class Bench:
    """The stack, the data and the job client every fault run shares."""

    stack: LocalStack
    data: str
    jobs: JobSubmissionClient
    epochs: int
    eval_every: int

    def entrypoint(self, name: str, *extra: str) -> str:
        return shlex.join([
            sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml",
            "--data", self.data, "--storage", STORAGE, "--name", name,
            "--set", f"train.epochs={self.epochs}", "--set", f"train.eval_every={self.eval_every}",
            "--set", "data.batch_size=8", "--set", "data.eval_batch_size=32", *extra])

    def submit(self, name: str, *extra: str) -> str:
        return self.jobs.submit_job(
            entrypoint=self.entrypoint(name, *extra),
            submission_id=f"{name}-{uuid.uuid4().hex[:6]}", entrypoint_num_cpus=0,
            runtime_env={"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES,
                         "env_vars": {"RAY_DEDUP_LOGS": "0"}})

    def wait(self, job: str, timeout_s: float = 900) -> JobStatus:
        wait_for(lambda: self.jobs.get_job_status(job).is_terminal(), timeout_s, f"job {job}",
                 poll_s=0.5)
        return self.jobs.get_job_status(job)

    def run_uri(self, name: str) -> str:
        return f"{STORAGE}/{name}"

    def wait_first_checkpoint(self, name: str, timeout_s: float = 300) -> None:
        wait_for(lambda: bool(complete_checkpoints(self.run_uri(name))), timeout_s,
                 f"the first checkpoint of {name}", poll_s=0.2)


def make_data(stack: LocalStack, root: Path) -> str:
    """The job tests' synthetic set (48 train / 16 val queries, 8-dim features) on the S3."""
    layout = generate(SyntheticConfig("qvhighlights", videos=32, seed=3,
                                      dims={"slowfast": 8, "clip": 8},
                                      video_sets=("slowfast", "clip"), text_sets=("clip",),
                                      val_fraction=0.25), root / "synthetic")
    prefix = f"s3://vl-data/faults/{uuid.uuid4().hex[:8]}"
    for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
        shard_run(dataset="qvhighlights", annotations=str(jsonl),
                  video_features=layout.video_arg(), text_features=layout.text_arg(),
                  out=f"{prefix}/{split}", rows_per_shard=12, ray_mode="off",
                  log=lambda *_: None)
    return prefix


def pause(pid: int, seconds: float) -> None:
    """SIGSTOP every process of a service's session for `seconds`, then SIGCONT."""
    members = session_members(os.getsid(pid))
    for member in members:
        os.kill(member, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for member in members:
            os.kill(member, signal.SIGCONT)


def epochs_trained(log: str) -> int:
    """Rank 0's progress lines ("epoch K/N loss ..."): one per epoch trained."""
    return len(re.findall(r"\bepoch \d+/\d+ loss ", log))


def metric_steps(name: str) -> dict[str, list[int]]:
    """Every non-system metric of the run named `name`: its logged steps, in logging order."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`vl.run_name` = '{name}'")
    if len(runs) != 1:
        return {}
    run_id = runs[0].info.run_id
    out = {}
    for key in runs[0].data.metrics:
        if key.startswith("system/"):
            continue
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        out[key] = [m.step for m in history]
    return out


def compare(steps: dict[str, list[int]], baseline: dict[str, list[int]]) -> dict[str, int]:
    duplicated = sum(sum(c - 1 for c in Counter(v).values() if c > 1) for v in steps.values())
    lost = sum(len(set(v) - set(steps.get(k, []))) for k, v in baseline.items())
    return {"metric_points_duplicated": duplicated, "metric_points_lost": lost}


def run_fault(bench: Bench, fault: str, pause_s: float) -> dict[str, Any]:
    """Run one fault: its row (fault, survived, wall_s) plus the jobs' logs, the run's name and
    its metric steps, which `measure` turns into the figures."""
    name = f"{fault.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    logs: list[str] = []
    extra: dict[str, Any] = {}
    if fault == "worker_kill_mid_epoch":
        # inside the epoch after the first checkpoint (epoch eval_every + 1)
        job = bench.submit(name, "--set",
                           f"scale.fail_at_step={bench.eval_every * STEPS_PER_EPOCH + 1}")
    elif fault == "worker_sigkill":
        job = bench.submit(name)
        bench.wait_first_checkpoint(name)
        wait_for(lambda: len(train_worker_pids(bench.stack.ray)) == 2, 60, "both workers")
        os.kill(train_worker_pids(bench.stack.ray)[-1], signal.SIGKILL)
        extra["killed_after_s"] = round(time.monotonic() - t0, 1)
    elif fault == "worker_kill_during_report":
        job = bench.submit(name, "--set", f"scale.fail_at_report={bench.eval_every}")
    elif fault == "node_kill":
        # A second node (1 CPU) joins; SPREAD puts rank 1 on it; scale.hold_at_step stops rank
        # 1 inside the epoch after the first checkpoint (its step 2), and there the whole node
        # is killed (raylet and workers, SIGKILL). The head's 2 CPUs then hold both ranks of
        # the restarted group.
        stack_env = {**bench.stack.s3.env(), **bench.stack.mlflow.env()}
        node = start_ray_worker_node(bench.stack.ray, stack_env, num_cpus=1)
        try:
            hold_at = bench.eval_every * STEPS_PER_EPOCH + 2
            job = bench.submit(name, "--set", "scale.placement_strategy=SPREAD",
                               "--set", f"scale.hold_at_step={hold_at}")
            marker = hold_marker(bench.run_uri(name), hold_at)
            wait_for(lambda: exists(marker), 300, "rank 1 held at its step", poll_s=0.2)
            node.kill()
            extra.update(node_killed_at_step=hold_at,
                         node_killed_after_s=round(time.monotonic() - t0, 1))
            status = bench.wait(job)
        finally:
            node.stop()
        log = bench.jobs.get_job_logs(job)
        # the first group's ranks on two nodes, so the kill took one (the log names node_rank=1
        # again in the failure it reports, hence the first group's lines only)
        first_group = log.split("Started training worker group of size")[1:2]
        extra["spread_over_two_nodes"] = any("node_rank=1" in g for g in first_group)
        return {"fault": fault, "survived": status == JobStatus.SUCCEEDED, "name": name,
                "wall_s": round(time.monotonic() - t0, 1), "logs": [log],
                "steps": metric_steps(name), **extra}
    elif fault == "s3_outage_during_upload":
        # S3 paused while rank 0 uploads the first checkpoint: its folder holds objects but not
        # yet the seal. `caught_upload` says whether the pause began inside that window (a
        # small checkpoint uploads in well under a second, so the poll may miss it).
        job = bench.submit(name)
        uri = bench.run_uri(name)
        wait_for(lambda: bool(checkpoint_folders(uri)), 300, "a checkpoint upload", poll_s=0.02)
        pause_started = not complete_checkpoints(uri)
        pause(bench.stack.s3.pid, pause_s)
        extra.update(paused_s=pause_s, caught_upload=pause_started)
    elif fault in ("s3_outage", "s3_outage_90s", "mlflow_outage"):
        job = bench.submit(name)
        bench.wait_first_checkpoint(name)
        pid = bench.stack.mlflow.pid if fault == "mlflow_outage" else bench.stack.s3.pid
        seconds = LONG_OUTAGE_S if fault == "s3_outage_90s" else pause_s
        pause(pid, seconds)
        extra["paused_s"] = seconds
    elif fault in ("job_stop_resubmit", "resubmit_changed_config"):
        first = bench.submit(name)
        bench.wait_first_checkpoint(name)
        bench.jobs.stop_job(first)
        bench.wait(first)
        logs.append(bench.jobs.get_job_logs(first))
        if fault == "resubmit_changed_config":
            refused = bench.submit(name, "--set", "train.lr=0.0002")
            status = bench.wait(refused)
            log = bench.jobs.get_job_logs(refused)
            line = next((ln for ln in log.splitlines() if "different config" in ln), "")
            steps = metric_steps(name)
            return {"fault": fault, "survived": status == JobStatus.FAILED and bool(line)
                    and "exit code 2" in (bench.jobs.get_job_info(refused).message or ""),
                    "refusal": line.strip()[:300], "wall_s": round(time.monotonic() - t0, 1),
                    "name": name, "steps": steps, "logs": logs + [log]}
        job = bench.submit(name)
    else:
        raise ValueError(fault)
    status = bench.wait(job)
    logs.append(bench.jobs.get_job_logs(job))
    return {"fault": fault, "survived": status == JobStatus.SUCCEEDED, "name": name,
            "wall_s": round(time.monotonic() - t0, 1), "logs": logs,
            "steps": metric_steps(name), **extra}


def measure(bench: Bench, faults: list[str], pause_s: float,
            emit: Callable[[dict[str, Any]], None]) -> None:
    name = f"baseline-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    status = bench.wait(bench.submit(name))
    baseline_wall = time.monotonic() - t0
    baseline = metric_steps(name)
    emit({"fault": "none (baseline)", "survived": status == JobStatus.SUCCEEDED,
          "wall_s": round(baseline_wall, 1), "metric_keys": len(baseline)})
    for fault in faults:
        row = run_fault(bench, fault, pause_s)
        logs, steps = row.pop("logs"), row.pop("steps")
        row.pop("name")
        if fault != "resubmit_changed_config":
            row["epochs_redone"] = sum(epochs_trained(log) for log in logs) - bench.epochs
            # 1 per submission without a restart; each worker-group restart adds one
            row["worker_group_starts"] = sum(
                log.count("Started training worker group of size") for log in logs)
            row["wall_s_lost"] = round(row["wall_s"] - baseline_wall, 1)
            row.update(compare(steps, baseline))
            if not row["survived"]:
                row["log_tail"] = logs[-1][-1500:]
        else:
            row.update(compare(steps, {}))  # the refused submission logged nothing
        emit(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--pause-s", type=float, default=30.0,
                        help="how long the S3 and MLflow servers are paused")
    parser.add_argument("--only", nargs="+", choices=FAULTS, help="run only these faults")
    parser.add_argument("--dir", type=Path, help="stack directory (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="vl-faults-"))
    stack = LocalStack.start(root / "stack", num_cpus=2,
                             progress=lambda m: print(m, file=sys.stderr, flush=True))
    saved = dict(os.environ)
    try:
        os.environ.update(stack.env())
        token = Path(stack.env()["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        jobs = JobSubmissionClient(stack.ray.dashboard_url,
                                   headers={"Authorization": f"Bearer {token}"})
        bench = Bench(stack, make_data(stack, root), jobs, args.epochs, args.eval_every)
        measure(bench, list(args.only or FAULTS), args.pause_s,
                lambda row: print(json.dumps(row, sort_keys=True), flush=True))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
