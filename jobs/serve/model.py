"""Which registered model version answers, and loading it through MLflow's public API.

Why through `mlflow.pyfunc.load_model` and `MlflowClient` only: the server must run whatever
version the registry holds, not a network it builds itself. Each version is logged as MLflow
"models from code" (`vl/served_model.py`, see `vl.serving.log_model`): loading runs that code
file, which imports the pyfunc class from the installed package, and the class rebuilds the
network from the config in the version's weights-only checkpoint. Nothing is unpickled.
An alias is resolved to a version number *before* loading, so the version a response names is
exactly the one whose weights answered, even when the alias moves in between.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vl.tracking import SELECTION_METRIC_TAG, SELECTION_VALUE_TAG

_PREFIX = "models:/"


class ModelResolutionError(ValueError):
    """The model URI is malformed or names nothing in the registry (the user's input)."""


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME@ALIAS` (follows the alias) or `models:/NAME/VERSION` (pinned)."""

    name: str
    alias: str = ""
    version: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        if not uri.startswith(_PREFIX):
            raise ModelResolutionError(
                f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        rest = uri[len(_PREFIX):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            if name and alias and "/" not in alias:
                return cls(name=name, alias=alias)
        elif rest.count("/") == 1:
            name, version = rest.split("/")
            if name and version.isdigit():
                return cls(name=name, version=version)
        raise ModelResolutionError(
            f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION"
        )

    @property
    def uri(self) -> str:
        if self.alias:
            return f"{_PREFIX}{self.name}@{self.alias}"
        return self.version_uri(self.version)

    def version_uri(self, version: str) -> str:
        return f"{_PREFIX}{self.name}/{version}"

    def resolve(self, client: MlflowClient | None = None) -> str:
        """The version number the reference names right now."""
        client = client or MlflowClient()
        try:
            if self.alias:
                return str(client.get_model_version_by_alias(self.name, self.alias).version)
            return str(client.get_model_version(self.name, self.version).version)
        except MlflowException as err:
            raise ModelResolutionError(
                f"{self.uri} names no model version in the registry at "
                f"{mlflow.get_tracking_uri()}: {err.message.splitlines()[0]}"
            ) from None


@dataclass
class ServedModel:
    """One loaded registry version and what the routes report about it.

    The pyfunc takes per-sample features and returns official rows; `cfg` (the training
    config the pyfunc rebuilt the network from) gives the input widths and limits the request
    checks enforce.
    """

    name: str
    version: str
    alias: str
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    cfg: Any  # vl.config.ExperimentConfig
    tags: dict[str, str]

    @property
    def video_dim(self) -> int:
        """Per-clip input width: the chosen feature sets plus the 2 TEF dims."""
        return int(self.cfg.model.video_input_dim)

    @property
    def text_dim(self) -> int:
        return int(self.cfg.model.text_dim)

    @property
    def max_clips(self) -> int:
        return int(self.cfg.data.max_v_l)

    def info(self) -> dict[str, Any]:
        """What GET /v1/model answers: identity, inputs, and how this version was selected."""
        d = self.cfg.data
        value = self.tags.get(SELECTION_VALUE_TAG)
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias or None,
            "dataset": d.dataset,
            "feature_sets": {"video": list(d.video_features), "text": list(d.text_features)},
            "input_dims": {"video_features": self.video_dim, "text_features": self.text_dim},
            "clip_len_s": float(d.clip_len),
            "max_clips": self.max_clips,
            "max_text_tokens": int(d.max_q_l),
            "selection_metric": {
                "name": self.tags.get(SELECTION_METRIC_TAG),
                "value": None if value is None else float(value),
            },
        }

    def predict(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Official rows, one per sample, in order. Blocking (a CPU forward pass)."""
        columns: dict[str, list] = {"video_features": [], "text_features": [], "duration": []}
        for s in samples:
            columns["video_features"].append(s["video_features"])
            columns["text_features"].append(s["text_features"])
            columns["duration"].append(s.get("duration"))
        columns["qid"] = list(range(len(samples)))
        # No autograd graph. No `params`: without a params schema in its signature MLflow
        # drops them with a warning (the pyfunc then runs in chunks of 32 samples).
        with torch.inference_mode():
            rows = self.pyfunc.predict(columns)
        by_position = {row["qid"]: row for row in rows}
        return [by_position[i] for i in range(len(samples))]


def load(ref: ModelRef, version: str) -> ServedModel:
    """Load `version` of `ref`'s registered model and check it is a VideoLights pyfunc."""
    client = MlflowClient()
    with warnings.catch_warnings():  # mlflow warns about type hints at every load
        warnings.simplefilter("ignore", UserWarning)
        pyfunc = mlflow.pyfunc.load_model(ref.version_uri(version))
    cfg = getattr(pyfunc.unwrap_python_model(), "cfg", None)
    if cfg is None or not hasattr(cfg, "model") or not hasattr(cfg, "data"):
        raise ModelResolutionError(
            f"{ref.version_uri(version)} is not a VideoLights model (its pyfunc has no "
            "training config)"
        )
    tags = dict(client.get_model_version(ref.name, version).tags or {})
    served = ServedModel(ref.name, version, ref.alias, pyfunc, cfg, tags)
    _warm_up(served)
    return served


def _warm_up(served: ServedModel) -> None:
    """One forward pass on zeros, so the first request does not pay for lazy initialisation
    (and a model that cannot run fails at load, where the deployment reports it)."""
    clips = min(served.max_clips, 8)
    served.predict([{
        "video_features": np.zeros((clips, served.video_dim), np.float32),
        "text_features": np.zeros((2, served.text_dim), np.float32),
    }])
