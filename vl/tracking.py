"""MLflow helpers the training job calls on rank 0: params, metrics, figures, model, registry.

Everything goes through an explicit `run_id` and `MlflowClient` rather than MLflow's fluent
"active run": the job resumes runs after failures and must never end (or start) a run as a side
effect of logging. Imports mlflow, torch and numpy only; never ray (ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vl.data.batch import Batch

RUN_NAME_TAG = "vl.run_name"
CHAMPION_ALIAS = "champion"
SELECTION_METRIC_TAG = "vl.selection_metric"
SELECTION_VALUE_TAG = "vl.selection_value"
CHECKPOINT_ARTIFACT = "checkpoint"
FEATURES_METADATA = "vl.features"  # MLmodel metadata: the FeatureRecipe the model's inputs need

# A config key that names a secret is never logged, whatever its value looks like.
_CREDENTIAL_KEY = re.compile(r"secret|password|passwd|token|access_key|key_id|credential")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit)


class TrackingServerUnavailableError(RuntimeError):
    """The MLflow tracking server does not answer; raised before any expensive work starts."""


# ---- params ---------------------------------------------------------------------------------
def _is_credential(key: str) -> bool:
    return bool(_CREDENTIAL_KEY.search(key.lower().replace("-", "_")))


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.hidden_dim": "256", ...} with credential-like keys dropped.

    A key is dropped (with its whole subtree) when any dotted component looks like a secret,
    so `storage.credentials.anything` never reaches the tracking server. Lists are logged as
    JSON; long values are truncated to MLflow's limit.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        if _is_credential(str(key)):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def log_params(run_id: str, cfg: Mapping[str, Any]) -> None:
    """Log `flatten_params(cfg)`, skipping keys a resumed run already has with the same value.

    MLflow params are immutable: re-logging an equal value is harmless, a different one is an
    error, which is what we want (a resumed run must not silently change its config).
    """
    existing = MlflowClient().get_run(run_id).data.params
    todo = [
        Param(k, v) for k, v in flatten_params(cfg).items() if existing.get(k) != v
    ]
    client = MlflowClient()
    for start in range(0, len(todo), _BATCH_LIMIT):
        client.log_batch(run_id, params=todo[start : start + _BATCH_LIMIT])


# ---- server and runs ------------------------------------------------------------------------
def check_tracking_server(uri: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail fast, with a message that says what to do, when the tracking server is down.

    Called by the job driver before any Ray worker starts, so a typo in MLFLOW_TRACKING_URI
    costs seconds rather than a worker group start-up and a crash at the first report.
    Non-HTTP URIs (a local sqlite file) need no server and pass.
    """
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingServerUnavailableError(
        f"MLflow tracking server at {uri} is unreachable: {problem}. Set MLFLOW_TRACKING_URI "
        "to a running server (`python -m cluster.local.stack up` starts one locally)."
    )


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_or_resume_run(experiment: str, run_name: str) -> str:
    """The id of the run tagged `vl.run_name == run_name` in `experiment`, created if missing.

    Why a tag and not MLflow's run name: run names are not unique and MLflow may rewrite them;
    a job restarted after a failure (same `--name`) must continue the same run, not add a
    duplicate next to it. A resumed run is marked RUNNING again.
    """
    if "'" in run_name:
        raise ValueError(f"run name {run_name!r} must not contain a single quote")
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """End a run started by `start_or_resume_run` (FINISHED, FAILED or KILLED)."""
    MlflowClient().set_terminated(run_id, status=status)


def log_epoch(run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """Log one epoch's metrics in a single request, with step = epoch."""
    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, int(epoch)) for key, value in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(entries), 1000):  # MLflow's per-batch metric limit
        client.log_batch(run_id, metrics=entries[start : start + 1000])


