"""The official per-file feature layout (spec 1.1-1.2): feature-set names, directory names, npz
reading and L2 normalisation.

Both the shard converter and the per-sample npz baseline read features through this module, so
"what a feature set is" is decided in one place.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vl.config import FEATURE_DIMS, TEXT_FEATURE_DIMS

NORM_EPS = 1e-5

# Official directory names -> feature-set names (spec 1.1).
VIDEO_DIR_NAMES = {
    "slowfast_features": "slowfast",
    "sf_features": "slowfast",
    "clip_features": "clip",
    "blip_video_features": "blip",
    "video_features_blip": "blip",
    "video_features": "i3d",
}
TEXT_DIR_NAMES = {
    "clip_text_features": "clip",
    "query_features": "clip",
    "blip_aug_text_features_openai": "blip",
    "blip_text_features": "blip",
    "query_features_blip": "blip",
}
# Directory name each generator writes per (dataset, modality, set), mirroring the releases.
OFFICIAL_DIR = {
    ("qvhighlights", "video"): {
        "slowfast": "slowfast_features",
        "clip": "clip_features",
        "blip": "blip_video_features",
    },
    ("qvhighlights", "text"): {
        "clip": "clip_text_features",
        "blip": "blip_aug_text_features_openai",
    },
    ("charades", "video"): {
        "slowfast": "slowfast_features",
        "clip": "clip_features",
        "blip": "blip_video_features",
    },
    ("charades", "text"): {"clip": "clip_text_features", "blip": "blip_text_features"},
    ("pretrain", "video"): {
        "slowfast": "slowfast_features",
        "clip": "clip_features",
        "blip": "blip_video_features",
    },
    ("pretrain", "text"): {"clip": "clip_text_features", "blip": "blip_text_features"},
    ("tvsum", "video"): {
        "i3d": "video_features",
        "slowfast": "sf_features",
        "clip": "clip_features",
        "blip": "video_features_blip",
    },
    ("tvsum", "text"): {"clip": "query_features", "blip": "query_features_blip"},
}


@dataclass(frozen=True)
class FeatureDir:
    """One feature set of one modality and the directory holding its files."""

    name: str
    path: Path
    modality: str  # "video" | "text"


def parse_feature_dirs(spec: str | list[str], modality: str) -> list[FeatureDir]:
    """`DIR[,DIR...]` or `name=DIR[,...]` -> FeatureDirs; a bare DIR is named by its basename
    through the official directory table (e.g. .../clip_text_features -> text set "clip")."""
    if modality not in ("video", "text"):
        raise ValueError(f"modality must be 'video' or 'text', got {modality!r}")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    table = VIDEO_DIR_NAMES if modality == "video" else TEXT_DIR_NAMES
    dims = FEATURE_DIMS if modality == "video" else TEXT_FEATURE_DIMS
    out: list[FeatureDir] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            path = item
            base = os.path.basename(os.path.normpath(path))
            if base not in table:
                raise ValueError(
                    f"cannot tell which {modality} feature set {path!r} holds; name it as "
                    f"NAME=DIR with NAME in {sorted(dims)}, or use an official directory name "
                    f"({', '.join(sorted(table))})"
                )
            name = table[base]
        if name not in dims:
            raise ValueError(f"unknown {modality} feature set {name!r}; known: {sorted(dims)}")
        if any(d.name == name for d in out):
            raise ValueError(f"{modality} feature set {name!r} given twice")
        out.append(FeatureDir(name=name, path=Path(path), modality=modality))
    if not out:
        raise ValueError(f"no {modality} feature directories given")
    return out


def tef(n: int) -> np.ndarray:
    """Temporal endpoint feature (n, 2): (i/n, (i+1)/n) for clip i (the windows of a long video
    carry their own, as pad_batch gives a whole video)."""
    start = np.arange(n, dtype=np.float32) / max(n, 1)
    return np.stack([start, start + 1.0 / max(n, 1)], axis=1)


def l2_normalize(x: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """Row-wise x / (||x|| + eps) in float32, as the reference does per clip / per token."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


# --- file lookup --------------------------------------------------------------------------------


def video_feature_files(d: FeatureDir, vid: str) -> list[Path] | None:
    """The file(s) holding `vid` in `d`, or None when missing.

    `{vid}.npz` (key `features`), else `{vid}.npy`; I3D may also be the `{vid}_rgb.npy` +
    `{vid}_opt.npy` pair (TVSum), concatenated along features.
    """
    for candidate in (d.path / f"{vid}.npz", d.path / f"{vid}.npy"):
        if candidate.is_file():
            return [candidate]
    if d.name == "i3d":
        pair = [d.path / f"{vid}_rgb.npy", d.path / f"{vid}_opt.npy"]
        if all(p.is_file() for p in pair):
            return pair
    return None


def text_feature_file(d: FeatureDir, qid: int | str, dataset: str) -> Path | None:
    """QVH/Charades/pretrain: `qid{qid}.npz`; TVSum: `{qid}.npz`. None when missing."""
    name = f"{qid}.npz" if dataset == "tvsum" else f"qid{qid}.npz"
    p = d.path / name
    return p if p.is_file() else None


class FeatureFileError(ValueError):
    """A feature file exists but does not load (cut short, not an npz/npy, the key missing):
    the message names the file, so the one bad extraction can be redone."""


def _read_array(path: Path, key: str) -> np.ndarray:
    """The array under `key` of an npz (the whole array of an npy); FeatureFileError naming
    the file when its bytes do not load."""
    try:
        if path.suffix == ".npy":
            return np.load(path)
        with np.load(path) as z:
            return z[key]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise FeatureFileError(f"feature file {path} does not load ({type(err).__name__}: "
                               f"{err}); extract it again") from None


def load_video_set(d: FeatureDir, vid: str, max_v_l: int | None = None) -> np.ndarray:
    """(L, D) float32 raw (un-normalised) features of one set; FileNotFoundError when missing."""
    files = video_feature_files(d, vid)
    if files is None:
        raise FileNotFoundError(f"video features {d.name!r} for vid {vid!r} not in {d.path}")
    parts = [_read_array(p, "features") for p in files]
    n = min(len(p) for p in parts)
    x = np.concatenate([p[:n] for p in parts], axis=1) if len(parts) > 1 else parts[0]
    return np.asarray(x[:max_v_l], dtype=np.float32)


def load_text_set(
    d: FeatureDir, qid: int | str, dataset: str, max_q_l: int | None = None
) -> np.ndarray:
    """(Lq, D) float32 raw features of one text set; FileNotFoundError when missing."""
    path = text_feature_file(d, qid, dataset)
    if path is None:
        raise FileNotFoundError(f"text features {d.name!r} for qid {qid!r} not in {d.path}")
    key = "token" if dataset == "tvsum" else "last_hidden_state"
    return np.asarray(_read_array(path, key)[:max_q_l], dtype=np.float32)
