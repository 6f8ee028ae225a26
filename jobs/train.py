"""python -m jobs.train: VideoLights on Ray Train V2 (DDP over S3 feature shards).

The driver parses arguments, loads the config, checks every input (preflight), opens or resumes
the MLflow run, then runs a `TorchTrainer`; after training it logs the final metrics and the best
checkpoint's predictions and registers that checkpoint as a model version. Each worker streams
its part of the shards through `vl.data`, wraps the model for DDP and runs `vl.engine`; rank 0
evaluates, checkpoints and logs to MLflow. Everything Ray-specific sits in this file, at the
edges of a plain PyTorch loop (docs/ARCHITECTURE.md).

Fault tolerance: a dead worker makes Ray restart the group (`scale.max_failures`), which resumes
from the latest checkpoint; resubmitting a killed job with the same `--name` and `--storage` does
the same. Rank 0 writes each checkpoint, sealed, into the run's storage before reporting it, and
"the latest checkpoint" is the newest complete one there (`latest_checkpoint`), also when Ray's
controller never recorded it because a worker died during the report. The MLflow run is found
again by its `vl.run_name` tag, so a resume never adds a run.
A deterministic error (a NaN loss, a corrupt shard) is not retried: the job exits 1 with one
line naming it (for a NaN loss, the batch's qids) and its MLflow run is FAILED.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.preflight import (
    EXIT_BAD_INPUT,
    PreflightError,
    check_cluster_capacity,
    check_data,
    check_split,
    check_storage,
    check_tracking,
    config_error,
    driver_address,
    require_manifest,
    use_driver_address,
)
from vl import figures, serving, tracking
from vl.checkpoint import (
    MODEL_FILE,
    CheckpointMismatchError,
    complete_checkpoints,
    cpu_weights,
    load_weights,
    prune_checkpoints,
    restore_training_state,
    seal_checkpoint,
    seed_everything,
    write_model_file,
    write_training_state,
)
from vl.config import ConfigError, ExperimentConfig
from vl.data.dataset import make_loader, read_annotations
from vl.data.shards import ShardCorruptError, ShardManifest, read_manifest
from vl.engine import build_optimizer, evaluate, train_one_epoch, unwrap
from vl.losses import build_criterion
from vl.model import build_model
from vl.storage import (
    arrow_filesystem,
    exists,
    join_uri,
    read_bytes,
    remove,
    wait_for_storage,
    write_bytes,
)

PREDICTIONS_FILE = "val_predictions.jsonl"
METRICS_FILE = "metrics.json"
UNSENT_METRICS_FILE = "unsent_metrics.json"  # metric points MLflow had not stored yet
SELECTION_KEY = "selection"
DEFAULT_STORAGE = "s3://vl-runs/train"
FAULT_WAIT_S = 120.0  # how long an injected report fault waits for rank 0's checkpoint
HOLD_WAIT_S = 300.0  # how long a held rank waits for the outside kill before it goes on


# ---- arguments and config ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description=(
            "Train VideoLights with Ray Train (DDP) on feature shards, checkpoint to S3, track in "
            "MLflow, register the best checkpoint. Submit it to a cluster with `ray job submit "
            "--working-dir . -- python -m jobs.train ...`; run directly it starts (or joins, via "
            "RAY_ADDRESS) a Ray cluster itself. Needs MLFLOW_TRACKING_URI and, for s3:// URIs, "
            "AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
        ),
        epilog=(
            "Resume: rerun with the same --name and --storage; training continues from the latest "
            "checkpoint and logs into the same MLflow run. The config is compared with the one "
            "the run started with: a difference exits with code 2 naming the keys (see "
            "--allow-config-change); resubmitting a finished run is a no-op. Bad input "
            "(missing shards, a config typo, an unreachable MLflow server or storage bucket) "
            "exits with code 2 before any worker starts. A deterministic error in training "
            "(a NaN loss, a corrupt shard) is not retried: the job exits with code 1 naming "
            "it (a NaN loss names the batch's qids); fix the data or config and resubmit with "
            "the same --name to retry from the last checkpoint."
        ),
    )
    parser.add_argument("--config", required=True, type=Path,
                        help="experiment YAML (configs/qvhighlights.yaml, configs/smoke.yaml...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 "
                             "--set model.bicmf_layers=1 (repeatable)")
    parser.add_argument("--data", metavar="URI",
                        help="shard prefix holding train/ and val/ shard sets "
                             "(overrides data.train and data.val)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URI",
                        help=f"where checkpoints go: s3://BUCKET/PREFIX or a local directory "
                             f"(default {DEFAULT_STORAGE})")
    parser.add_argument("--name", metavar="RUN_NAME",
                        help="run name: the checkpoint folder under --storage and the MLflow "
                             "run; reusing a name resumes that run (default: "
                             "<config name>-<dataset>-<timestamp>)")
    parser.add_argument("--register-as", metavar="MODEL_NAME",
                        help="register the best checkpoint as a version of this MLflow model; "
                             "alias 'champion' moves to it only if it beats the current one")
    parser.add_argument("--init-from", metavar="URI",
                        help="start from these weights only (fresh optimizer and schedule): "
                             "models:/NAME@ALIAS, runs:/..., s3://.../checkpoint or a local path; "
                             "a resumed run continues from its own checkpoint instead")
    parser.add_argument("--experiment", metavar="NAME",
                        help="MLflow experiment (default: the config's name)")
    parser.add_argument("--allow-config-change", metavar="KEY[,KEY]", default="",
                        help="on a resume, accept these config keys differing from the saved "
                             "run's (e.g. train.epochs); any other difference is refused. Keys "
                             "the checkpoint fixes (train.lr, weight_decay, lr_drop, lr_gamma, "
                             "model.*, the dataset and feature sets) cannot be accepted: start "
                             "a new run with --init-from")
    return parser


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.data:
        base = args.data.rstrip("/")
        overrides += [f"data.train={base}/train", f"data.val={base}/val"]
    return ExperimentConfig.from_yaml(args.config, overrides)


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class JobPlan:
    """What the driver hands to the trainer: a checked config and where things go."""

    cfg: ExperimentConfig
    storage: str
    name: str
    experiment: str
    register_as: str | None
    init_from: str | None = None
    num_train: int = 0
    num_val: int = 0
    notes: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # config keys a resume accepts as changed
    ray_address: str | None = None  # for ray.init (preflight.driver_address)
    shards: dict[str, str] = field(default_factory=dict)  # split -> digest of its shard checksums
    finished: dict[str, Any] | None = None  # the summary of an already finished run

    @property
    def selection_metric(self) -> str:
        """The key Ray ranks checkpoints by (and the registry compares)."""
        return self.cfg.train.selection_metric or SELECTION_KEY

    @property
    def run_uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def prepare(args: argparse.Namespace) -> JobPlan:
    """Config + preflight. Raises PreflightError (exit 2) on any bad input."""
    try:
        cfg = load_config(args)
    except ConfigError as err:
        raise config_error(err) from None
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise PreflightError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only")
    shape = check_data(cfg)
    notes = []
    # The model's input widths follow the shards' feature sets: a config cannot disagree.
    if (cfg.model.video_dim, cfg.model.text_dim) != (shape.video_dim, shape.text_dim):
        notes.append(f"model input dims set from the shards: video {shape.video_dim}, "
                     f"text {shape.text_dim}")
    cfg.model.video_dim, cfg.model.text_dim = shape.video_dim, shape.text_dim
    cfg.data.clip_len = shape.clip_len
    cfg.validate(str(args.config))
    check_split(cfg)
    check_storage(args.storage)
    check_tracking()
    if args.init_from:
        check_init_weights(cfg, args.init_from)
    name = args.name or default_run_name(cfg)
    plan = JobPlan(cfg=cfg, storage=args.storage, name=name,
                   experiment=args.experiment or cfg.name, register_as=args.register_as,
                   init_from=args.init_from, num_train=shape.num_train,
                   num_val=shape.num_val, notes=notes)
    plan.shards = {split: shard_set_digest(uri, split)
                   for split, uri in (("train", cfg.data.train), ("val", cfg.data.val))}
    check_resume(plan, allowed_changes(args.allow_config_change, cfg))
    plan.ray_address = driver_address()
    return plan


# ---- resume: the run it claims to be ---------------------------------------------------------
RUN_RECORD = "run_record.json"  # under the run's storage: config + experiment (+ final summary)


def shard_set_digest(uri: str, split: str) -> str:
    """One digest of a shard set's content (its shards' sha256s): re-sharded data with other
    rows or features under the same prefix is another data set for a resume."""
    manifest = require_manifest(uri, split)
    return hashlib.sha256(" ".join(s.sha256 for s in manifest.shards).encode()).hexdigest()


def run_identity(plan: JobPlan) -> dict[str, Any]:
    """Flat {dotted key: value} of what a resume must keep: the config, the experiment and the
    shard sets' content."""
    flat = {"experiment": plan.experiment, "register_as": plan.register_as,
            **{f"shards.{k}": v for k, v in plan.shards.items()}}
    flat.update(flatten(json.loads(json.dumps(plan.cfg.to_dict()))))
    return flat


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Keys a resume cannot honour: the checkpoint's optimizer and schedule state (lr, decay,
# step size) and its weights (the model's shape, the features it reads) continue as saved.
RESUME_FIXED_KEYS = ("train.lr", "train.weight_decay", "train.lr_drop", "train.lr_gamma",
                     "model.", "data.dataset", "data.video_features", "data.text_features")
