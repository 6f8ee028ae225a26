"""N seeds of one config, trained concurrently: is a result the recipe's, or one lucky run?

    python -m tune.seeds --config configs/qvhighlights.yaml --data s3://vl-data/qvh --seeds 3
    python -m tune.seeds --config configs/smoke.yaml --data s3://vl-data/demo/qvhighlights \\
        --seeds 3 --set train.epochs=10 --name smoke-seeds

Each seed is one Ray Tune trial that runs the regular training job (`jobs.train`: Ray Train DDP
workers, checkpoints under --storage, its own MLflow run) with `train.seed` set; the trials'
MLflow runs are children of one parent run, which gets the mean and standard deviation of every
evaluation metric of the seeds' best checkpoints (as `mean_<metric>` / `std_<metric>` metrics
and a `seeds/summary.md` + `seeds/summary.json` table artifact).

Why Tune and not N `ray job submit`s: Tune schedules the trials onto what the cluster has free
(a trial waits for its workers' CPUs/GPUs instead of failing), retries a crashed trial, and
gathers the results in one place. A re-run with the same --name continues: a seed that
finished is recognised by jobs.train's own run record and reports its result without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from jobs.preflight import EXIT_BAD_INPUT, PreflightError, init_ray
from jobs.train import JobPlan, prepare, run
from jobs.train import build_parser as train_parser
from vl import tracking

PARENT_TAG = "mlflow.parentRunId"
SEED_TAG = "vl.seed"
KIND_TAG = "vl.kind"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tune.seeds", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="experiment YAML")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+N-1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every seed (repeatable)")
    p.add_argument("--data", metavar="URI", help="shard prefix holding train/ and val/")
    p.add_argument("--storage", default="s3://vl-runs/seeds", metavar="URI",
                   help="where each seed's checkpoints go (default s3://vl-runs/seeds)")
    p.add_argument("--name", metavar="NAME",
                   help="parent run name; seed s trains as NAME-seed<s> (default: from config)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: config name)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="seeds trained at once (default: all; Tune queues what does not fit)")
    p.add_argument("--address",
                   help="Ray cluster address (default: RAY_ADDRESS, the job API URL swapped for "
                        "the stack's GCS address; neither: a new local cluster)")
    return p


def seed_args(args: argparse.Namespace, seed: int, name: str) -> argparse.Namespace:
    """The jobs.train arguments of one seed, parsed by jobs.train's own parser (its defaults)."""
    argv = ["--config", str(args.config), "--storage", args.storage, "--name", f"{name}-seed{seed}"]
    if args.data:
        argv += ["--data", args.data]
    if args.experiment:
        argv += ["--experiment", args.experiment]
    for override in [*args.overrides, f"train.seed={seed}"]:
        argv += ["--set", override]
    return train_parser().parse_args(argv)


def train_seed(config: dict[str, Any]) -> None:
    """Tune trainable: one seed's regular training job as a child run of the parent."""
    args, seed, parent = config["args"], config["seed"], config["parent_run_id"]
    # Tune runs a trial in its own directory; a relative --config is relative to the job's.
    args.config = Path(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd())) / args.config
    plan: JobPlan = prepare(seed_args(args, seed, config["name"]))
    if plan.finished is not None:  # trained in an earlier sitting: its run stays FINISHED
        summary = plan.finished
    else:
        run_id = tracking.start_or_resume_run(plan.experiment, plan.name)
        client = MlflowClient()
        client.set_tag(run_id, PARENT_TAG, parent)
        client.set_tag(run_id, SEED_TAG, str(seed))
        summary = run(plan)
    metrics = {k: float(v) for k, v in (summary.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))}
    tune.report({"seed": seed, "summary": json.dumps(metrics)})


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """metric -> {mean, std, n} over the seeds that report it."""
    keys = sorted({k for m in per_seed.values() for k in m})
    table = {}
    for key in keys:
        xs = [m[key] for m in per_seed.values() if key in m]
        table[key] = {"mean": statistics.fmean(xs),
                      "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}
    return table


def markdown(table: dict[str, dict[str, float]], per_seed: dict[int, dict[str, float]]) -> str:
    seeds = sorted(per_seed)
    lines = ["| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for key, row in table.items():
        cells = [f"{per_seed[s][key]:.2f}" if key in per_seed[s] else "—" for s in seeds]
        lines.append(f"| {key} | {row['mean']:.2f} ± {row['std']:.2f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def run_seeds(args: argparse.Namespace) -> dict[str, Any]:
    first: JobPlan = prepare(seed_args(args, args.first_seed, "preflight"))  # fail fast, exit 2
    name = args.name or f"{first.cfg.name}-seeds"
    experiment = args.experiment or first.cfg.name
    parent = tracking.start_or_resume_run(experiment, name)
    client = MlflowClient()
    client.set_tag(parent, KIND_TAG, "seeds")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"tune.seeds: {len(seeds)} seeds of {args.config} (parent MLflow run {parent})",
          flush=True)
    args.experiment = experiment
    space = {"args": args, "name": name, "parent_run_id": parent,
             "seed": tune.grid_search(seeds)}
    tuner = tune.Tuner(
        tune.with_resources(train_seed, {"CPU": 0.1}), param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrency or len(seeds)),
        run_config=tune.RunConfig(name=f"{name}-tune", storage_path=args.storage, verbose=0))
    per_seed: dict[int, dict[str, float]] = {}
    for result in tuner.fit():
        if result.error is not None:
            tracking.finish_run(parent, "FAILED")
            raise result.error
        per_seed[int(result.metrics["seed"])] = json.loads(result.metrics["summary"])
    table = summarise(per_seed)
    text = markdown(table, per_seed)
    for key, row in table.items():
        client.log_metric(parent, f"mean_{key}", row["mean"])
        client.log_metric(parent, f"std_{key}", row["std"])
    client.log_text(parent, text, "seeds/summary.md")
    client.log_dict(parent, {"seeds": per_seed, "table": table}, "seeds/summary.json")
    tracking.finish_run(parent, "FINISHED")
    print(text, flush=True)
    return {"parent_run_id": parent, "seeds": seeds, "table": table}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print("tune.seeds: --seeds must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if not ray.is_initialized():
            init_ray(args.address, log_to_driver=True)
        result = run_seeds(args)
    except PreflightError as err:
        print(f"tune.seeds: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print("RESULT " + json.dumps(result, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
