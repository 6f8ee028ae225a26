"""The served model: the MLflow pyfunc that wraps a training checkpoint, and its input handling.

Why a pyfunc wrapper and not `mlflow.pytorch`: its default torch.export format fixes the batch
shape of a model with several inputs and a GRU (STACK.md); the wrapper also owns the padding
and post-processing, so a caller sends per-sample features and gets official rows. This module
sits above the model and the engine (it runs them); `vl.tracking` below it only knows runs and
the registry.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from vl import tracking
from vl.checkpoint import CHECKPOINT_ARTIFACT, read_model
from vl.config import ConfigError, ExperimentConfig
from vl.data.batch import Batch, pad_batch
from vl.engine import predict_rows
from vl.extractors import recipe_from_config
from vl.model import build_model

DEFAULT_BATCH_SIZE = 32
FEATURES_METADATA = "vl.features"  # MLmodel metadata: the FeatureRecipe the model's inputs need


class VideoLightsPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: a training checkpoint plus the code to rebuild and run it."""

    # The input is a dict of ragged per-sample arrays, which MLflow's type-hint validation
    # cannot describe; opting out also stops its warning at every import of this module.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
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
        samples = _samples(model_input)
        size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
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


def make_batch(samples: Sequence[Mapping[str, Any]], cfg: ExperimentConfig,
               offset: int = 0) -> Batch:  # fmt: skip
    """Check per-sample features against the model and pad them into an inference `Batch`.

    Text longer than `model.max_q_l` keeps its first rows, like the training loader.
    """
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
    clip_len = float(cfg.data.clip_len)
    return pad_batch(
        [[v] for v in videos], [[t] for t in texts], add_tef=False,
        qids=[s.get("qid", offset + i) for i, s in enumerate(samples)],
        durations=[float(s["duration"]) if s.get("duration") is not None else len(v) * clip_len
                   for s, v in zip(samples, videos, strict=True)],
        clip_len=clip_len,
    )  # fmt: skip


def _requirements() -> list[str]:
    """Pin the installed package so a served model runs the code it was trained with."""
    try:
        return [f"videolights-ray=={metadata.version('videolights-ray')}"]
    except metadata.PackageNotFoundError:
        return ["videolights-ray"]


def features_of(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The FeatureRecipe (as a dict) of a training checkpoint's config (its preset fills what
    the stored dict leaves out); empty when the checkpoint holds no usable config."""
    try:
        _, stored = read_model(checkpoint_path)
        cfg = ExperimentConfig.from_dict(stored, source=f"{checkpoint_path}:config")
    except (ConfigError, ValueError):
        return {}
    return recipe_from_config(cfg.to_dict()).to_dict()


def log_model(run_id: str, checkpoint_path: str | os.PathLike,
              features: Mapping[str, Any] | None = None) -> str:
    """Save the checkpoint as a pyfunc model and upload it under the run's `model/`; returns
    the model's artifact URI.

    The model directory is built locally and uploaded with the client, so the run's status is
    never touched (the fluent `log_model` would need an active run and end it). The MLmodel
    metadata records which feature sets (and extractor models) the inputs need (`features`, a
    FeatureRecipe dict; by default derived from the checkpoint's config), so jobs.predict
    --video knows what to extract for it.
    """
    client = MlflowClient()
    if features is None:
        features = features_of(checkpoint_path)
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
    return f"{client.get_run(run_id).info.artifact_uri}/model"


def log_and_register_model(
    run_id: str,
    checkpoint_path: str | os.PathLike,
    registered_name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    features: Mapping[str, Any] | None = None,
) -> tuple[str, bool]:
    """Log the checkpoint as a pyfunc model in the run and register it as a new version; the
    `champion` alias moves to it only if it beats the current champion on `metric_name`
    (`vl.tracking.register_version`). Returns (version, champion?)."""
    source = log_model(run_id, checkpoint_path, features)
    return tracking.register_version(run_id, source, registered_name, metric_name,
                                     metric_value, higher_is_better)  # fmt: skip