FIXED_WHY = ("(the checkpoint's optimizer, schedule and weights continue as saved); start a "
             "new run from its weights with --init-from instead")


def fixed_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FIXED_KEYS)


def allowed_changes(text: str, cfg: ExperimentConfig) -> set[str]:
    """--allow-config-change KEY[,KEY]: each key must be a config key (or `experiment`) that a
    resume can honour (not one of RESUME_FIXED_KEYS)."""
    keys = {k.strip() for k in text.split(",") if k.strip()}
    known = set(flatten(cfg.to_dict())) | {"experiment", "register_as", "shards.train",
                                            "shards.val"}
    unknown = sorted(keys - known)
    if unknown:
        raise PreflightError(f"--allow-config-change: unknown key(s) {', '.join(unknown)}")
    fixed = sorted(k for k in keys if fixed_on_resume(k))
    if fixed:
        raise PreflightError(f"--allow-config-change: {', '.join(fixed)} cannot change on a "
                             f"resume {FIXED_WHY}")
    return keys


def check_resume(plan: JobPlan, allowed: set[str]) -> None:
    """Compare the run's saved record with this submission before anything starts: a
    difference outside `allowed` is a PreflightError naming every differing key; a finished
    run resubmitted unchanged is marked `plan.finished` (nothing to do)."""
    uri = join_uri(plan.run_uri, RUN_RECORD)
    try:
        if not exists(uri):
            return
        record = json.loads(read_bytes(uri))
        saved = {"experiment": record["experiment"], "register_as": record.get("register_as"),
                 **{f"shards.{k}": v for k, v in record.get("shards", {}).items()},
                 **flatten(record["config"])}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PreflightError(f"cannot read the saved run record {uri}: {err}") from None
    new = run_identity(plan)
    diff = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k))
    refused = [k for k in diff if k not in allowed]
    if refused:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in refused)
        fixed = [k for k in refused if fixed_on_resume(k)]
        changeable = [k for k in refused if k not in fixed]
        hints = []
        if changeable:
            hints.append(f"pass --allow-config-change {','.join(changeable)} to accept")
        if fixed:
            hints.append(f"{', '.join(fixed)} cannot change on a resume {FIXED_WHY}")
        raise PreflightError(
            f"--name {plan.name} resumes {plan.run_uri} with a different config ({shown}); "
            f"{'; '.join(hints)}, or use another --name")
    plan.changed = diff
    if record.get("finished") is not None and not diff:
        plan.finished = record["finished"]


