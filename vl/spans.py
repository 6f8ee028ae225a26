"""Span conversions and temporal IoU / generalised IoU on 1-D (start, end) intervals."""

from __future__ import annotations

import torch


def cxw_to_xx(spans: torch.Tensor) -> torch.Tensor:
    """(..., 2) (center, width) -> (..., 2) (start, end)."""
    center, width = spans.unbind(-1)
    return torch.stack([center - 0.5 * width, center + 0.5 * width], dim=-1)


def pairwise_iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU between every span of `a` (..., N, 2) and `b` (..., M, 2), both (start, end).

    Returns two (..., N, M) tensors. GIoU = IoU - (hull - union) / hull, so it stays informative
    (negative) for disjoint spans, which is why the matcher and the loss use it.
    """
    a_st, a_ed = a[..., :, None, 0], a[..., :, None, 1]  # (..., N, 1)
    b_st, b_ed = b[..., None, :, 0], b[..., None, :, 1]  # (..., 1, M)
    inter = (torch.minimum(a_ed, b_ed) - torch.maximum(a_st, b_st)).clamp(min=0)
    union = (a_ed - a_st) + (b_ed - b_st) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a_ed, b_ed) - torch.minimum(a_st, b_st)).clamp(min=1e-6)
    giou = iou - (hull - union) / hull
    return iou, giou


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matched pairs: a[i] with b[i]; both (N, 2) (start, end) -> (N,)."""
    inter = (torch.minimum(a[:, 1], b[:, 1]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0]) + (b[:, 1] - b[:, 0]) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[:, 1], b[:, 1]) - torch.minimum(a[:, 0], b[:, 0])).clamp(min=1e-6)
    return iou - (hull - union) / hull


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with clamping, used to refine anchors in logit space."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
