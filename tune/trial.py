"""One search trial: train a TVSum domain's model with given loss coefficients, in-process.

Why a plain function trainable and not Ray Train: a TVSum domain is 4 training videos (one step
of batch 4 per epoch) and one validation video, so a trial is a few MB of tensors and a
millisecond-scale step. Spinning up a Train worker group per trial costs ~10x the trial itself
(STACK.md), and splitting a 4-video batch over DDP ranks would change the batch-summed cosine
losses the paper's coefficients were tuned with. The domain's samples are decoded and collated
ONCE on the driver and shipped to every trial through the object store; each epoch reuses them
(TVSum targets are deterministic: one hard positive and one hard negative per video).

A checkpoint is `vl.checkpoint`'s directory layout: `model.pt` holds the best weights so far
(what the domain's registered model serves) and `state.pt` the latest model, optimiser,
scheduler and RNG state, for a retry or a resumed search to continue where it stopped.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from vl import tracking
from vl.checkpoint import (
    MODEL_FILE,
    cpu_weights,
    load_weights,
    read_weights,
    restore_training_state,
    seed_everything,
    write_model_file,
    write_training_state,
)
from vl.config import ExperimentConfig, apply_values
from vl.data.batch import Batch
from vl.data.dataset import make_loader, read_annotations
from vl.engine import NonFiniteLossError, build_optimizer, evaluate, train_step
from vl.losses import build_criterion
from vl.model import build_model

DOMAIN_TAG = "vl.domain"
TRIAL_TAG = "vl.trial_id"
STOPPED_EARLY_TAG = "vl.stopped_early"
DIVERGED_TAG = "vl.diverged"  # the non-finite loss that ended the trial (its qids)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own parent/child convention (nested runs in the UI)


class InjectedFaultError(RuntimeError):
    """Raised on purpose by `FaultPlan` (tests of the retry policy)."""


@dataclass
class DomainData:
    """A domain's collated training batches, its validation batch and the GT rows to score it."""

    domain: str
    train: list[Batch]
    val: Batch
    ground_truth: list[dict[str, Any]]
    video_dim: int  # model.video_dim (ShardManifest.input_widths: without the TEF dims)
    text_dim: int

    @property
    def num_train(self) -> int:
        return sum(len(b) for b in self.train)


def load_domain(
    train_uri: str,
    val_uri: str,
    domain: str,
    *,
    video_features: list[str],
    text_features: list[str],
    max_v_l: int,
    max_q_l: int,
    batch_size: int,
    cache_dir: str | None = None,
) -> DomainData:
    """Read one domain's rows from the train / val shard sets and collate them once.

    Model dims come from the shard manifest (what is really stored), so synthetic data with small
    dims and real data with `vl.config.FEATURE_DIMS` go through the same code.
    """
    common = dict(
        domain=domain, max_v_l=max_v_l, max_q_l=max_q_l, video_features=video_features,
        text_features=text_features, cache_dir=cache_dir,
    )  # fmt: skip
    train_loader = make_loader(train_uri, batch_size, shuffle=False, **common)
    train = list(train_loader)
    if not train:
        raise ValueError(f"{train_uri}: no training rows for TVSum domain {domain!r}")
    val = list(make_loader(val_uri, 1 << 16, shuffle=False, **common))
    if not val:
        raise ValueError(f"{val_uri}: no validation rows for TVSum domain {domain!r}")
    wanted = {q for b in val for q in b.qids}
    gt = [row for row in read_annotations(val_uri, cache_dir) if row["qid"] in wanted]
    ds = train_loader.dataset
    video_dim, text_dim = ds.manifest.input_widths(ds.video_sets, ds.text_sets)
    return DomainData(
        domain=domain, train=train, val=val[0], ground_truth=gt,
        video_dim=video_dim, text_dim=text_dim,
    )  # fmt: skip


