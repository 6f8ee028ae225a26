"""One search trial: train a TVSum domain's model with given loss coefficients, in-process.

Why a plain function trainable and not Ray Train: a TVSum domain is 4 training videos (one step
of batch 4 per epoch) and one validation video, so a trial is a few MB of tensors and a
millisecond-scale step. Spinning up a Train worker group per trial costs ~10x the trial itself
(STACK.md), and splitting a 4-video batch over DDP ranks would change the batch-summed cosine
losses the paper's coefficients were tuned with. The domain's samples are decoded and collated
ONCE on the driver and shipped to every trial through the object store; each epoch reuses them
(TVSum targets are deterministic: one hard positive and one hard negative per video).

A checkpoint is a directory with `best.pt` (the registrable model: keys `model` and `config`, the
format `vl.tracking.log_and_register_model` expects) and `state.pt` (the latest model, optimiser
and scheduler, for a retry or a resumed search to continue where it stopped).
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vl.config import ExperimentConfig
from vl.data.batch import Batch
from vl.data.dataset import make_loader, read_annotations

BEST_FILE = "best.pt"
STATE_FILE = "state.pt"
DOMAIN_TAG = "vl.domain"
TRIAL_TAG = "vl.trial_id"
STOPPED_EARLY_TAG = "vl.stopped_early"
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
    video_dim: int  # model input video dim WITHOUT the 2 TEF dims (what model.video_dim means)
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
    return DomainData(
        domain=domain, train=train, val=val[0], ground_truth=gt,
        video_dim=ds.video_dim - 2, text_dim=ds.text_dim,
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
    """Crash a trial on purpose at `epoch` (before training it): `once` only on the first
    attempt (a retry then continues from the checkpoint), otherwise on every attempt. Only trials
    whose hl equals `hl` (when given) are affected."""

    epoch: int = -1
    once: bool = True
    hl: float | None = None

    def should_fail(self, epoch: int, coefs: dict[str, Any], restored: bool) -> bool:
        if self.epoch < 0 or epoch != self.epoch:
            return False
        if self.hl is not None and not math.isclose(float(coefs["hl"]), self.hl):
            return False
        return not (self.once and restored)


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
    fault: FaultPlan = field(default_factory=FaultPlan)


def trial_config(setup: TrialSetup, coefs: dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: the base config with this trial's coefficients."""
    raw = copy.deepcopy(setup.config)
    raw["loss"].update(
        hl_coef=float(coefs["hl"]), scsl_coef=float(coefs["scsl"]), al_coef=float(coefs["al"])
    )
    raw["train"]["seed"] = int(coefs.get("seed", raw["train"]["seed"]))
    return ExperimentConfig.from_dict(raw, source=f"trial of domain {setup.data.domain}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def top5_map(model: torch.nn.Module, data: DomainData, device: str) -> float:
    """Top-5 mAP (x100) on the domain's validation video(s), through the official scorer."""
    from vl.engine import evaluate

    result, _ = evaluate(model, None, [data.val], dataset="tvsum",
                         ground_truth=data.ground_truth, device=device)  # fmt: skip
    return 100.0 * float(result["selection"])


class _ChildRun:
    """The trial's MLflow child run: created (or resumed after a retry) under the domain run."""

    def __init__(self, target: TrackingTarget | None, trial_id: str, params: dict[str, Any]):
        self.run_id = ""
        if target is None:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        from vl import tracking

        mlflow.set_tracking_uri(target.tracking_uri)
        self.run_id = tracking.start_or_resume_run(
            target.experiment, f"{target.run_prefix}/{trial_id}"
        )
        client = MlflowClient()
        for key, value in {PARENT_TAG: target.parent_run_id, TRIAL_TAG: trial_id,
                           DOMAIN_TAG: params["domain"]}.items():  # fmt: skip
            client.set_tag(self.run_id, key, value)
        tracking.log_params(self.run_id, params)

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run_id:
            from vl import tracking

            tracking.log_epoch(self.run_id, epoch, metrics)

    def finish(self) -> None:
        if self.run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient().set_tag(self.run_id, STOPPED_EARLY_TAG, "false")
            MlflowClient().set_terminated(self.run_id, status="FINISHED")


def _save_checkpoint(folder: Path, best: dict[str, Any], state: dict[str, Any]) -> None:
    torch.save(best, folder / BEST_FILE)
    torch.save(state, folder / STATE_FILE)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train, evaluate every `eval_every` epochs, report, checkpoint.

    Reports `epoch`, `top5_map` (this evaluation), `best_top5_map` (the best so far: the value
    the paper selects on, and what ASHA compares) and `mlflow_run_id` for the driver's callback.
    """
    from ray import tune

    from vl.engine import build_optimizer, train_step
    from vl.losses import build_criterion
    from vl.model import build_model

    torch.set_num_threads(max(1, setup.threads))
    cfg = trial_config(setup, config)
    domain = setup.data.domain
    trial_id = tune.get_context().get_trial_id() or "local"
    coefs = {k: float(config[k]) for k in ("hl", "scsl", "al")}
    child = _ChildRun(setup.tracking, trial_id, {**coefs, "seed": cfg.train.seed,
                                                 "domain": domain,
                                                 "epochs": cfg.train.epochs})  # fmt: skip
    seed_everything(cfg.train.seed)
    device = setup.device
    model = build_model(cfg.model)
    if setup.init_state is not None:
        model.load_state_dict(setup.init_state)
    model.to(device)
    criterion = build_criterion(cfg.loss).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    epochs, eval_every = cfg.train.epochs, cfg.train.eval_every
    train_batches = [b.to(device) for b in setup.data.train]
    data = setup.data

    start, best, best_epoch = 0, -math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a crash, or a resumed search
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
            best_state = torch.load(Path(folder) / BEST_FILE, map_location="cpu",
                                    weights_only=True)["model"]  # fmt: skip
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]

    last_checkpoint = start
    for epoch in range(start, epochs):
        if setup.fault.should_fail(epoch, coefs, restored=checkpoint is not None):
            raise InjectedFaultError(f"injected fault in domain {domain} at epoch {epoch}")
        losses = [
            train_step(model, criterion, batch, optimizer, epoch,
                       grad_clip=cfg.train.grad_clip, bf16=cfg.train.bf16)["loss"]
            for batch in train_batches
        ]  # fmt: skip
        scheduler.step()
        done = epoch + 1
        if done % eval_every and done != epochs:
            continue
        score = top5_map(model, data, device)
        improved = score > best
        if improved:
            best, best_epoch = score, done
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        train_loss = float(torch.stack(losses).mean())
        metrics = {"epoch": done, "top5_map": score, "best_top5_map": best,
                   "best_epoch": best_epoch, "train_loss": train_loss,
                   "mlflow_run_id": child.run_id}  # fmt: skip
        child.log(done, {"top5_map": score, "best_top5_map": best, "train_loss": train_loss})
        periodic = setup.checkpoint_every > 0 and done - last_checkpoint >= setup.checkpoint_every
        if improved or periodic or done == epochs:
            last_checkpoint = done
            with tempfile.TemporaryDirectory(prefix="vl-tune-") as tmp:
                _save_checkpoint(
                    Path(tmp),
                    {"model": best_state, "config": cfg.to_dict(), "epoch": best_epoch,
                     "top5_map": best, "domain": domain},
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "epoch": done, "best": best, "best_epoch": best_epoch},
                )  # fmt: skip
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)
    child.finish()


def thread_budget(cpus_per_trial: float) -> int:
    """torch intra-op threads for a trial holding `cpus_per_trial` logical CPUs."""
    return max(1, min(int(cpus_per_trial), os.cpu_count() or 1))
