"""Per-domain TVSum loss-coefficient search with Ray Tune, tracked in MLflow.

    python -m tune.tvsum --data s3://vl-data/shards/tvsum --domains all --features i3d \
        --search optuna --scheduler asha --num-samples 8 --epochs 2000 --cpus-per-trial 1

The paper's TVSum number (Table 10) is the per-domain maximum over a hand grid of loss
coefficients, each cell a full 2000-epoch run. This command runs that grid (`--search grid`) or
samples the same box with Optuna while ASHA stops poor trials early (`--search optuna
--scheduler asha`), one Tune experiment per domain under `--storage` (re-running the same
command resumes it), one MLflow parent run per domain with a child run per trial, a summary run
with the paper's Table 7 / Table 2 layouts and hl x scsl heatmaps, and each domain's best model
registered as `videolights-tvsum-<DOMAIN>` with the `champion` alias.

`--data BASE` reads shards from BASE/train and BASE/val (`python -m jobs.shard --dataset tvsum`).
The same command runs in a shell (it starts or joins Ray) and as `ray job submit -- python -m
tune.tvsum ...` (it joins the job's cluster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
from ray import tune

from jobs.preflight import EXIT_BAD_INPUT, PreflightError, check_cluster_capacity, init_ray
from tune import report, runs, space
from tune.report import best_per_domain, order_domains
from tune.runs import ChildRunCloser, InterruptAfter
from tune.trial import (
    DomainData,
    FaultPlan,
    TrackingTarget,
    TrialSetup,
    load_domain,
    run_trial,
    thread_budget,
)
from vl.checkpoint import read_model
from vl.config import TVSUM_DOMAINS, ConfigError, ExperimentConfig, feature_set_widths
from vl.tracking import check_tracking_server

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tvsum_search.yaml"
DEFAULT_EXPERIMENT = "videolights-tvsum-search"
DEFAULT_REGISTERED_PREFIX = "videolights-tvsum"
# --features -> (video feature sets, text feature sets): Table 7's two settings.
FEATURE_SETS: dict[str, tuple[list[str], list[str]]] = {
    "i3d": (["i3d"], ["clip"]),
    "sf_clip_blip": (["slowfast", "clip", "blip"], ["clip", "blip"]),
}
EXIT_INTERRUPTED = 130


@dataclass
class SearchSpec:
    """One search, fully resolved: what `main` parses and what the benchmark builds directly."""

    config: ExperimentConfig
    train_uri: str
    val_uri: str
    domains: list[str]
    features: str = "i3d"
    search: str = "optuna"
    scheduler: str = "asha"
    num_samples: int = 8
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: what the cluster can hold
    storage: str = "s3://vl-runs/tune"
    name: str = ""
    experiment: str | None = DEFAULT_EXPERIMENT  # None: no MLflow (benchmarks)
    registered_prefix: str = DEFAULT_REGISTERED_PREFIX
    init_from: str = ""
    checkpoint_every: int = 0
    grace_fraction: float = 0.1
    reduction_factor: float = 3.0
    corner_start: bool = True  # optuna: try the box's (scsl, al) corners first (space.corner_start)
    interrupt_after_trials: int = 0
    cache_dir: str | None = None
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"tvsum-{self.features}-{self.search}-{self.scheduler}"


@dataclass
class DomainResult:
    domain: str
    outcomes: list[Any]  # TrialOutcome
    best: Any | None  # TrialOutcome
    registered_version: str | None = None
    epochs_run: int = 0


@dataclass
class SearchResult:
    domains: dict[str, DomainResult]
    interrupted: bool = False
    summary_run_id: str = ""
    tables: dict[str, str] = field(default_factory=dict)

    @property
    def total_epochs(self) -> int:
        return sum(d.epochs_run for d in self.domains.values())


# ---- argument handling --------------------------------------------------------------------
def parse_domains(text: str) -> list[str]:
    """`all` or a comma list of TVSum domain codes -> the domains, in the paper's order."""
    if text.strip().lower() == "all":
        return order_domains(TVSUM_DOMAINS)
    domains = [d.strip().upper() for d in text.split(",") if d.strip()]
    unknown = [d for d in domains if d not in TVSUM_DOMAINS]
    if unknown or not domains:
        raise ConfigError(
            f"--domains: unknown TVSum domain(s) {unknown or text!r}; use 'all' or a comma list "
            f"of {', '.join(order_domains(TVSUM_DOMAINS))}"
        )
    return order_domains(dict.fromkeys(domains))


