"""The checkpoint format, written and read in one place: the training state a run resumes from,
the model file a registry serves, and weights-only initialisation (the pretrain -> fine-tune
step of spec section 4: "Fine-tune = the normal script with --resume ckpt (weights only; fresh
optimiser, epoch 0)").

A checkpoint directory (jobs.train's Ray checkpoint, a tune trial's checkpoint) holds
- `model.pt` (MODEL_FILE): {"model": weights, "config": ExperimentConfig dict, "epoch", ...}, what
  `vl.serving` registers and serves;
- `state.pt` (STATE_FILE): {"model", "optimizer", "scheduler", "epoch" (the last finished epoch,
  0-based), "rng" (torch, python, numpy), plus the owner's progress keys}, what a resumed run
  continues from;
- `checkpoint.json` (SEAL_FILE), written last: the epoch, the global step and every other file's
  size. A checkpoint folder in storage is complete when each listed file is there with its size
  (an S3 PUT is atomic, so a file of the right size is the whole file): a resume finds the
  newest complete checkpoint of a run from storage alone (`complete_checkpoints`), whatever the
  scheduler that wrote it recorded, and a half-uploaded folder is never resumed from.

Both hold only tensors and plain containers and every read is `torch.load(weights_only=True)`:
a file planted in the checkpoint storage that needs any other class is refused
(UnsafeCheckpointError) before it can run code on a worker.

A weights source (`read_weights`, `load_weights`) is one of
- a checkpoint file, local or s3:// (a dict with key `model`, or a bare state_dict);
- a checkpoint directory, local or s3:// (model.pt or else state.pt inside);
- `models:/NAME@alias` or `models:/NAME/VERSION` (the registered MLflow model: its pyfunc
  directory carries the checkpoint file as the artifact named `checkpoint`);
- an in-memory dict (either form above).

Only weights are read there: the optimizer, scheduler, epoch and RNG state of the source are
ignored on purpose, so a fine-tune starts at epoch 0 with a fresh schedule. Shapes must agree
exactly; a checkpoint from a model with other feature sets or sizes fails with every offending
tensor named, rather than loading half the network.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from torch import nn

from vl.storage import filesystem, is_remote, join_uri, retrying

MODEL_FILE = "model.pt"  # weights + config: what the registered pyfunc model loads
STATE_FILE = "state.pt"  # full training state: weights, optimizer, scheduler, epoch, RNG, progress
SEAL_FILE = "checkpoint.json"  # written last: epoch, global step and the other files' sizes
CHECKPOINT_PREFIX = "checkpoint_"  # the checkpoint folders under a run's storage
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact that holds MODEL_FILE


# ---- the write side and the resume side ------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (torch, python, numpy)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every generator `seed_everything` seeds, as a tensor and plain lists of
    numbers and strings: what `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [str(name), keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),)
                    + tuple(state["python"][2:]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a (possibly DDP-wrapped) model's tensors."""
    target = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in target.state_dict().items()}


def write_model_file(directory: str | Path, weights: Mapping[str, torch.Tensor],
                     config: dict[str, Any], epoch: int, **extra: Any) -> Path:  # fmt: skip
    """MODEL_FILE in `directory`: the weights a registry serves, with their config."""
    path = Path(directory) / MODEL_FILE
    torch.save({"model": weights, "config": config, "epoch": epoch, **extra}, path)
    return path