# ---- figures --------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (no global state, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss curves (left, log scale when positive) and evaluation metrics (right) per epoch."""
    fig = _figure(11, 4)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in sorted(history):
        points = [(s, v) for s, v in history[key] if math.isfinite(v)]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax = ax_loss if "loss" in key else ax_metric
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    for ax, title in ((ax_loss, "losses"), (ax_metric, "metrics")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    loss_values = [y for line in ax_loss.get_lines() for y in line.get_ydata()]
    if loss_values and min(loss_values) > 0:
        ax_loss.set_yscale("log")
    return fig


def gt_saliency(gt_row: Mapping[str, Any], num_clips: int) -> np.ndarray:
    """QVHighlights GT saliency per clip: the sum of the 3 annotators on relevant clips, else 0."""
    labels = np.zeros(num_clips, dtype=np.float32)
    clip_ids = gt_row.get("relevant_clip_ids") or []
    scores = gt_row.get("saliency_scores") or []
    for clip, per_annotator in zip(clip_ids, scores, strict=False):
        if 0 <= clip < num_clips:
            labels[clip] = float(sum(per_annotator))
    return labels


def plot_saliency_examples(
    rows: Sequence[Mapping[str, Any]], gt_rows: Sequence[Mapping[str, Any]], n: int = 4,
    clip_len: float = 2.0,
) -> Figure:
    """Predicted vs GT saliency over time for `n` queries, with the predicted top-1 window and
    the GT windows drawn as spans (the paper's qualitative figures)."""
    gt_by_qid = {row["qid"]: row for row in gt_rows}
    pairs = [(row, gt_by_qid[row["qid"]]) for row in rows if row["qid"] in gt_by_qid][:n]
    fig = _figure(10, 2.2 * max(len(pairs), 1))
    axes = fig.subplots(max(len(pairs), 1), 1, squeeze=False)[:, 0]
    if not pairs:
        axes[0].text(0.5, 0.5, "no prediction has a ground-truth row", ha="center")
        axes[0].set_axis_off()
        return fig
    for ax, (row, gt) in zip(axes, pairs, strict=False):
        pred = np.asarray(row.get("pred_saliency_scores") or [], dtype=np.float32)
        num_clips = max(len(pred), int(math.ceil(float(gt.get("duration", 0)) / clip_len)))
        times = (np.arange(num_clips) + 0.5) * clip_len  # clip centres, seconds
        for st, ed in gt.get("relevant_windows") or []:
            ax.axvspan(st, ed, color="tab:green", alpha=0.18, lw=0)
        ax.plot(times, gt_saliency(gt, num_clips), color="tab:green", label="GT saliency (0..12)")
        ax.set_ylabel("GT")
        ax.set_ylim(0, 12.5)
        twin = ax.twinx()
        if len(pred):
            twin.plot(times[: len(pred)], pred, color="tab:blue", label="predicted saliency")
        twin.set_ylabel("pred")
        windows = row.get("pred_relevant_windows") or []
        if windows:
            st, ed, score = max(windows, key=lambda w: w[2])
            ax.axvspan(st, ed, ymin=0.92, ymax=1.0, color="tab:red", alpha=0.8, lw=0,
                       label=f"pred top-1 ({score:.2f})")
        query = str(gt.get("query", row.get("query", "")))
        ax.set_title(f"qid {row['qid']}: {query[:90]}", fontsize=9, loc="left")
        ax.set_xlim(0, num_clips * clip_len)
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = twin.get_legend_handles_labels()
        ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time (s)")
    return fig


def log_figure(run_id: str, fig: Figure, name: str) -> None:
    """Store `fig` as plots/<name>.png in the run's artifacts."""
    if not Path(name).suffix:
        name = f"{name}.png"
    MlflowClient().log_figure(run_id, fig, f"plots/{name}")


# ---- the served model -----------------------------------------------------------------------
class VideoLightsPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: a training checkpoint plus the code to rebuild and run it.

    Why a pyfunc wrapper and not `mlflow.pytorch`: its default torch.export format fixes the
    batch shape of a model with several inputs and a GRU (STACK.md); the wrapper also owns the
    padding and post-processing, so a caller sends per-sample features and gets official rows.
    """

    # The input is a dict of ragged per-sample arrays, which MLflow's type-hint validation
    # cannot describe; opting out also stops its warning at every import of this module.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from vl.config import ExperimentConfig
        from vl.model import build_model

        path = context.artifacts[CHECKPOINT_ARTIFACT]
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.cfg = ExperimentConfig.from_dict(checkpoint["config"], source=f"{path}:config")
        self.model = build_model(self.cfg.model)
        self.model.load_state_dict(checkpoint["model"])
        self.model.eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """`model_input`: a dict (or a DataFrame, one row per sample) with `video_features`
        (per-sample (Lv, Dv+2) arrays: normalised, TEF appended), `text_features` ((Lq, Dt)),
        optional `duration` (s) and `qid`. Returns official rows (qid, pred_relevant_windows,
        pred_saliency_scores). `params={"batch_size": k}` bounds memory (default 32)."""
        from vl.engine import predict_rows

        samples = _samples(model_input)
        size = int((params or {}).get("batch_size", 32))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(samples), size):
            batch = make_batch(samples[start : start + size], self.cfg, offset=start)
            rows.extend(predict_rows(self.model, batch, dataset=self.cfg.data.dataset))
        return rows


def _samples(model_input: Any) -> list[dict[str, Any]]:
    """One dict per sample from a column dict or a pandas DataFrame."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        model_input = {col: list(model_input[col]) for col in model_input.columns}
    if not isinstance(model_input, Mapping):
        raise TypeError(
            f"model input must be a dict or DataFrame, got {type(model_input).__name__}"
        )
    missing = {"video_features", "text_features"} - set(model_input)
    if missing:
        raise KeyError(f"model input lacks {sorted(missing)}; it has {sorted(model_input)}")
    count = len(model_input["video_features"])
    if len(model_input["text_features"]) != count:
        raise ValueError(
            f"model input has {count} video_features but "
            f"{len(model_input['text_features'])} text_features"
        )
    optional = ("duration", "qid")
    columns = ["video_features", "text_features", *(c for c in optional if c in model_input)]
    return [{c: model_input[c][i] for c in columns} for i in range(count)]


def make_batch(samples: Sequence[Mapping[str, Any]], cfg: Any, offset: int = 0) -> Batch:
    """Pad per-sample features into a `Batch` with masks and dummy targets (inference only).

    Text longer than `model.max_q_l` keeps its first rows, like the training loader.
    """
    import torch

    from vl.data.batch import Batch

    dv, dt = cfg.model.video_input_dim, cfg.model.text_dim
    videos, texts = [], []
    for i, sample in enumerate(samples):
        video = np.asarray(sample["video_features"], dtype=np.float32)
        text = np.asarray(sample["text_features"], dtype=np.float32)[: cfg.model.max_q_l]
        if video.ndim != 2 or video.shape[1] != dv or len(video) == 0:
            raise ValueError(
                f"sample {offset + i}: video_features has shape {video.shape}; the model "
                f"expects (clips, {dv}) = normalised features + 2 TEF dims"
            )
        if text.ndim != 2 or text.shape[1] != dt or len(text) == 0:
            raise ValueError(
                f"sample {offset + i}: text_features has shape {text.shape}; "
                f"expected (tokens, {dt})"
            )
        videos.append(video)
        texts.append(text)
    B = len(samples)
    Lv, Lq = max(len(v) for v in videos), max(len(t) for t in texts)
    video = torch.zeros(B, Lv, dv)
    video_mask = torch.zeros(B, Lv)
    text = torch.zeros(B, Lq, dt)
    text_mask = torch.zeros(B, Lq)
    for b, (v, t) in enumerate(zip(videos, texts, strict=True)):
        video[b, : len(v)] = torch.from_numpy(v)
        video_mask[b, : len(v)] = 1
        text[b, : len(t)] = torch.from_numpy(t)
        text_mask[b, : len(t)] = 1
    clip_len = float(cfg.data.clip_len)
    return Batch(
        video=video,
        video_mask=video_mask,
        text=text,
        text_mask=text_mask,
        span_targets=torch.zeros(B, 1, 2),
        span_mask=torch.zeros(B, 1, dtype=torch.bool),
        saliency_labels=torch.zeros(B, Lv),
        saliency_pos_idx=torch.zeros(B, 2, dtype=torch.int64),
        saliency_neg_idx=torch.zeros(B, 2, dtype=torch.int64),
        qids=[s.get("qid", offset + i) for i, s in enumerate(samples)],
        durations=[
            float(s["duration"]) if s.get("duration") is not None else len(v) * clip_len
            for s, v in zip(samples, videos, strict=True)
        ],
        clip_len=clip_len,
    )


def _requirements() -> list[str]:
    """Pin the installed package so a served model runs the code it was trained with."""
    try:
        return [f"videolights-ray=={metadata.version('videolights-ray')}"]
    except metadata.PackageNotFoundError:
        return ["videolights-ray"]


def _features_of(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The FeatureRecipe (as a dict) of a training checkpoint's config (its preset fills what
    the stored dict leaves out); empty when the checkpoint holds no usable config."""
    import torch

    from vl.config import ConfigError, ExperimentConfig
    from vl.extractors import recipe_from_config

    stored = torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("config")
    try:
        cfg = ExperimentConfig.from_dict(stored, source=f"{checkpoint_path}:config")
    except ConfigError:
        return {}
    return recipe_from_config(cfg.to_dict()).to_dict()


def _metric_of(version: Any, metric_name: str) -> float | None:
    tags = version.tags or {}
    if tags.get(SELECTION_METRIC_TAG) != metric_name or SELECTION_VALUE_TAG not in tags:
        return None
    return float(tags[SELECTION_VALUE_TAG])


def log_and_register_model(
    run_id: str,
    checkpoint_path: str | os.PathLike,
    registered_name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    features: Mapping[str, Any] | None = None,
) -> tuple[str, bool]:
    """Log the checkpoint as a pyfunc model in the run, register a version, and move the
    `champion` alias to it only if it beats the current champion on `metric_name`.

    The model directory is built locally and uploaded with the client, so the run's status is
    never touched (the fluent `log_model` would need an active run and end it). A champion
    without a comparable tag (other metric, or none) is replaced. Returns (version, champion?).
    The model's MLmodel metadata records which feature sets (and extractor models) its inputs
    need (`features`, a FeatureRecipe dict; by default derived from the checkpoint's config),
    so jobs.predict --video knows what to extract for it.
    """
    client = MlflowClient()
    if features is None:
        features = _features_of(checkpoint_path)
    with tempfile.TemporaryDirectory(prefix="vl-model-") as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=VideoLightsPyfunc(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
            pip_requirements=_requirements(),
            metadata={FEATURES_METADATA: dict(features)},
        )
        client.log_artifacts(run_id, str(local), artifact_path="model")
    try:
        client.create_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(
        registered_name,
        source=source,
        run_id=run_id,
        tags={SELECTION_METRIC_TAG: metric_name, SELECTION_VALUE_TAG: repr(float(metric_value))},
    ).version
    try:
        champion = client.get_model_version_by_alias(registered_name, CHAMPION_ALIAS)
        best = _metric_of(champion, metric_name)
    except MlflowException:  # no champion yet
        best = None
    better = best is None or (
        metric_value > best if higher_is_better else metric_value < best
    )
    if better:
        client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version)
    return str(version), better
