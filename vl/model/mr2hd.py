"""MR->HD feedback (Uni-JFM): the predicted moment re-weights the clip memory for saliency."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from vl.spans import cxw_to_xx


class MomentToHighlight(nn.Module):
    """TR-DETR's MR2HD branch as the reference computes it (spec 2.10).

    The top-1 predicted moment (indices are not differentiable) selects clips of the projected,
    pre-FRA video; a GRU summarises them into h; clip weights w_j = <h, V_j> re-weight the
    encoder memory, m'_j = (1 + w_j) m_j, and s_mr_j = sum_k (P m'_j)_k / sqrt(d).

    GRU input (`gru_input`): "slice" runs the GRU over the selected clips only (a packed
    sequence); "padded" (the reference) runs it over the slice right-padded with zeros to the
    batch's clip count, so h is the state after the slice *and* the zero steps that follow
    it, and the score depends on how much padding the batch has. Both measured alike at the
    paper recipe (docs/FIDELITY.md, 11). In both, the span is clamped to the valid clips (the
    reference slices from the end of the video for a negative predicted start).
    """

    def __init__(self, dim: int, gru_input: str = "slice") -> None:
        super().__init__()
        self.padded = gru_input == "padded"
        self.gru = nn.GRU(dim, dim, num_layers=1, batch_first=True)
        # no bias: s_mr only feeds L_tc, a cosine of (s - min s), which no constant shift changes
        self.proj = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(
        self,
        video: torch.Tensor,  # (B, Lv, d) projected, pre-FRA
        memory: torch.Tensor,  # (B, Lv, d) encoder clip memory
        video_mask: torch.Tensor,  # (B, Lv) bool
        logits: torch.Tensor,  # (B, Nq, 2) final layer
        spans: torch.Tensor,  # (B, Nq, 2) final layer (center, width)
    ) -> torch.Tensor:
        B, Lv, d = video.shape
        with torch.no_grad():
            best = logits.softmax(-1)[..., 0].argmax(dim=1)  # (B,)
            span = cxw_to_xx(spans[torch.arange(B, device=spans.device), best])
            span = span.nan_to_num(0.0).clamp(0, 1)  # NaN inputs surface in the loss instead
            length = video_mask.sum(1)  # (B,)
            st = (span[:, 0] * length).floor().long()
            ed = (span[:, 1] * length).floor().long()
            st = torch.minimum(st, length - 1)
            ed = torch.maximum(torch.minimum(ed, length - 1), st)
            n = ed - st + 1  # (B,) >= 1
            full = self.padded or torch.compiler.is_compiling()  # a static number of steps
            steps = torch.arange(Lv if full else int(n.max()), device=video.device)
            idx = torch.minimum(st[:, None] + steps, (length - 1)[:, None])  # (B, Ls)
            inside = steps[None] < n[:, None]  # (B, Ls)
        clips = video.gather(1, idx[..., None].expand(-1, -1, d))  # (B, Ls, d)
        if self.padded:  # the slice, then zeros up to Lv
            _, h = self.gru(clips * inside[..., None])  # (1, B, d)
        elif torch.compiler.is_compiling():  # the slice's last state, read from a full run:
            states, _ = self.gru(clips)  # (B, Lv, d); no host sync, no packed sequence
            h = states[torch.arange(B, device=states.device), n - 1][None]  # (1, B, d)
        else:
            packed = pack_padded_sequence(clips, n.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.gru(packed)  # (1, B, d)
        weights = torch.einsum("bd,bld->bl", h[0], video)  # (B, Lv)
        reweighted = (1 + weights)[..., None] * memory
        return self.proj(reweighted).sum(-1) * self.scale  # (B, Lv)