def write_run_record(plan: JobPlan, finished: dict[str, Any] | None = None) -> None:
    record = {"name": plan.name, "experiment": plan.experiment,
              "register_as": plan.register_as, "config": plan.cfg.to_dict(),
              "shards": plan.shards, "finished": finished}  # fmt: skip
    write_bytes(join_uri(plan.run_uri, RUN_RECORD),
                json.dumps(record, indent=1, sort_keys=True, default=str).encode())


def check_init_weights(cfg: ExperimentConfig, source: str) -> None:
    """Load --init-from into a CPU copy of the model on the driver, before any worker starts,
    so a wrong URI or a shape mismatch (which tensors) fails fast."""
    try:
        load_weights(build_model(cfg.model), source)
    except CheckpointMismatchError as err:
        raise PreflightError(f"--init-from {source}: {err}") from None
    except (FileNotFoundError, ValueError, OSError) as err:
        raise PreflightError(f"--init-from {source}: cannot load weights ({err})") from None


# ---- metric names ----------------------------------------------------------------------------
def metric_key(name: str) -> str:
    """A brief-metric name MLflow accepts ('@' is not allowed): MR-full-R1@0.5 -> MR-full-R1_at_0.5.
    The same key is used in Ray's reports, so the selection attribute is one name everywhere."""
    return name.replace("@", "_at_")


def eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat {name: value} of an engine.evaluate result: val losses, brief metrics, selection."""
    out = {k: float(v) for k, v in result.items() if k.startswith("val_")}
    for k, v in (result.get("metrics") or {}).get("brief", {}).items():
        out[metric_key(k)] = float(v)
    out[SELECTION_KEY] = float(result.get("selection", float("-inf")))
    return out


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


# ---- deterministic failures: stop, do not retry ---------------------------------------------
FATAL_RECORD = "fatal.json"  # under the run's storage: the error that ended the training
EXIT_FAILED = 1
# Errors a restarted worker group would only meet again: a NaN/inf loss (vl.engine names the
# batch's qids) and a shard whose bytes do not match or decode.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (FloatingPointError, ShardCorruptError)


class RunFailedError(RuntimeError):
    """The training failed: Ray Train gave up on the run (scale.max_failures used up). The
    message is the one line the user sees (the job exits 1, its MLflow run FAILED)."""


class DeterministicFailureError(RunFailedError):
    """The training stopped on a deterministic error, not retried."""


def one_line(err: BaseException) -> str:
    """The error as one line. An error re-raised from a DataLoader worker carries the worker's
    whole traceback in its message; its last line is the error itself."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def write_fatal_record(run_uri: str, rank: int, err: BaseException) -> None:
    record = {"rank": rank, "error": type(err).__name__, "message": one_line(err),
              "time": time.time()}
    write_bytes(join_uri(run_uri, FATAL_RECORD), json.dumps(record, indent=1).encode())


def read_fatal_record(run_uri: str) -> dict[str, Any] | None:
    uri = join_uri(run_uri, FATAL_RECORD)
    return json.loads(read_bytes(uri)) if exists(uri) else None


def take_previous_failure(run_uri: str) -> dict[str, Any] | None:
    """A record left by an earlier submission of this run, removed: a resubmission is the
    user's deliberate retry (after fixing the data, the config or the code), so only the
    automatic restarts within one job are stopped by it."""
    record = read_fatal_record(run_uri)
    if record is not None:
        remove(join_uri(run_uri, FATAL_RECORD))
    return record


def fit(trainer: TorchTrainer, run_id: str, run_uri: str, max_failures: int):
    """`trainer.fit()`, with a deterministic failure recorded by a worker raised as
    DeterministicFailureError (tagged on the MLflow run as `vl.failure`).

    Ray Train retries every worker error up to `scale.max_failures` times and has no filter
    by exception, so the failing rank writes FATAL_RECORD before it raises and the restarted
    group returns at once when it finds it: one restart, no training. The record is looked
    for whether Ray gave up (max_failures 0) or the restarted group returned. Any other
    failure Ray gave up on is raised as RunFailedError with one line."""
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        raise_recorded_failure(run_id, run_uri)
        raise_gave_up(run_id, err, max_failures)
    except Exception:
        raise_recorded_failure(run_id, run_uri)
        raise
    except BaseException:  # SystemExit from closes_run's SIGTERM handler (`ray job stop`)
        withdraw_resource_request(trainer)
        raise
    raise_recorded_failure(run_id, run_uri)
    if result.error is not None:
        raise_gave_up(run_id, result.error, max_failures)
    return result


def withdraw_resource_request(trainer: TorchTrainer) -> None:
    """Withdraw the run's `request_resources()` demand when the driver ends early. Ray Train
    withdraws it only from its controller's shutdown hooks, which a driver that exits mid-fit
    skips, and the autoscaler would go on asking for the run's workers for ~3 minutes (`ray
    status`). Best effort: the coordinator actor and the requester id are Ray Train 2.60's."""
    with contextlib.suppress(Exception):
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        requester = f"train-{trainer.train_run_context.run_id}"
        ray.get(coordinator.cancel_request.remote(requester_id=requester), timeout=5)


def raise_gave_up(run_id: str, err: BaseException, max_failures: int) -> NoReturn:
    """Ray Train gave up on the run: one line (each failed rank with its error's last line, the
    retry budget) tagged as `vl.failure` and raised as RunFailedError. Every rank is named: a
    rank that died takes the others down with it (their collectives fail), and which of them
    Ray lists first says nothing. Ray has already logged every traceback."""
    failures = sorted((getattr(err, "worker_failures", None) or {}).items())
    causes = [(f"rank {rank}", cause) for rank, cause in failures] or \
        [("controller", getattr(err, "controller_failure", err))]
    message = (f"training failed and was not retried further (scale.max_failures="
               f"{max_failures}): {'; '.join(f'{w}: {last_line(c)}' for w, c in causes)}. "
               f"Submit again with the same --name to resume from the last checkpoint")
    MlflowClient().set_tag(run_id, "vl.failure", message[:5000])
    raise RunFailedError(message) from None