def build_config(path: str | Path, features: str, overrides: list[str],
                 epochs: int | None) -> ExperimentConfig:  # fmt: skip
    """The search's base config: the YAML file, the feature sets of `--features` (model dims
    follow them), `--epochs`, then `--set` overrides (applied last, so they win)."""
    if features not in FEATURE_SETS:
        raise ConfigError(f"--features must be one of {sorted(FEATURE_SETS)}, got {features!r}")
    video, text = FEATURE_SETS[features]
    video_dim, text_dim = feature_set_widths(video, text)  # until the shards say otherwise
    pre = [
        f"data.video_features=[{','.join(video)}]",
        f"data.text_features=[{','.join(text)}]",
        f"model.video_dim={video_dim}",
        f"model.text_dim={text_dim}",
        "data.dataset=tvsum",
    ]
    if epochs is not None:
        pre.append(f"train.epochs={epochs}")
    return ExperimentConfig.from_yaml(path, pre + list(overrides))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tune.tvsum",
        description="Per-domain TVSum loss-coefficient search (Ray Tune + MLflow).",
    )
    p.add_argument("--data", help="shard base URI holding train/ and val/ (else the config's "
                   "data.train / data.val)")
    p.add_argument("--domains", default="all", help="'all' or a comma list, e.g. VT,VU")
    p.add_argument("--features", default="i3d", choices=sorted(FEATURE_SETS))
    p.add_argument("--init-from", default="", help="fine-tune from a registered model, e.g. "
                   "models:/videolights-pretrain@champion")
    p.add_argument("--search", default="optuna", choices=("grid", "optuna"))
    p.add_argument("--scheduler", default="asha", choices=("asha", "none"))
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials per domain (optuna; default 8) or grid repeats (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (train.epochs)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPU cores per trial (its torch threads); a domain's 4-video batch is "
                   "trained in one process")
    p.add_argument("--workers-per-trial", dest="old_workers_per_trial", help=argparse.SUPPRESS)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="concurrent trials (default: cluster CPUs / cpus-per-trial)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override, e.g. train.eval_every=10")
    p.add_argument("--storage", default=os.environ.get("VL_TUNE_STORAGE", "s3://vl-runs/tune"),
                   help="where Tune keeps experiment state (resume point)")
    p.add_argument("--name", default="", help="search name (default from the options)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    p.add_argument("--registered-prefix", default=DEFAULT_REGISTERED_PREFIX)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="epochs between periodic trial checkpoints (0: on improvement only)")
    p.add_argument("--grace-fraction", type=float, default=0.1,
                   help="ASHA first rung, as a fraction of the epochs")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--random-start", action="store_true",
                   help="optuna: start from random draws instead of the four (scsl, al) corners "
                        "of the box (at hl 5)")
    p.add_argument("--ray-address", default=None,
                   help="Ray GCS address (default: RAY_ADDRESS; the job API URL that "
                        "`cluster.local.stack up` exports is swapped for the GCS address it "
                        "exports beside it; neither: a new local cluster)")
    p.add_argument("--interrupt-after-trials", type=int, default=0, help=argparse.SUPPRESS)
    return p


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    if args.old_workers_per_trial is not None:
        raise ConfigError("--workers-per-trial is now --cpus-per-trial (CPU cores per trial)")
    for flag, value, low in (("--cpus-per-trial", args.cpus_per_trial, 1e-9),
                             ("--gpus-per-trial", args.gpus_per_trial, 0.0),
                             ("--num-samples", args.num_samples or 1, 1),
                             ("--max-concurrent", args.max_concurrent, 0),
                             ("--checkpoint-every", args.checkpoint_every, 0)):  # fmt: skip
        if not value >= low:  # also NaN
            raise ConfigError(f"{flag} must be {'> 0' if low == 1e-9 else f'>= {low}'}, "
                              f"got {value}")
    cfg = build_config(args.config, args.features, args.overrides, args.epochs)
    if args.data:
        train_uri, val_uri = f"{args.data.rstrip('/')}/train", f"{args.data.rstrip('/')}/val"
    else:
        train_uri, val_uri = cfg.data.train, cfg.data.val
    if not train_uri or not val_uri:
        raise ConfigError(f"{args.config}: no data: pass --data BASE or set data.train/data.val")
    num_samples = args.num_samples or (1 if args.search == "grid" else 8)
    return SearchSpec(
        config=cfg, train_uri=train_uri, val_uri=val_uri, domains=parse_domains(args.domains),
        features=args.features, search=args.search, scheduler=args.scheduler,
        num_samples=num_samples, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
        storage=args.storage.rstrip("/"), name=args.name, experiment=args.experiment or None,
        registered_prefix=args.registered_prefix, init_from=args.init_from,
        checkpoint_every=args.checkpoint_every, grace_fraction=args.grace_fraction,
        reduction_factor=args.reduction_factor, corner_start=not args.random_start,
        interrupt_after_trials=args.interrupt_after_trials,
    )  # fmt: skip