def write_training_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, **progress: Any,
) -> None:  # fmt: skip
    """STATE_FILE in `directory`: everything a resumed run needs to continue after `epoch`
    (0-based, finished); `progress` carries the owner's own keys (history, best, ...)."""
    target = getattr(model, "module", model)
    torch.save({"model": {k: v.detach().cpu() for k, v in target.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "rng": rng_state(), **progress},
               Path(directory) / STATE_FILE)  # fmt: skip


def seal_checkpoint(directory: str | Path, epoch: int, global_step: int) -> dict[str, Any]:
    """Write SEAL_FILE into a finished checkpoint folder (call it last): what makes the folder,
    once copied to storage, recognisable as complete (`read_seal`)."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != SEAL_FILE}
    seal = {"epoch": int(epoch), "global_step": int(global_step), "files": files}
    (directory / SEAL_FILE).write_text(json.dumps(seal, indent=1, sort_keys=True))
    return seal


def read_seal(uri: str) -> dict[str, Any] | None:
    """The seal of the checkpoint folder `uri` if the folder is complete (the seal and every
    file it lists, each with its size), else None."""
    fs, path = filesystem(uri)
    path = path.rstrip("/")

    def listing() -> dict[str, int]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return {}
        return {Path(e["name"]).name: int(e.get("size") or 0)
                for e in fs.ls(path, detail=True) if e.get("type") == "file"}

    present = retrying("list", uri, listing)
    if SEAL_FILE not in present:
        return None
    try:
        seal = json.loads(retrying("read", uri, lambda: fs.cat_file(f"{path}/{SEAL_FILE}")))
        files = dict(seal["files"])
        int(seal["epoch"]), int(seal["global_step"])
    except (ValueError, KeyError, TypeError):
        return None
    if any(present.get(name) != size for name, size in files.items()):
        return None
    return seal


def checkpoint_folders(run_uri: str) -> list[str]:
    """The names of the checkpoint folders (complete or not) under a run's storage that hold
    any file (an object store may go on listing a folder whose objects were all deleted)."""
    fs, path = filesystem(run_uri)
    path = path.rstrip("/")

    def listing() -> list[str]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        return sorted(Path(p).name for p in fs.ls(path, detail=False)
                      if Path(p).name.startswith(CHECKPOINT_PREFIX) and fs.isdir(p)
                      and any(f.rstrip("/") != p.rstrip("/") for f in fs.find(p)))

    return retrying("list", run_uri, listing)


def complete_checkpoints(run_uri: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, seal) of every complete checkpoint under a run's storage, oldest first
    (by epoch, then global step, then name): the last is the one a resume continues from."""
    found = [(name, seal) for name in checkpoint_folders(run_uri)
             if (seal := read_seal(join_uri(run_uri, name))) is not None]
    return sorted(found, key=lambda ns: (ns[1]["epoch"], ns[1]["global_step"], ns[0]))


def prune_checkpoints(run_uri: str, keep: set[str]) -> list[str]:
    """Remove every checkpoint folder under a run's storage whose name is not in `keep` (the
    scheduler's kept set); returns the names removed. Folders a lost report left behind, and
    half-uploaded ones, are otherwise never deleted."""
    fs, path = filesystem(run_uri)
    removed = []
    for name in checkpoint_folders(run_uri):
        if name in keep:
            continue
        folder = f"{path.rstrip('/')}/{name}"
        retrying("delete", join_uri(run_uri, name), lambda f=folder: fs.rm(f, recursive=True))
        removed.append(name)
    return removed


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds more than tensors and plain containers (numbers, strings, lists,
    dicts): unpickling it could run code, so it is refused unread."""


def read_training_state(directory: str | Path) -> dict[str, Any]:
    """STATE_FILE of `directory`, read weights-only: whoever can write the checkpoint storage
    must not be able to run code on the workers that resume from it."""
    path = Path(directory) / STATE_FILE
    state = _safe_load(path, str(path))
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch",
                                           "rng"} <= set(state):  # fmt: skip
        raise ValueError(f"{path}: not a training state (expected a dict with model, optimizer, "
                         "scheduler, epoch and rng)")
    return state


def restore_training_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:  # fmt: skip
    """Load STATE_FILE into the model, optimizer, scheduler and generators; returns the whole
    state dict (its `epoch` and the owner's progress keys)."""
    state = read_training_state(directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


# ---- weights-only reading --------------------------------------------------------------------


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


def _safe_load(path: str | Path, source: str) -> Any:
    """torch.load restricted to tensors and plain containers; a file that needs any other
    class (a pickled object, a code payload) raises UnsafeCheckpointError before it runs."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines()]
        cause = next((ln for ln in lines if "Unsupported" in ln or "error:" in ln),
                     type(err).__name__).split(". Please")[0]
        raise UnsafeCheckpointError(
            f"{source}: refused: the file holds objects other than tensors and plain containers "
            f"(only weights-only checkpoints are loaded; {cause})") from None


def _torch_load(path: str | Path, source: str) -> Any:
    try:
        return _safe_load(path, source)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{source}: cannot read as a torch checkpoint ({type(err).__name__}: "
                         f"{err})") from None


def _load_uri(uri: str) -> Any:
    """torch.load of a local or remote file, or of model.pt / state.pt inside a directory."""
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


def read_checkpoint(source: str | Path) -> Any:
    """The loaded checkpoint object a file, directory or registered-model URI refers to."""
    uri = str(source)
    if uri.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="vl-registered-") as tmp:
            return _torch_load(registered_checkpoint(uri, tmp), uri)
    return _load_uri(uri)


def read_weights(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state_dict a source refers to (see the module docstring for the accepted forms)."""
    if isinstance(source, Mapping):
        return _state_dict_of(source, "<dict>")
    return _state_dict_of(read_checkpoint(source), str(source))


def read_model(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, config dict) of a model file or registered model (MODEL_FILE's layout)."""
    checkpoint = read_checkpoint(source)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("config"), Mapping):
        raise ValueError(f"{source}: the checkpoint carries no model config (key 'config')")
    return _state_dict_of(checkpoint, str(source)), dict(checkpoint["config"])


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
