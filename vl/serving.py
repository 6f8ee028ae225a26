"""The served model: the MLflow pyfunc that wraps a training checkpoint, and its input handling.

Why a pyfunc wrapper and not `mlflow.pytorch`: its default torch.export format fixes the batch
shape of a model with several inputs and a GRU (STACK.md); the wrapper also owns the padding
and post-processing, so a caller sends per-sample features and gets official rows. It is
logged as MLflow "models from code" (`vl/served_model.py`), never as a cloudpickled object, so
loading it runs only the installed package. This module sits above the model and the engine
(it runs them); `vl.tracking` below it only knows runs and the registry.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from vl import tracking
from vl.checkpoint import CHECKPOINT_ARTIFACT, read_model
from vl.config import ConfigError, ExperimentConfig
from vl.data.batch import Batch, pad_batch
from vl.engine import predict_rows
from vl.extractors import recipe_from_config
from vl.model import build_model

DEFAULT_BATCH_SIZE = 32
FEATURES_METADATA = "vl.features"  # MLmodel metadata: the FeatureRecipe the model's inputs need
MODEL_NAME = "model"  # the LoggedModel's name in its run
MODEL_CODE = Path(__file__).with_name("served_model.py")  # the models-from-code file

# The columns and the one param `predict` takes. The feature columns are ragged per-sample
# (clips, D) arrays, which MLflow's schema types cannot express without walking every float in
# Python; they are `any` here and `make_batch` checks their shapes with errors naming the
# sample. Declaring `batch_size` is what lets it through: MLflow drops undeclared params.
SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(AnyType(), "video_features"),
        ColSpec(AnyType(), "text_features"),
        ColSpec("double", "duration", required=False),
        ColSpec(AnyType(), "qid", required=False),
    ]),
    params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
)  # fmt: skip


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
    return [{c: _plain(model_input[c][i]) for c in columns} for i in range(count)]


def _plain(value: Any) -> Any:
    """A numpy scalar as its Python value: MLflow's schema step turns a dict input into a
    DataFrame, whose int qids come back as numpy ints that `json.dumps` refuses."""
    return value.item() if isinstance(value, np.generic) else value


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


def _config_of(checkpoint_path: str | os.PathLike) -> ExperimentConfig | None:
    """The checkpoint's config (its preset fills what the stored dict leaves out), or None when
    the checkpoint holds no usable config."""
    try:
        _, stored = read_model(checkpoint_path)
        return ExperimentConfig.from_dict(stored, source=f"{checkpoint_path}:config")
    except (ConfigError, ValueError):
        return None


def features_of(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The FeatureRecipe (as a dict) of a training checkpoint's config; empty when the
    checkpoint holds no usable config."""
    cfg = _config_of(checkpoint_path)
    return recipe_from_config(cfg.to_dict()).to_dict() if cfg is not None else {}


def input_example(cfg: ExperimentConfig, clips: int = 2, tokens: int = 2) -> dict[str, list]:
    """One sample of the model's input at its widths (zeros; TEF of `clips` clips): what the
    model page shows and `mlflow models serve` offers as its serving example."""
    video = np.zeros((clips, cfg.model.video_input_dim), dtype=np.float32)
    video[:, -2] = np.arange(clips) / clips  # TEF: clip start / end as fractions of the video
    video[:, -1] = (np.arange(clips) + 1) / clips
    text = np.zeros((tokens, cfg.model.text_dim), dtype=np.float32)
    return {"video_features": [video.tolist()], "text_features": [text.tolist()],
            "duration": [clips * float(cfg.data.clip_len)], "qid": [0]}  # fmt: skip


def log_model(run_id: str, checkpoint_path: str | os.PathLike,
              features: Mapping[str, Any] | None = None) -> str:
    """Log the checkpoint as a pyfunc LoggedModel of the run (models from code, with
    `SIGNATURE` and an input example); returns its `models:/<model_id>` URI, the source a
    registered version links the LoggedModel by.

    Built with the client, not the fluent `mlflow.pyfunc.log_model`, so the run's status is
    never touched (the fluent call needs an active run and ends it): the LoggedModel is created
    with the run as its source, saved locally, uploaded, named in the run's outputs (the run
    page lists it) and marked READY. The MLmodel metadata records which feature sets (and
    extractor models) the inputs need (`features`, a FeatureRecipe dict; by default derived
    from the checkpoint's config), so jobs.predict --video knows what to extract for it.
    """
    client = MlflowClient()
    cfg = _config_of(checkpoint_path)
    if features is None:
        features = recipe_from_config(cfg.to_dict()).to_dict() if cfg is not None else {}
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        model_type="videolights")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="vl-model-") as tmp, warnings.catch_warnings():
            # a checkpoint without a usable config has no example; the signature still holds
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
                pip_requirements=_requirements(),
                metadata={FEATURES_METADATA: dict(features)},
                signature=SIGNATURE,
                input_example=input_example(cfg) if cfg is not None else None,
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                   model_uuid=logged.model_id, model_id=logged.model_id),
            )  # fmt: skip
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


def log_and_register_model(
    run_id: str,
    checkpoint_path: str | os.PathLike,
    registered_name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    features: Mapping[str, Any] | None = None,
) -> tuple[str, bool]:
    """Log the checkpoint as a pyfunc LoggedModel of the run and register it as a new version;
    the `champion` alias moves to it only if it beats the current champion on `metric_name`
    (`vl.tracking.register_version`). Returns (version, champion?)."""
    source = log_model(run_id, checkpoint_path, features)
    return tracking.register_version(run_id, source, registered_name, metric_name,
                                     metric_value, higher_is_better,
                                     model_id=source.removeprefix("models:/"))  # fmt: skip