# ---- the search -----------------------------------------------------------------------------
def load_init_state(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, config dict) of the --init-from model (`models:/NAME@alias` or a file)."""
    try:
        return read_model(uri)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--init-from {uri}: {err}") from None


def domain_config(spec: SearchSpec, data: DomainData,
                  init_config: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """The domain's base config dict: dims from the shards, the architecture of --init-from."""
    raw = spec.config.to_dict()
    raw["data"].update(train=spec.train_uri, val=spec.val_uri, tvsum_domain=data.domain)
    raw["model"].update(video_dim=data.video_dim, text_dim=data.text_dim)
    if init_config is not None:
        for key, value in init_config["model"].items():
            if key not in ("video_dim", "text_dim"):
                raw["model"][key] = value
        if (init_config["model"]["video_dim"], init_config["model"]["text_dim"]) != (
            data.video_dim, data.text_dim
        ):
            raise ConfigError(
                f"--init-from: the model was trained on video/text dims "
                f"{init_config['model']['video_dim']}/{init_config['model']['text_dim']}, the "
                f"shards hold {data.video_dim}/{data.text_dim}: pick matching --features"
            )
    ExperimentConfig.from_dict(raw, source=f"domain {data.domain}")  # validate early
    return raw


def _concurrency(spec: SearchSpec) -> int:
    if spec.max_concurrent > 0:
        return spec.max_concurrent
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // max(spec.cpus_per_trial, 1e-6))
    if spec.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0) // spec.gpus_per_trial))
    return max(1, slots)