def last_line(err: BaseException, limit: int = 300) -> str:
    """An error's last non-empty line (where Ray's wrapped tracebacks put the error itself)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:limit]


def raise_recorded_failure(run_id: str, run_uri: str) -> None:
    record = read_fatal_record(run_uri)
    if record is None:
        return
    message = (f"training stopped on a deterministic error, not retried (rank "
               f"{record['rank']}): {record['message']}. Fix the data or the config and "
               f"submit again with the same --name to resume from the last checkpoint")
    MlflowClient().set_tag(run_id, "vl.failure", message[:5000])
    raise DeterministicFailureError(message) from None


# ---- the worker loop -------------------------------------------------------------------------
def claim_fault(marker: str, rank: int, world: int, note: str) -> bool:
    """Fault injection for tests: True on the rank that takes injected faults (rank 1, or 0
    alone) the first time only, after writing `note` to the `marker` object. The marker lives
    in the run's storage, so the replacement worker group (and a resubmitted job) finds that
    the fault already happened and goes on."""
    if rank != min(1, world - 1) or exists(marker):
        return False
    write_bytes(marker, f"{note}\n".encode())
    return True


def maybe_inject_fault(run_uri: str, step: int, fail_at: int, rank: int, world: int) -> None:
    """Fault injection for tests: one rank dies hard, once per run, at global step `fail_at`."""
    if fail_at < 0 or step != fail_at or not claim_fault(
            f"{run_uri}/fault_injected_at_step_{step}", rank, world,
            f"rank {rank} exited at global step {step}"):
        return
    say(f"[fault injection] rank {rank} exits at global step {step}")
    os._exit(1)


def hold_marker(run_uri: str, step: int) -> str:
    """The object a rank held by `scale.hold_at_step` writes (its rank and pid): what a test
    or benchmark waits for before it kills that rank's process or node."""
    return f"{run_uri}/fault_held_at_step_{step}"


def maybe_hold(run_uri: str, step: int, hold_at: int, rank: int, world: int) -> None:
    """Fault injection for tests: one rank stops once per run at global step `hold_at`, after
    writing `hold_marker` (with its pid) to the run's storage, and waits there, so that
    a test kills its process or node from outside at a known step (mid-epoch) instead of at
    whatever step the clock happens to hit. The others block in their next collective
    meanwhile. Goes on after HOLD_WAIT_S if nothing kills it."""
    if hold_at < 0 or step != hold_at or not claim_fault(
            hold_marker(run_uri, step), rank, world,
            f"rank {rank} (pid {os.getpid()}) held at global step {step}"):
        return
    say(f"[fault injection] rank {rank} holds at global step {step}")
    time.sleep(HOLD_WAIT_S)


def maybe_fail_during_report(run_uri: str, epoch: int, fail_at: int, rank: int,
                             world: int) -> None:  # fmt: skip
    """Fault injection for tests: at the report of evaluation epoch `fail_at` (1-based), one
    rank dies hard once rank 0's checkpoint of that epoch is complete in storage and before
    its own report reaches Ray Train, so the controller never records that checkpoint (what a
    worker lost while rank 0 evaluates and reports does)."""
    if fail_at < 0 or epoch + 1 != fail_at or not claim_fault(
            f"{run_uri}/fault_injected_at_report_{fail_at}", rank, world,
            f"rank {rank} exited during the report of epoch {fail_at}"):
        return
    deadline = time.monotonic() + FAULT_WAIT_S
    while not any(seal["epoch"] == epoch for _, seal in complete_checkpoints(run_uri)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault injection: no checkpoint of epoch {fail_at} appeared "
                               f"under {run_uri} in {FAULT_WAIT_S:.0f} s")
        time.sleep(0.2)
    say(f"[fault injection] rank {rank} exits during the report of epoch {fail_at}")
    os._exit(1)


@dataclass
class WorkerState:
    """One rank's training objects and progress through the run."""

    model: torch.nn.Module  # DDP-wrapped after `prepare_model`
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_epoch: int = 0
    global_step: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "value": float("-inf")})
    unsent_metrics: list = field(default_factory=list)  # (step, metrics, ms) for the tracker
    # A complete checkpoint in storage that Ray Train has not recorded (its report was lost):
    # (the checkpoint, its metrics), reported again once so Ray keeps and ranks it.
    adopted: tuple[ray.train.Checkpoint, dict[str, float]] | None = None


def latest_checkpoint(run_uri: str) -> tuple[ray.train.Checkpoint | None, bool]:
    """(checkpoint to resume from, whether Ray Train has not recorded it).

    Ray's latest recorded checkpoint, unless the run's storage holds a newer complete one
    (vl.checkpoint's seal): the controller records a checkpoint only once every rank's report
    of it has reached it, so a worker lost during the report leaves a finished checkpoint
    behind that Ray does not know; resuming from Ray's alone would redo `eval_every` epochs
    more than the run has to."""
    recorded = ray.train.get_checkpoint()
    found = complete_checkpoints(run_uri)
    if not found:
        return recorded, False
    name, seal = found[-1]
    if recorded is not None:
        seals = dict(found)
        own = seals.get(posixpath.basename(recorded.path.rstrip("/")))
        if own is None or (own["epoch"], own["global_step"]) >= (seal["epoch"],
                                                                 seal["global_step"]):
            return recorded, False
    storage = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(path=f"{storage.experiment_fs_path.rstrip('/')}/{name}",
                                filesystem=storage.storage_filesystem), True


