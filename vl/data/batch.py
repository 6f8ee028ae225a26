"""The padded batch every model, loss and engine function consumes.

One owner (vl.data.dataset's collate) builds it; the model reads the features and masks, the
criterion reads the targets. Keeping it a typed dataclass means a field travels by name, never as
a loose dict key re-read in three places.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """A collated batch. Masks are float, 1 = valid.

    Shapes: B samples, Lv clips (batch max), Lq text tokens (batch max), W max windows, P pairs.
    """

    video: torch.Tensor  # (B, Lv, Dv) float32, L2-normalised feature sets + 2 TEF dims
    video_mask: torch.Tensor  # (B, Lv) float32
    text: torch.Tensor  # (B, Lq, Dt) float32, L2-normalised per token
    text_mask: torch.Tensor  # (B, Lq) float32
    span_targets: torch.Tensor  # (B, W, 2) float32 (center, width) in [0, 1]; zeros where padded
    span_mask: torch.Tensor  # (B, W) bool, True = a real GT window
    saliency_labels: torch.Tensor  # (B, Lv) float32 in 0..12, 0 on padding
    saliency_pos_idx: torch.Tensor  # (B, P) int64 clip indices of positive clips
    saliency_neg_idx: torch.Tensor  # (B, P) int64 clip indices of negative clips
    has_spans: bool = True  # False for HD-only data (TVSum): no matcher, no MR losses
    qids: list = field(default_factory=list)
    vids: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds (TVSum: number of clips)
    clip_len: float = 2.0  # seconds per clip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor field to `device` (metadata is left as is)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return Batch(**moved)

    def __len__(self) -> int:
        return self.video.shape[0]