def _make_tuner(spec: SearchSpec, domain: str, trainable: Any, parent_run_id: str):
    path = f"{spec.storage}/{spec.name}/{domain}"
    if tune.Tuner.can_restore(path):
        spec.log(f"[{domain}] resuming the search stored at {path}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)  # fmt: skip
    epochs = spec.config.train.epochs
    callbacks: list[Any] = [ChildRunCloser(epochs)] if spec.experiment else []
    if spec.interrupt_after_trials > 0:
        callbacks.append(InterruptAfter(spec.interrupt_after_trials))
    tune_config = tune.TuneConfig(
        metric=space.METRIC, mode="max",
        search_alg=space.make_searcher(
            spec.search, spec.config.train.seed,
            space.corner_start() if spec.corner_start else None,
        ),
        scheduler=space.make_scheduler(
            spec.scheduler, epochs, spec.config.train.eval_every,
            space.SchedulerSettings(spec.grace_fraction, spec.reduction_factor),
        ),
        num_samples=spec.num_samples, max_concurrent_trials=_concurrency(spec),
        reuse_actors=True,  # a trial is seconds of work: do not pay a process start per trial
    )  # fmt: skip
    run_config = tune.RunConfig(
        name=domain, storage_path=f"{spec.storage}/{spec.name}",
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks, verbose=0,
    )  # fmt: skip
    return tune.Tuner(trainable, param_space=space.param_space(spec.search,
                                                               spec.config.train.seed),
                      tune_config=tune_config, run_config=run_config)  # fmt: skip


def search_domain(spec: SearchSpec, domain: str, init: tuple | None) -> tuple[DomainResult, bool]:
    """Run (or resume) one domain's experiment; returns its result and whether it was
    interrupted (then nothing is registered and the caller stops)."""
    cfg = spec.config
    data = load_domain(
        spec.train_uri, spec.val_uri, domain, video_features=cfg.data.video_features,
        text_features=cfg.data.text_features, max_v_l=cfg.data.max_v_l,
        max_q_l=cfg.data.max_q_l, batch_size=cfg.data.batch_size, cache_dir=spec.cache_dir,
    )  # fmt: skip
    raw = domain_config(spec, data, init[1] if init else None)
    parent = ""
    target = None
    if spec.experiment:
        parent = runs.start_domain_run(spec.experiment, spec.name, domain, {
            "search": spec.search, "scheduler": spec.scheduler,
            "num_samples": spec.num_samples, "epochs": cfg.train.epochs,
            "features": spec.features, "init_from": spec.init_from or "-",
        })  # fmt: skip
        target = TrackingTarget(mlflow.get_tracking_uri(), spec.experiment, parent,
                                f"{spec.name}/{domain}")  # fmt: skip
    setup = TrialSetup(
        config=raw, data=data, init_state=init[0] if init else None, tracking=target,
        checkpoint_every=spec.checkpoint_every, threads=thread_budget(spec.cpus_per_trial),
        device="cuda" if spec.gpus_per_trial > 0 else "cpu",
        faults=_faults_from_env(),
    )  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"CPU": spec.cpus_per_trial, "GPU": spec.gpus_per_trial},
    )
    spec.log(f"[{domain}] {data.num_train} training videos, {len(data.val)} val video(s); "
             f"{spec.search} search, scheduler {spec.scheduler}")  # fmt: skip
    grid = _make_tuner(spec, domain, trainable, parent).fit()
    outcomes = runs.outcomes_of(domain, grid, cfg.train.epochs)
    # Interrupted = fewer trials ended than the search asks for (Tune returns normally after a
    # Ctrl-C, and a searcher may not even have created the remaining trials yet).
    expected = spec.num_samples * (len(space.grid_cells()) if spec.search == "grid" else 1)
    interrupted = grid.num_terminated + grid.num_errors < expected
    result = DomainResult(domain, outcomes, best_per_domain(outcomes).get(domain),
                          epochs_run=sum(t.epochs_run for t in outcomes))  # fmt: skip
    if spec.experiment:
        runs.sweep_child_runs(outcomes, interrupted)
        if interrupted:
            runs.mark_interrupted(outcomes)
    if interrupted:
        return result, True
    if spec.experiment and result.best is not None:
        result.registered_version = runs.finish_domain(
            parent, grid, result.best, f"{spec.registered_prefix}-{domain}"
        )
    for t in outcomes:
        spec.log(f"[{domain}] trial {t.trial_id}: hl={t.hl:.3g} scsl={t.scsl:.3g} "
                 f"al={t.al:.3g} best top-5 mAP={t.best_top5_map:.2f} after "
                 f"{t.epochs_run} epochs ({t.status})"
                 + (f": {t.diverged}" if t.diverged else ""))  # fmt: skip
    return result, False


def _faults_from_env() -> tuple[FaultPlan, ...]:
    """Test hook: VL_TUNE_FAULT, comma-separated plans KIND:EPOCH[:HL[:AL]], KIND one of
    `once` / `always` (crash before the epoch) or `nan` (NaN features in it): matching trials
    fail on purpose (see tune.trial.FaultPlan). Unset in normal use."""
    plans = []
    for text in filter(None, os.environ.get("VL_TUNE_FAULT", "").split(",")):
        kind, epoch, *coefs = text.split(":")
        hl, al = (float(c) if c else None for c in (coefs + ["", ""])[:2])
        plans.append(FaultPlan(epoch=int(epoch), kind="nan" if kind == "nan" else "crash",
                               once=kind == "once", hl=hl, al=al))
    return tuple(plans)