@contextlib.contextmanager
def local_copy(checkpoint: ray.train.Checkpoint) -> Iterator[str]:
    """The checkpoint downloaded into a directory of this process's own. Ray's
    `as_directory` shares one temporary folder among the ranks of a node, and a rank that
    starts late downloads into it again while an earlier one reads `state.pt` from it (seen:
    "PytorchStreamReader failed reading file", one restart of `max_failures` spent)."""
    with tempfile.TemporaryDirectory(prefix="vl-restore-") as local:
        yield checkpoint.to_directory(local)


def restore_or_init(cfg: ExperimentConfig, device: torch.device, init_from: str | None,
                    is_chief: bool, run_uri: str) -> WorkerState:  # fmt: skip
    """The model, loss and optimizer, resumed from the latest checkpoint when there is one
    (`latest_checkpoint`), else initialised from `--init-from` weights (fresh optimizer and
    schedule) or the seed."""
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    # On the device before the optimizer exists: a resumed optimizer state is then loaded next to
    # its parameters (AdamW's state would otherwise stay on the CPU under GPU parameters).
    model = build_model(cfg.model).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    state = WorkerState(model, build_criterion(cfg.loss), optimizer, scheduler)
    checkpoint, unrecorded = latest_checkpoint(run_uri)
    if checkpoint is not None:
        with local_copy(checkpoint) as ckpt_dir:
            saved = restore_training_state(ckpt_dir, model, optimizer, scheduler)
            unsent = Path(ckpt_dir) / UNSENT_METRICS_FILE
            if unsent.exists():
                state.unsent_metrics = json.loads(unsent.read_text())
            if unrecorded:
                metrics = json.loads((Path(ckpt_dir) / METRICS_FILE).read_text())
                state.adopted = (checkpoint, metrics)
        state.start_epoch, state.global_step = saved["epoch"] + 1, saved["global_step"]
        state.history, state.best = saved["history"], saved["best"]
        if is_chief and unrecorded:
            say(f"found {checkpoint.path} complete in storage but not recorded by Ray Train "
                "(a worker was lost during its report): resuming from it")
        if is_chief:
            say(f"resuming from the checkpoint of epoch {saved['epoch'] + 1} (global step "
                f"{state.global_step}); continuing with epoch {state.start_epoch + 1}/"
                f"{cfg.train.epochs}")
    elif init_from:
        load_weights(model, init_from)  # weights only: fresh optimizer/schedule
        if is_chief:
            say(f"initialised from {init_from} (weights only)")
    if cfg.train.compile:  # in place: state_dict keys and checkpoints stay those of the module
        model.compile(dynamic=False, backend=cfg.train.compile_backend)
    state.model = ray.train.torch.prepare_model(model)
    state.criterion.to(device)
    return state


