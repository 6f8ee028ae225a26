"""MLflow on the search driver: a parent run per domain, closing trials' child runs, the
summary run, and registering each domain's best model.

Why the driver closes child runs: a trial that ASHA stops is ended from outside its own code
(Tune stops the actor after a report), so it never reaches the line that ends its MLflow run;
left alone it would stay RUNNING forever (STACK.md). The driver sees every trial end (callback)
and sweeps again after `fit()`, which also covers a driver that was itself interrupted.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from tune import space
from tune.report import TrialOutcome
from tune.trial import DOMAIN_TAG, STOPPED_EARLY_TAG
from vl import serving, tracking
from vl.checkpoint import MODEL_FILE

KIND_TAG = "vl.kind"
REGISTERED_VERSION_TAG = "vl.registered_version"
REGISTERED_FROM_TAG = "vl.registered_from_run"
STATUS_TAG = "vl.trial_status"


def start_domain_run(experiment: str, search_name: str, domain: str,
                     params: dict[str, Any]) -> str:  # fmt: skip
    """The domain's parent run (resumed on a re-run of the same search name)."""
    run_id = tracking.start_or_resume_run(experiment, f"{search_name}/{domain}")
    client = MlflowClient()
    client.set_tag(run_id, KIND_TAG, "tvsum-domain-search")
    client.set_tag(run_id, DOMAIN_TAG, domain)
    tracking.log_params(run_id, {**params, "domain": domain})
    return run_id


def _close(run_id: str, status: str, stopped_early: bool | None, trial_status: str) -> None:
    if not run_id:
        return
    client = MlflowClient()
    run = client.get_run(run_id)
    if stopped_early is not None:
        client.set_tag(run_id, STOPPED_EARLY_TAG, "true" if stopped_early else "false")
    client.set_tag(run_id, STATUS_TAG, trial_status)
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


class ChildRunCloser(tune.Callback):
    """Ends a trial's child run when Tune is done with it: FINISHED (tagged stopped early when it
    ran fewer epochs than asked: ASHA), FAILED after its last retry, or FAILED at once when its
    loss diverged (not retried)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("diverged"):
            _close(str(result.get("mlflow_run_id", "")), "FAILED", None, "diverged")
            return
        stopped = int(result.get("epoch", 0)) < self.epochs
        _close(str(result.get("mlflow_run_id", "")), "FINISHED", stopped,
               "stopped" if stopped else "finished")  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        _close(str(result.get("mlflow_run_id", "")), "FAILED", None, "failed")


class InterruptAfter(tune.Callback):
    """Sends this process SIGINT (a user's Ctrl-C) once `count` trials have completed: a
    deterministic interruption for the resume test and for trying resumption by hand."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0

    def __getstate__(self) -> dict[str, int]:
        # Tune pickles the run config (callbacks included) into the experiment state; a resumed
        # search must not be interrupted again, so the stored copy is inert.
        return {"count": 0, "seen": 0}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.seen += 1
        if self.seen == self.count:
            os.kill(os.getpid(), signal.SIGINT)


def outcomes_of(domain: str, grid: tune.ResultGrid, epochs: int) -> list[TrialOutcome]:
    """One TrialOutcome per trial of a domain's ResultGrid (failed trials included)."""
    out = []
    for result in grid:
        m = result.metrics or {}
        coefs = space.short_names(result.config or {})
        run_epochs = int(m.get("epoch", 0))
        if result.error is not None:
            status = "failed"
        elif m.get("diverged"):
            status = "diverged"
        elif run_epochs < epochs:
            status = "stopped"
        else:
            status = "finished"
        out.append(TrialOutcome(
            domain=domain, trial_id=str(m.get("trial_id", Path(result.path).name)),
            hl=coefs["hl"], scsl=coefs["scsl"], al=coefs["al"],
            best_top5_map=float(m.get("best_top5_map", math.nan)),
            epochs_run=run_epochs, status=status, run_id=str(m.get("mlflow_run_id", "")),
            diverged=str(m.get("diverged") or ""),
        ))  # fmt: skip
    return out


def sweep_child_runs(outcomes: Sequence[TrialOutcome], interrupted: bool) -> None:
    """Close every child run the callback missed; trials cut by an interruption are KILLED (a
    resumed search marks them RUNNING again)."""
    for t in outcomes:
        if not t.run_id:
            continue
        if t.status in ("failed", "diverged"):
            _close(t.run_id, "FAILED", None, t.status)
        elif interrupted and t.status == "stopped":
            continue  # unknown yet: Tune may continue it on resume; leave for the resumed run
        else:
            _close(t.run_id, "FINISHED", t.status == "stopped", t.status)


def mark_interrupted(outcomes: Sequence[TrialOutcome]) -> None:
    client = MlflowClient()
    for t in outcomes:
        if t.run_id and client.get_run(t.run_id).info.status == "RUNNING":
            client.set_terminated(t.run_id, status="KILLED")


def best_checkpoint(grid: tune.ResultGrid, trial_id: str):
    for result in grid:
        if str((result.metrics or {}).get("trial_id", "")) == trial_id:
            return result.checkpoint
    return None


def finish_domain(parent_run_id: str, grid: tune.ResultGrid, best: TrialOutcome,
                  registered_name: str) -> str | None:  # fmt: skip
    """Log the domain's best on its parent run and register the best trial's model (once per
    best trial: a re-run of a finished search does not add duplicate versions). The `champion`
    alias moves to it when it beats the current champion's top-5 mAP (vl.tracking's rule)."""
    client = MlflowClient()
    tracking.log_epoch(parent_run_id, 0, {
        "best_top5_map": best.best_top5_map, "best_hl": best.hl, "best_scsl": best.scsl,
        "best_al": best.al,
    })  # fmt: skip
    client.set_tag(parent_run_id, "vl.best_trial", best.trial_id)
    tags = client.get_run(parent_run_id).data.tags
    version = None
    if tags.get(REGISTERED_FROM_TAG) == best.run_id and REGISTERED_VERSION_TAG in tags:
        version = tags[REGISTERED_VERSION_TAG]
    else:
        checkpoint = best_checkpoint(grid, best.trial_id)
        if checkpoint is not None and best.run_id:
            with checkpoint.as_directory() as folder:
                version, _ = serving.log_and_register_model(
                    best.run_id, Path(folder) / MODEL_FILE, registered_name, "top5_map",
                    best.best_top5_map,
                )  # fmt: skip
            client.set_tag(parent_run_id, REGISTERED_VERSION_TAG, str(version))
            client.set_tag(parent_run_id, REGISTERED_FROM_TAG, best.run_id)
    client.set_terminated(parent_run_id, status="FINISHED")
    return version


def log_summary(experiment: str, search_name: str, artifacts: dict[str, str],
                figures: dict[str, Any], metrics: dict[str, float],
                params: dict[str, Any]) -> str:  # fmt: skip
    """The summary run: tables as text artifacts, heatmaps under plots/, headline metrics."""
    run_id = tracking.start_or_resume_run(experiment, f"{search_name}/summary")
    client = MlflowClient()
    client.set_tag(run_id, KIND_TAG, "tvsum-search-summary")
    tracking.log_params(run_id, params)
    with tempfile.TemporaryDirectory(prefix="vl-summary-") as tmp:
        for name, text in artifacts.items():
            (Path(tmp) / name).write_text(text)
        client.log_artifacts(run_id, tmp, artifact_path="tables")
    for name, fig in figures.items():
        tracking.log_figure(run_id, fig, name)
    tracking.log_epoch(run_id, 0, metrics)
    client.set_terminated(run_id, status="FINISHED")
    return run_id