def summarize(spec: SearchSpec, result: SearchResult) -> None:
    """Tables (Markdown + CSV, printed too), heatmaps, and the summary MLflow run."""

    best = {d: r.best for d, r in result.domains.items() if r.best is not None}
    t7_md, t7_csv = report.table7(best, spec.features)
    method = f"VideoLights ({spec.features}, {spec.search}+{spec.scheduler})"
    t2_md, t2_csv = report.table2(best, method)
    result.tables = {"table7_coefficients.md": t7_md, "table7_coefficients.csv": t7_csv,
                     "table2_top5_map.md": t2_md, "table2_top5_map.csv": t2_csv}  # fmt: skip
    spec.log("Best loss coefficients per domain (paper Table 7 layout):\n" + t7_md)
    spec.log("Top-5 mAP per domain (paper Table 2 layout):\n" + t2_md)
    if not spec.experiment:
        return

    figures = {
        f"heatmap_{d}": report.heatmap(d, result.domains[d].outcomes)
        for d in report.order_domains(result.domains)
    }
    metrics = {f"top5_map_{d}": t.best_top5_map for d, t in best.items()}
    metrics["avg_top5_map"] = report.average(best)
    metrics["total_epochs"] = float(result.total_epochs)
    result.summary_run_id = runs.log_summary(
        spec.experiment, spec.name, result.tables, figures, metrics,
        {"search": spec.search, "scheduler": spec.scheduler, "features": spec.features,
         "domains": ",".join(spec.domains), "num_samples": spec.num_samples,
         "epochs": spec.config.train.epochs},
    )  # fmt: skip


def run_search(spec: SearchSpec) -> SearchResult:
    """Every domain in turn (each a Tune experiment using the whole cluster), then the summary.
    Ray must be initialised by the caller."""
    init = None
    if spec.experiment:
        check_tracking_server()
    if spec.init_from:
        init = load_init_state(spec.init_from)
    result = SearchResult(domains={})
    for domain in spec.domains:
        start = time.perf_counter()
        domain_result, interrupted = search_domain(spec, domain, init)
        result.domains[domain] = domain_result
        spec.log(f"[{domain}] done in {time.perf_counter() - start:.0f} s")
        if interrupted:
            result.interrupted = True
            spec.log(f"[{domain}] search interrupted; the state is saved under "
                     f"{spec.storage}/{spec.name}: re-run the same command to resume")  # fmt: skip
            return result
    summarize(spec, result)
    return result


def check_trial_fits(spec: SearchSpec) -> None:
    """One trial's resources fit on one node of the cluster: Tune would otherwise wait for
    them forever. Checked before MLflow or the Tune state is touched."""
    knobs = {"--cpus-per-trial": spec.cpus_per_trial}
    if spec.gpus_per_trial > 0:
        knobs["--gpus-per-trial"] = spec.gpus_per_trial
    check_cluster_capacity(1, spec.cpus_per_trial, spec.gpus_per_trial, knobs=knobs)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = False
    if not ray.is_initialized():
        try:
            init_ray(args.ray_address, log_to_driver=False)
        except PreflightError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        started = True
    try:
        try:
            check_trial_fits(spec)
        except PreflightError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        result = run_search(spec)
    finally:
        if started:
            ray.shutdown()
    summary = {
        "interrupted": result.interrupted,
        "best": {d: (None if r.best is None else
                     {"hl": r.best.hl, "scsl": r.best.scsl, "al": r.best.al,
                      "top5_map": round(r.best.best_top5_map, 3),
                      "registered_version": r.registered_version})
                 for d, r in result.domains.items()},
        "total_epochs": result.total_epochs,
        "summary_run_id": result.summary_run_id,
    }  # fmt: skip
    print(json.dumps(summary, default=lambda x: None if isinstance(x, float) and
                     math.isnan(x) else x))  # fmt: skip
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