@dataclass
class TrackingTarget:
    """Where a trial logs its child run (None on a TrialSetup: no MLflow, e.g. benchmarks)."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    run_prefix: str  # child run name = f"{run_prefix}/{trial_id}"


@dataclass
class FaultPlan:
    """A trial failing on purpose at `epoch`. kind "crash": raise before training it (`once`:
    only on the first attempt, so a retry continues from the checkpoint; otherwise on every
    attempt). kind "nan": the epoch's first batch carries NaN video features, so the loss
    turns non-finite as a diverging trial's does. Only trials whose `loss.hl_coef` equals `hl`
    and `loss.al_coef` equals `al` (each when given) are affected."""

    epoch: int = -1
    kind: str = "crash"
    once: bool = True
    hl: float | None = None
    al: float | None = None

    def applies(self, epoch: int, cfg: ExperimentConfig) -> bool:
        return (epoch == self.epoch >= 0
                and (self.hl is None or math.isclose(cfg.loss.hl_coef, self.hl))
                and (self.al is None or math.isclose(cfg.loss.al_coef, self.al)))

    def should_fail(self, epoch: int, cfg: ExperimentConfig, restored: bool) -> bool:
        return (self.kind == "crash" and self.applies(epoch, cfg)
                and not (self.once and restored))

    def poison(self, epoch: int, cfg: ExperimentConfig, batches: list[Batch]) -> list[Batch]:
        """`batches` as trained in `epoch`: the first one's video features NaN if planned."""
        if self.kind != "nan" or not self.applies(epoch, cfg):
            return batches
        first = batches[0]
        bad = replace(first, video=torch.full_like(first.video, math.nan))
        return [bad, *batches[1:]]


@dataclass
class TrialSetup:
    """Everything a trial needs besides its coefficients (shipped once via tune.with_parameters)."""

    config: dict[str, Any]  # ExperimentConfig.to_dict() with data/model set for the domain
    data: DomainData
    init_state: dict[str, torch.Tensor] | None = None  # --init-from weights (fine-tuning)
    tracking: TrackingTarget | None = None
    checkpoint_every: int = 0  # epochs between periodic checkpoints (0: only on improvement/end)
    threads: int = 1
    device: str = "cpu"
    faults: tuple[FaultPlan, ...] = ()