def make_loaders(cfg: ExperimentConfig, rank: int, world: int, is_chief: bool):
    """(train loader of this rank, val loader or None, val ground truth) for the worker."""
    d, t = cfg.data, cfg.train
    common = dict(max_v_l=d.max_v_l, max_q_l=d.max_q_l, max_windows=d.max_windows,
                  video_features=d.video_features, text_features=d.text_features,
                  domain=d.tvsum_domain or None, buffer_size=d.shuffle_buffer,
                  num_workers=d.loader_workers, seed=t.seed,
                  half_batches=True)  # float16 to the device, widened by Batch.to  # fmt: skip
    train = make_loader(d.train, d.batch_size, rank=rank, world_size=world, shuffle=True,
                        equal_per_rank=True, **common)  # fmt: skip
    if not is_chief:
        return train, None, []
    val = make_loader(d.val, d.eval_batch_size, shuffle=False, **common)
    ground_truth = read_annotations(d.val)
    if d.tvsum_domain:
        ground_truth = [g for g in ground_truth if g.get("domain") == d.tvsum_domain]
    return train, val, ground_truth


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: data for its rank, DDP model, vl.engine epochs, report per epoch.

    A deterministic error is recorded in the run's storage before it is raised, and a
    restarted group that finds the record returns without training (see `fit`)."""
    run_uri: str = loop_config["run_uri"]
    quiet_ray_train_reports()
    rank = ray.train.get_context().get_world_rank()
    # A restarted group (after an outage, often) waits for storage before restoring from it:
    # an outage is waited out (bounded, VL_S3_RETRY_TOTAL_S) instead of costing a failure.
    waited = wait_for_storage(run_uri)
    if rank == 0 and waited > 1:
        say(f"storage {run_uri} answered after {waited:.0f} s")
    if read_fatal_record(run_uri) is not None:
        if rank == 0:
            say(f"a deterministic error ended the last attempt ({run_uri}/{FATAL_RECORD}): "
                "not training again")
        return
    try:
        train_worker(loop_config, rank)
    except DETERMINISTIC_ERRORS as err:
        write_fatal_record(run_uri, rank, err)
        raise


def train_worker(loop_config: dict[str, Any], rank: int) -> None:
    """The training of one rank: restore, then epochs until `train.epochs`."""
    cfg = ExperimentConfig.from_dict(loop_config["config"], source="train_loop_config")
    t = cfg.train
    run_uri: str = loop_config["run_uri"]
    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    device = ray.train.torch.get_device()
    is_chief = rank == 0
    state = restore_or_init(cfg, device, loop_config.get("init_from"), is_chief, run_uri)
    if state.adopted is not None:  # every rank reports (a barrier); rank 0 the checkpoint
        checkpoint, metrics = state.adopted
        ray.train.report(metrics, checkpoint=checkpoint if is_chief else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    train_loader, val_loader, ground_truth = make_loaders(cfg, rank, world, is_chief)
    chief = ChiefEvaluation(cfg, loop_config["run_id"], loop_config["selection_metric"],
                            val_loader, ground_truth, device,
                            state.unsent_metrics) if is_chief else None  # fmt: skip
    epoch_times: list[float] = []
    for epoch in range(state.start_epoch, t.epochs):
        train_loader.dataset.set_epoch(epoch)
        steps_before = state.global_step

        def on_step(step: int, _info: dict[str, float], base: int = steps_before) -> None:
            maybe_inject_fault(run_uri, base + step, cfg.scale.fail_at_step, rank, world)
            maybe_hold(run_uri, base + step, cfg.scale.hold_at_step, rank, world)

        stats = train_one_epoch(state.model, state.criterion, train_loader, state.optimizer,
                                epoch, device=device, grad_clip=t.grad_clip, bf16=t.bf16,
                                on_step=on_step, static_shape=cfg.data.static_shape())  # fmt: skip
        state.scheduler.step()
        state.global_step += int(stats["steps"])
        train = mean_over_ranks(stats, world, device)
        epoch_times.append(stats["epoch_seconds"])
        metrics: dict[str, float] = {"epoch": epoch, "global_step": state.global_step,
                                     "lr": stats["lr"], "epoch_seconds": stats["epoch_seconds"],
                                     "samples_per_s": stats["samples_per_s"] * world,
                                     **{f"train_{k}": v for k, v in train.items()}}
        if (epoch + 1) % t.eval_every == 0 or epoch == t.epochs - 1:
            with tempfile.TemporaryDirectory(prefix="vl-ckpt-") as tmp:
                ckpt = chief.evaluate_and_checkpoint(state, epoch, metrics, Path(tmp),
                                                     epoch_times) if chief else None  # fmt: skip
            maybe_fail_during_report(run_uri, epoch, cfg.scale.fail_at_report, rank, world)
            ray.train.report(metrics, checkpoint=ckpt,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
            continue
        ray.train.report(metrics)  # a barrier: every rank reports every epoch
        if chief is not None:
            chief.tracker.log_epoch(epoch, metrics, state.history)
            progress(epoch, t.epochs, metrics, epoch_times)
    if chief is not None:
        chief.tracker.close()  # what an MLflow outage held back, before the driver reads it


@dataclass
class ChiefEvaluation:
    """Rank 0's evaluation epochs: score the val split, log to MLflow, write the checkpoint."""

    cfg: ExperimentConfig
    run_id: str
    selection_metric: str
    val_loader: Any
    ground_truth: list[dict]
    device: torch.device
    unsent_metrics: list = field(default_factory=list)  # from the checkpoint resumed

    def __post_init__(self) -> None:
        self.tracker = Tracker(self.run_id, self.cfg, self.unsent_metrics)

    def evaluate_and_checkpoint(self, state: WorkerState, epoch: int, metrics: dict[str, float],
                                directory: Path, epoch_times: list[float]):  # fmt: skip
        """Evaluate, log the epoch, write the checkpoint into `directory` and return it as a
        Ray checkpoint (metrics gains the evaluation's values in place)."""
        cfg = self.cfg
        result, rows = evaluate(unwrap(state.model), state.criterion, self.val_loader,
                                dataset=cfg.data.dataset, ground_truth=self.ground_truth,
                                device=self.device, epoch=epoch, bf16=cfg.train.bf16,
                                static_shape=cfg.data.static_shape())  # fmt: skip
        metrics.update(eval_metrics(result))
        value = metrics.get(self.selection_metric, float("-inf"))
        if value > state.best["value"] or state.best["epoch"] < 0:
            state.best = {"epoch": epoch, "value": value}
        self.tracker.log_epoch(epoch, metrics, state.history)
        self.tracker.log_eval(epoch, state.history, rows, self.ground_truth, cfg.data.clip_len)
        write_checkpoint(directory, cfg, state, epoch, self.run_id, metrics, rows)
        # Points an MLflow outage holds back travel with the checkpoint: a restart resends them.
        (directory / UNSENT_METRICS_FILE).write_text(json.dumps(self.tracker.log.unsent()))
        seal_checkpoint(directory, epoch, state.global_step)
        checkpoint = upload_checkpoint(directory)
        progress(epoch, cfg.train.epochs, metrics, epoch_times, self.selection_metric)
        return checkpoint


def upload_checkpoint(directory: Path) -> ray.train.Checkpoint:
    """Copy a sealed checkpoint folder into the run's storage before it is reported (the
    report then only names it): a worker lost during the report cannot lose a checkpoint that
    is already complete in storage, and the next attempt finds it (`latest_checkpoint`)."""
    storage = ray.train.get_context().get_storage()
    now = time.time_ns()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"
    path = f"{storage.experiment_fs_path.rstrip('/')}/checkpoint_{stamp}"
    fs = storage.storage_filesystem
    fs.create_dir(path)
    # One thread and large chunks, as Ray Train's own upload: pyarrow's threaded upload to S3
    # can corrupt a file (apache/arrow#32372).
    pyarrow.fs.copy_files(str(directory), path, destination_filesystem=fs, use_threads=False,
                          chunk_size=64 * 1024 * 1024)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report with its full metrics dict at INFO (two ~2 kB lines per
    epoch); keep the job log to our one progress line per epoch."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def say(line: str) -> None:
    """Print one line to the job log. Ray Train patches `print` in workers to log *and* echo
    (every line twice); writing to stdout directly prints it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def mean_over_ranks(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Loss terms averaged over the ranks (each rank saw a different part of the data)."""
    keys = sorted(k for k in stats if k == "loss" or k.startswith("loss_"))
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist(), strict=True))


