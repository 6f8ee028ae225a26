"""Weights-only initialisation from a checkpoint: the pretrain -> fine-tune step (spec section 4:
"Fine-tune = the normal script with --resume ckpt (weights only; fresh optimiser, epoch 0)").

A source is one of
- a checkpoint file, local or s3:// (a dict with key `model`, as jobs.train's model.pt/state.pt,
  or a bare state_dict);
- a checkpoint directory, local or s3:// (jobs.train's Ray checkpoint folder: model.pt inside);
- `models:/NAME@alias` or `models:/NAME/VERSION` (the registered MLflow model: its pyfunc
  directory carries the checkpoint file as the artifact named `checkpoint`);
- an in-memory dict (either form above).

Only weights are read: the optimizer, scheduler, epoch and RNG state of the source are ignored on
purpose, so a fine-tune starts at epoch 0 with a fresh schedule. Shapes must agree exactly; a
checkpoint from a model with other feature sets or sizes fails with every offending tensor named,
rather than loading half the network.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FILE = "model.pt"  # weights + config (jobs.train writes it next to state.pt)
STATE_FILE = "state.pt"  # full training state (weights + optimizer + ...)
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact name (vl.tracking.CHECKPOINT_ARTIFACT)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model: lists missing keys (in the model, not in
    the checkpoint), unexpected keys (in the checkpoint only) and every shape mismatch."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.shapes = shapes
        lines = [f"checkpoint {source} does not fit the model:"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es) (checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in shapes]
        if missing:
            lines.append(f"  {len(missing)} missing key(s) (in the model, not the checkpoint):")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (in the checkpoint only):")
            lines += [f"    {k}" for k in unexpected]
        lines.append(
            "  The model config (feature sets -> model.video_dim / text_dim, hidden_dim, layer "
            "counts) must match the pretraining run's."
        )
        super().__init__("\n".join(lines))


def _state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint object (key `model`, or the object itself)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: not a checkpoint (expected a dict with key 'model' or a "
                         f"state_dict, got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: not a state_dict (non-tensor entries {bad[:5]}); expected "
                         "a dict with key 'model' or a bare state_dict")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _torch_load(path: str | Path, source: str) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{source}: cannot read as a torch checkpoint ({type(err).__name__}: "
                         f"{err})") from None


def _load_uri(uri: str) -> Any:
    """torch.load of a local or remote file, or of model.pt / state.pt inside a directory."""
    from vl.data.shards import filesystem, is_remote, join_uri

    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint {uri} does not exist")
    if fs.isdir(path):
        for name in (MODEL_FILE, STATE_FILE):
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                return _load_uri(join_uri(uri, name))
        raise FileNotFoundError(f"checkpoint directory {uri} holds neither {MODEL_FILE} nor "
                                f"{STATE_FILE}")
    if not is_remote(uri):
        return _torch_load(path, uri)
    with tempfile.TemporaryDirectory(prefix="vl-ckpt-") as tmp:
        local = os.path.join(tmp, "checkpoint.pt")
        fs.get_file(path, local)
        return _torch_load(local, uri)


def registered_checkpoint(model_uri: str, dst: str | Path) -> Path:
    """Download a registered model (`models:/NAME@alias`) into `dst`; the checkpoint file's path.

    The pyfunc model directory records its artifacts in MLmodel (flavors.python_function
    .artifacts.checkpoint.path); that file is the training checkpoint.
    """
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=str(dst)))
    except MlflowException as err:
        raise FileNotFoundError(f"{model_uri}: cannot resolve the registered model "
                                f"({err.message})") from None
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_uri}: downloaded {local} has no MLmodel file")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(CHECKPOINT_ARTIFACT)
    if not entry or "path" not in entry:
        raise FileNotFoundError(f"{model_uri}: the model has no '{CHECKPOINT_ARTIFACT}' "
                                f"artifact (has {sorted(artifacts)})")
    path = local / entry["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{model_uri}: artifact file {entry['path']} is missing")
    return path


def read_weights(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state_dict a source refers to (see the module docstring for the accepted forms)."""
    if isinstance(source, Mapping):
        return _state_dict_of(source, "<dict>")
    uri = str(source)
    if uri.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="vl-registered-") as tmp:
            path = registered_checkpoint(uri, tmp)
            return _state_dict_of(_torch_load(path, uri), uri)
    return _state_dict_of(_load_uri(uri), uri)


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError unless `state` has exactly the model's tensors and shapes."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any]) -> None:
    """Copy the source's weights into `model` (in place; optimizer state is not touched).

    Raises CheckpointMismatchError (naming every missing, unexpected and mis-shaped tensor),
    FileNotFoundError for a source that does not exist, ValueError for a file that is not a
    checkpoint.
    """
    name = "<dict>" if isinstance(source, Mapping) else str(source)
    state = read_weights(source)
    target = getattr(model, "module", model)  # a DDP-wrapped model loads into its module
    check_compatible(target, state, name)
    target.load_state_dict(state, strict=True)