def trial_config(setup: TrialSetup, values: dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: the base config with the trial's values set at their
    dotted paths (`loss.hl_coef`, `train.seed`: `tune.space`), as `--set` would."""
    raw = apply_values(setup.config, values)
    return ExperimentConfig.from_dict(raw, source=f"trial of domain {setup.data.domain}")


def top5_map(model: torch.nn.Module, data: DomainData, device: str) -> float:
    """Top-5 mAP (x100) on the domain's validation video(s), through the official scorer."""
    result, _ = evaluate(model, None, [data.val], dataset="tvsum",
                         ground_truth=data.ground_truth, device=device)  # fmt: skip
    return 100.0 * float(result["selection"])


class _ChildRun:
    """The trial's MLflow child run: created (or resumed after a retry) under the domain run."""

    def __init__(self, target: TrackingTarget | None, trial_id: str, params: dict[str, Any]):
        self.run_id = ""
        if target is None:
            return
        mlflow.set_tracking_uri(target.tracking_uri)
        self.run_id = tracking.start_or_resume_run(
            target.experiment, f"{target.run_prefix}/{trial_id}"
        )
        client = MlflowClient()
        for key, value in {PARENT_TAG: target.parent_run_id, TRIAL_TAG: trial_id,
                           DOMAIN_TAG: params["domain"]}.items():  # fmt: skip
            client.set_tag(self.run_id, key, value)
        tracking.log_params(self.run_id, params)
        self.metrics = tracking.RunMetrics(self.run_id)  # a retried trial's redone epochs: once

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run_id:
            self.metrics.log(epoch, metrics)

    def diverge(self, message: str) -> None:
        """FAILED, with the loss's one-line error as the DIVERGED_TAG."""
        if self.run_id:
            MlflowClient().set_tag(self.run_id, DIVERGED_TAG, message[:5000])
            MlflowClient().set_terminated(self.run_id, status="FAILED")

    def finish(self) -> None:
        if self.run_id:
            MlflowClient().set_tag(self.run_id, STOPPED_EARLY_TAG, "false")
            MlflowClient().set_terminated(self.run_id, status="FINISHED")


@dataclass
class _Progress:
    """A trial's position: epochs done, the best top-5 mAP so far, its epoch and weights."""

    done: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    last_checkpoint: int = 0


def _restore(model, optimizer, scheduler) -> tuple[_Progress, bool]:
    """Continue from Tune's checkpoint of this trial (a retry after a crash, or a resumed
    search) when there is one; returns the progress and whether it was restored."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return _Progress(), False
    with checkpoint.as_directory() as folder:
        state = restore_training_state(folder, model, optimizer, scheduler)
        best_state = read_weights(Path(folder) / MODEL_FILE)
    done = state["epoch"] + 1
    return _Progress(done, state["best"], state["best_epoch"], best_state, done), True


def _report(cfg: ExperimentConfig, setup: TrialSetup, p: _Progress, model, optimizer, scheduler,
            metrics: dict[str, Any], improved: bool) -> None:  # fmt: skip
    """Report an evaluation to Tune, with a checkpoint on improvement, every
    `checkpoint_every` epochs and at the end."""
    periodic = setup.checkpoint_every > 0 and p.done - p.last_checkpoint >= setup.checkpoint_every
    if not (improved or periodic or p.done == cfg.train.epochs):
        tune.report(metrics)
        return
    p.last_checkpoint = p.done
    with tempfile.TemporaryDirectory(prefix="vl-tune-") as tmp:
        write_model_file(tmp, p.best_state, cfg.to_dict(), p.best_epoch, top5_map=p.best,
                         domain=setup.data.domain)  # fmt: skip
        write_training_state(tmp, model, optimizer, scheduler, p.done - 1, best=p.best,
                             best_epoch=p.best_epoch)  # fmt: skip
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train, evaluate every `eval_every` epochs, report, checkpoint.

    `config` is keyed by dotted config paths (`tune.space`). Reports `epoch`, `top5_map` (this
    evaluation), `best_top5_map` (the best so far: the value the paper selects on, and what ASHA
    compares) and `mlflow_run_id` for the driver's callback.
    """
    torch.set_num_threads(max(1, setup.threads))
    cfg = trial_config(setup, config)
    domain, device = setup.data.domain, setup.device
    trial_id = tune.get_context().get_trial_id() or "local"
    child = _ChildRun(setup.tracking, trial_id, {**config, "domain": domain,
                                                 "epochs": cfg.train.epochs})  # fmt: skip
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    if setup.init_state is not None:
        load_weights(model, setup.init_state)
    model.to(device)
    criterion = build_criterion(cfg.loss).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    train_batches = [b.to(device) for b in setup.data.train]
    p, restored = _restore(model, optimizer, scheduler)
    for epoch in range(p.done, cfg.train.epochs):
        if any(f.should_fail(epoch, cfg, restored) for f in setup.faults):
            raise InjectedFaultError(f"injected fault in domain {domain} at epoch {epoch}")
        batches = train_batches
        for fault in setup.faults:
            batches = fault.poison(epoch, cfg, batches)
        try:
            losses = [
                train_step(model, criterion, batch, optimizer, epoch,
                           grad_clip=cfg.train.grad_clip, bf16=cfg.train.bf16)["loss"]
                for batch in batches
            ]  # fmt: skip
        except NonFiniteLossError as err:
            # Deterministic: a retry from the last checkpoint would diverge again. The trial
            # ends here, reported as diverged (its best so far still counts), not retried.
            child.diverge(str(err))
            tune.report({"epoch": p.done, "best_top5_map": p.best if p.best > -math.inf
                         else math.nan, "best_epoch": p.best_epoch, "diverged": str(err),
                         "mlflow_run_id": child.run_id})  # fmt: skip
            return
        scheduler.step()
        p.done = epoch + 1
        if p.done % cfg.train.eval_every and p.done != cfg.train.epochs:
            continue
        score = top5_map(model, setup.data, device)
        improved = score > p.best
        if improved:
            p.best, p.best_epoch, p.best_state = score, p.done, cpu_weights(model)
        train_loss = float(torch.stack(losses).mean())
        child.log(p.done, {"top5_map": score, "best_top5_map": p.best, "train_loss": train_loss})
        metrics = {"epoch": p.done, "top5_map": score, "best_top5_map": p.best,
                   "best_epoch": p.best_epoch, "train_loss": train_loss,
                   "mlflow_run_id": child.run_id}  # fmt: skip
        _report(cfg, setup, p, model, optimizer, scheduler, metrics, improved)
    child.finish()


def thread_budget(cpus_per_trial: float) -> int:
    """torch intra-op threads for a trial holding `cpus_per_trial` logical CPUs."""
    return max(1, min(int(cpus_per_trial), os.cpu_count() or 1))