def write_checkpoint(directory: Path, cfg: ExperimentConfig, state: WorkerState, epoch: int,
                     run_id: str, metrics: dict[str, float],
                     rows: list[dict[str, Any]]) -> None:  # fmt: skip
    """Full training state for resume, the model file for the registry (vl.checkpoint's
    format), and this evaluation's metrics and predictions (so the best checkpoint carries its
    own evidence)."""
    write_training_state(directory, state.model, state.optimizer, state.scheduler, epoch,
                         global_step=state.global_step, config=cfg.to_dict(),
                         history=state.history, best=state.best, run_id=run_id)  # fmt: skip
    write_model_file(directory, cpu_weights(state.model), cfg.to_dict(), epoch)
    (directory / METRICS_FILE).write_text(json.dumps(finite(metrics), indent=1, sort_keys=True))
    with open(directory / PREDICTIONS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def progress(epoch: int, epochs: int, metrics: dict[str, float], epoch_times: list[float],
             selection_metric: str | None = None) -> None:
    """One readable line per epoch on rank 0 (Ray forwards it to the job log)."""
    recent = epoch_times[-5:]
    eta = (epochs - epoch - 1) * sum(recent) / len(recent)
    terms = " ".join(f"{k[len('train_loss_'):]}={v:.3g}" for k, v in sorted(metrics.items())
                     if k.startswith("train_loss_"))
    line = (f"epoch {epoch + 1}/{epochs} loss {metrics['train_loss']:.4f} [{terms}] "
            f"{metrics['samples_per_s']:.1f} samples/s {metrics['epoch_seconds']:.1f} s "
            f"ETA {eta / 60:.1f} min")
    if selection_metric is not None:
        r1 = metrics.get(metric_key("MR-full-R1@0.5"))
        line += f" | eval {selection_metric}={metrics.get(selection_metric, float('nan')):.2f}"
        if r1 is not None:
            line += f" R1@0.5={r1:.2f}"
        if "mAP" in metrics:
            line += f" mAP={metrics['mAP']:.2f}"
    say(line)


class Tracker:
    """Rank 0's MLflow logging into the run the driver opened (by id: no active-run state).

    Through a `tracking.BackgroundLog`: an MLflow outage delays the metrics and figures, never
    the training, and an epoch a resume redoes is logged once."""

    def __init__(self, run_id: str, cfg: ExperimentConfig, unsent: list | None = None) -> None:
        self.run_id = run_id
        self.cfg = cfg
        self.log = tracking.BackgroundLog(run_id, queued=unsent or [])

    def log_epoch(self, epoch: int, metrics: dict[str, float], history: dict) -> None:
        values = finite({k: v for k, v in metrics.items() if k not in ("epoch",)})
        for k, v in values.items():
            history.setdefault(k, []).append((epoch, v))
        self.log.log_metrics(epoch, values)

    def close(self) -> None:
        self.log.close()

    def log_eval(self, epoch: int, history: dict, rows: list[dict], ground_truth: list[dict],
                 clip_len: float) -> None:
        """Curves and saliency examples, replaced at every evaluation (the latest is kept)."""
        curves = {k: v for k, v in history.items()
                  if "loss" in k or k in (SELECTION_KEY, metric_key("MR-full-R1@0.5"), "mAP")}
        self.log.log_figure(figures.plot_curves(curves), "curves")
        if self.cfg.data.dataset != "tvsum" and rows:
            fig = figures.plot_saliency_examples(rows, ground_truth, n=4, clip_len=clip_len)
            self.log.log_figure(fig, "saliency_examples")


# ---- the driver ------------------------------------------------------------------------------
def build_trainer(plan: JobPlan, run_id: str, use_gpu: bool):
    scale = plan.cfg.scale
    # Ray's checkpoint uploads and downloads ride out an S3 outage as vl.storage's calls do.
    storage_fs, storage_path = arrow_filesystem(plan.storage)
    resources = {"CPU": scale.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": plan.cfg.to_dict(), "run_id": run_id,
                           "run_uri": plan.run_uri, "selection_metric": plan.selection_metric,
                           "init_from": plan.init_from},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scale.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=scale.placement_strategy),
        run_config=RunConfig(
            name=plan.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=scale.keep_checkpoints,
                checkpoint_score_attribute=plan.selection_metric,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=scale.max_failures),
        ),
    )


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def best_checkpoint(result, selection_metric: str):
    """(checkpoint, metrics) with the highest selection value among the kept checkpoints."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if selection_metric in m]
    if not candidates:
        return (result.checkpoint, result.metrics or {}) if result.checkpoint else (None, {})
    return max(candidates, key=lambda cm: (cm[1][selection_metric], cm[1].get("epoch", -1)))


def checkpoint_uri(plan: JobPlan, ckpt) -> str:
    """A checkpoint's URI: Ray names it by its path in the storage filesystem (no scheme)."""
    return f"s3://{ckpt.path}" if plan.storage.startswith("s3://") else ckpt.path


def finalize(plan: JobPlan, run_id: str, result) -> dict[str, Any]:
    """Final metrics and best predictions into the run; register the best checkpoint."""
    ckpt, metrics = best_checkpoint(result, plan.selection_metric)
    summary: dict[str, Any] = {"run_name": plan.name, "mlflow_run_id": run_id,
                               "checkpoints": plan.run_uri}
    if ckpt is None:
        return summary
    client = MlflowClient()
    with ckpt.as_directory() as ckpt_dir:
        ckpt_dir = Path(ckpt_dir)
        best_metrics = json.loads((ckpt_dir / METRICS_FILE).read_text())
        final = {"best_epoch": int(best_metrics.get("epoch", -1)),
                 "selection_metric": plan.selection_metric,
                 "selection": best_metrics.get(plan.selection_metric),
                 "best_checkpoint": checkpoint_uri(plan, ckpt), "metrics": best_metrics,
                 "last_epoch_metrics": finite(result.metrics or {})}
        client.log_dict(run_id, final, "metrics/final_metrics.json")
        client.log_artifact(run_id, str(ckpt_dir / PREDICTIONS_FILE), "predictions")
        client.log_metric(run_id, "best_" + SELECTION_KEY,
                          float(best_metrics.get(plan.selection_metric, float("nan"))))
        summary.update(best_epoch=final["best_epoch"], selection=final["selection"],
                       best_checkpoint=checkpoint_uri(plan, ckpt),
                       metrics={k: best_metrics[k] for k in sorted(best_metrics)
                                if not k.startswith(("train_", "val_"))})
        if plan.register_as:
            version, champion = serving.log_and_register_model(
                run_id, ckpt_dir / MODEL_FILE, plan.register_as, plan.selection_metric,
                float(best_metrics.get(plan.selection_metric, float("-inf"))))
            summary.update(registered_model=plan.register_as, version=version,
                           champion=champion)
    return summary


