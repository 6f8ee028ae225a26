"""Small shared helpers for the unit tests (no fixtures with side effects here)."""

from __future__ import annotations

import torch

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


def pad_batch(batch: Batch, extra_clips: int, extra_tokens: int) -> Batch:
    """The same samples with more padding appended (zeros, mask 0)."""
    B = len(batch)
    pad_v = torch.zeros(B, extra_clips, batch.video.shape[-1])
    pad_t = torch.zeros(B, extra_tokens, batch.text.shape[-1])
    return Batch(
        video=torch.cat((batch.video, pad_v), 1),
        video_mask=torch.cat((batch.video_mask, torch.zeros(B, extra_clips)), 1),
        text=torch.cat((batch.text, pad_t), 1),
        text_mask=torch.cat((batch.text_mask, torch.zeros(B, extra_tokens)), 1),
        span_targets=batch.span_targets, span_mask=batch.span_mask,
        saliency_labels=torch.cat((batch.saliency_labels, torch.zeros(B, extra_clips)), 1),
        saliency_pos_idx=batch.saliency_pos_idx, saliency_neg_idx=batch.saliency_neg_idx,
        has_spans=batch.has_spans, qids=batch.qids, vids=batch.vids, queries=batch.queries,
        durations=batch.durations, clip_len=batch.clip_len,
    )


__all__ = ["FEATURE_DIMS", "pad_batch", "tiny_batch", "tiny_config", "tiny_dims"]
