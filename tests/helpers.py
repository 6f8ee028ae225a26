"""Small shared helpers for the unit tests (no fixtures with side effects here)."""

from __future__ import annotations

from vl.config import FEATURE_DIMS, ExperimentConfig
from vl.data.batch import Batch
from vl.testing import random_batch


def tiny_config(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.from_preset("tiny", list(overrides))


def tiny_dims(cfg: ExperimentConfig) -> tuple[list[int], list[int]]:
    """Split the tiny model's input widths into fake feature sets (any split works)."""
    v, t = cfg.model.video_dim, cfg.model.text_dim
    return [v // 3, v - v // 3], [t]


def tiny_batch(cfg: ExperimentConfig, batch_size: int = 4, clips: int = 20, tokens: int = 10,
               seed: int = 0, has_spans: bool = True) -> Batch:
    vd, td = tiny_dims(cfg)
    return random_batch(batch_size, clips, tokens, vd, td, seed=seed, has_spans=has_spans)


__all__ = ["FEATURE_DIMS", "tiny_batch", "tiny_config", "tiny_dims"]