def manifest_digest(manifest: ShardManifest) -> str:
    """The data a shard set holds, by content: its shards' checksums and row counts and its
    feature sets (not the manifest's write time), so re-sharding the same data keeps it."""
    features = manifest.video_features + manifest.text_features
    content = {"dataset": manifest.dataset, "features": [[f.name, f.dim] for f in features],
               "shards": sorted([s.path, s.sha256, s.num_rows] for s in manifest.shards)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def log_training_data(run_id: str, cfg: ExperimentConfig) -> None:
    """The train and val shard sets as the run's dataset inputs, digests from their manifests."""
    for context, uri in (("training", cfg.data.train), ("validation", cfg.data.val)):
        manifest = read_manifest(uri)
        tracking.log_dataset(
            run_id, name=f"{manifest.dataset}-{context}", digest=manifest_digest(manifest),
            uri=uri, context=context,
            profile={"num_rows": manifest.num_rows, "num_shards": len(manifest.shards),
                     "video_features": [f.name for f in manifest.video_features],
                     "text_features": [f.name for f in manifest.text_features]})  # fmt: skip

def connect(plan: JobPlan) -> bool:
    """Join (or start) the Ray cluster and check that it can place the workers, before the
    MLflow run is touched; returns whether GPU workers are used. Raises PreflightError."""
    if not ray.is_initialized():
        use_driver_address(plan.ray_address)
        ray.init(address=plan.ray_address, log_to_driver=True)
    scale = plan.cfg.scale
    use_gpu = scale.use_gpu and cluster_has_gpus()
    check_cluster_capacity(scale.num_workers, scale.cpus_per_worker,
                           gpus_per_worker=1.0 if use_gpu else 0.0)  # Ray's 1 GPU per worker
    if scale.use_gpu and not use_gpu:
        print("note: the config asks for GPU workers but the cluster has no GPU; "
              "training on CPU (gloo)", flush=True)
    return use_gpu


def run(plan: JobPlan) -> dict[str, Any]:
    """Open the MLflow run, train under Ray, finalize. Raises on a failed training."""
    use_gpu = connect(plan)
    write_run_record(plan)
    run_id = tracking.start_or_resume_run(plan.experiment, plan.name)
    params = tracking.flatten_params({**plan.cfg.to_dict(), "job": {
        "storage": plan.storage, "run_name": plan.name, "selection_metric": plan.selection_metric,
        "num_train": plan.num_train, "num_val": plan.num_val}})
    # MLflow params are immutable: a key accepted by --allow-config-change keeps its first
    # value as the param and the change is recorded as a tag.
    tracking.log_params(run_id, {k: v for k, v in params.items() if k not in plan.changed})
    if plan.changed:
        MlflowClient().set_tag(run_id, f"vl.config_change.{int(time.time())}",
                               ", ".join(plan.changed))
    MlflowClient().set_tag(run_id, "vl.checkpoints", plan.run_uri)
    log_training_data(run_id, plan.cfg)
    previous = take_previous_failure(plan.run_uri)
    if previous is not None:
        plan.notes.append(f"the last submission of {plan.name} stopped on: "
                          f"{previous['message']}; trying again")
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    print(f"run {plan.name}: MLflow run {run_id} (experiment {plan.experiment!r}), "
          f"checkpoints under {plan.run_uri}, {plan.num_train} train / {plan.num_val} val "
          f"samples, {plan.cfg.scale.num_workers} workers", flush=True)
    with closes_run(run_id):
        with tracking.system_metrics(run_id):
            result = fit(build_trainer(plan, run_id, use_gpu), run_id, plan.run_uri,
                         plan.cfg.scale.max_failures)
        prune_unrecorded_checkpoints(plan, result)
        summary = finalize(plan, run_id, result)
    tracking.finish_run(run_id, "FINISHED")
    write_run_record(plan, finished=summary)
    return summary


def prune_unrecorded_checkpoints(plan: JobPlan, result) -> None:
    """Remove the checkpoint folders Ray Train does not keep: Ray deletes only those it recorded
    beyond `scale.keep_checkpoints`, so a folder whose report was lost (and which a resume
    adopted and reported again, or superseded) or a half-uploaded one would stay forever."""
    kept = [c for c, _ in (result.best_checkpoints or [])]
    if result.checkpoint is not None:
        kept.append(result.checkpoint)
    if not kept:
        return
    removed = prune_checkpoints(plan.run_uri,
                                {posixpath.basename(c.path.rstrip("/")) for c in kept})
    if removed:
        print(f"removed {len(removed)} checkpoint folder(s) Ray Train does not keep: "
              f"{', '.join(removed)}", flush=True)


@contextlib.contextmanager
def closes_run(run_id: str) -> Iterator[None]:
    """However the job ends, its MLflow run ends with it: KILLED on SIGTERM (`ray job stop`
    sends it, then SIGKILL seconds later) or Ctrl-C, FAILED on an error; never left RUNNING."""
    def on_sigterm(signum: int, _frame: Any) -> None:
        tracking.finish_run(run_id, "KILLED")
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        tracking.finish_run(run_id, "KILLED")
        raise
    except SystemExit:  # the SIGTERM handler has closed the run
        raise
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args)
    except PreflightError as err:
        print(f"jobs.train: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if plan.finished is not None:
        print(f"run {plan.name} already finished with this config (see {plan.run_uri}/"
              f"{RUN_RECORD}); nothing to do", flush=True)
        print("RESULT " + json.dumps(plan.finished, sort_keys=True, default=str), flush=True)
        return 0
    try:
        summary = run(plan)
    except PreflightError as err:
        print(f"jobs.train: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except RunFailedError as err:  # a DeterministicFailureError too
        print(f"jobs.train: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print("RESULT " + json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
