"""Hungarian matching between predicted moments and ground-truth windows."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from vl.spans import cxw_to_xx, pairwise_iou_giou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of the Nq predictions of each sample to its GT windows.

    There are more queries (10) than windows (1-5), so most predictions are matched to nothing
    and learn "background"; the assignment minimises a weighted sum of span L1, negative GIoU
    and negative foreground probability, as DETR/Moment-DETR do. The cost tensors of the whole
    batch (and of every decoder layer, stacked into the batch dimension) are computed at once;
    only the assignment solver runs per sample.
    """

    def __init__(self, cost_span: float, cost_giou: float, cost_class: float) -> None:
        super().__init__()
        self.cost_span = cost_span
        self.cost_giou = cost_giou
        self.cost_class = cost_class

    def cost_matrix(
        self,
        logits: torch.Tensor,  # (N, Nq, 2)
        spans: torch.Tensor,  # (N, Nq, 2) cxw
        tgt_spans: torch.Tensor,  # (N, W, 2) cxw
    ) -> torch.Tensor:
        prob_fg = logits.float().softmax(-1)[..., 0:1]  # (N, Nq, 1)
        cost_span = torch.cdist(spans.float(), tgt_spans.float(), p=1)  # (N, Nq, W)
        _, giou = pairwise_iou_giou(cxw_to_xx(spans.float()), cxw_to_xx(tgt_spans.float()))
        cost = self.cost_span * cost_span - self.cost_giou * giou - self.cost_class * prob_fg
        return cost  # (N, Nq, W)

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        spans: torch.Tensor,
        tgt_spans: torch.Tensor,
        tgt_mask: torch.Tensor,  # (N, W) bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return flat index tensors (sample, prediction, target) of the matched pairs."""
        cost = self.cost_matrix(logits, spans, tgt_spans).cpu().numpy()
        if not np.isfinite(cost).all():
            raise FloatingPointError(
                "non-finite matching cost: the model produced NaN/inf moments "
                "(look for NaN in the input features or a diverged run)"
            )
        counts = tgt_mask.sum(1).tolist()
        rows, cols, samples = [], [], []
        for n, (c, k) in enumerate(zip(cost, counts)):
            if k == 0:
                continue
            # valid windows are packed first in each row of tgt_mask (the collate guarantees it)
            r, col = linear_sum_assignment(c[:, :k])
            rows.append(r)
            cols.append(col)
            samples.append(np.full(len(r), n))
        device = logits.device
        if not rows:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, empty, empty
        return tuple(
            torch.as_tensor(np.concatenate(xs), dtype=torch.long, device=device)
            for xs in (samples, rows, cols)
        )
