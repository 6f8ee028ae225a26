"""Feature Refinement and Alignment (FRA): query-aware refinement of the projected clips."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl.model.layers import Dropout, additive_mask


class FeatureRefinementAlignment(nn.Module):
    """V = ReLU(conv(V ⊕ V_Q ⊕ V_S ⊕ S_v)) — the paper's formula (spec 6c.3).

    The reference computes the clip-word term with a softmax over words followed by a vector
    that is identical for every word, which collapses it to a learned constant bias (spec 6,
    item 4). Here V_Q is real clip-wise attention over the valid words, so every clip gets its
    own local (word-level) alignment; V_S (clip-sentence cosine, expanded by a learned vector)
    and S_v (the pooled sentence broadcast to every clip) carry the global alignment.
    """

    def __init__(
        self, dim: int, dropout: float, output: str = "plain", word_term: str = "attention"
    ) -> None:
        super().__init__()
        self.output = output
        # word_term="bias": the reference's collapsed V_Q, one learned vector for every clip
        self.word_bias = nn.Parameter(torch.zeros(dim)) if word_term == "bias" else None
        self.pool_weight = nn.Linear(dim, 1, bias=False)  # attention pooling of the words
        self.sim_expand = nn.Parameter(torch.empty(dim))  # cosine scalar -> d
        self.fuse = nn.Linear(4 * dim, dim)  # Conv1d(4d -> d, kernel 1)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(dim) if output == "norm" else None
        nn.init.normal_(self.sim_expand, std=1.0 / math.sqrt(dim))

    def sentence(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Masked attention pooling: (B, Lq, d) -> (B, d)."""
        logits = self.pool_weight(text).squeeze(-1).masked_fill(~text_mask, float("-inf"))
        weights = logits.softmax(dim=1)  # (B, Lq)
        return torch.einsum("bq,bqd->bd", weights, text)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        video_mask: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """video (B, Lv, d), text (B, Lq, d), masks bool -> refined video (B, Lv, d)."""
        d = video.shape[-1]
        # Local alignment: every clip attends over the valid words of its query.
        if self.word_bias is None:
            v_q = F.scaled_dot_product_attention(
                video[:, None], text[:, None], text[:, None],
                attn_mask=additive_mask(text_mask, video.dtype),
            )[:, 0]  # (B, Lv, d), scaled by 1/sqrt(d)
        else:
            v_q = self.dropout(self.word_bias.to(video.dtype)).expand_as(video)  # (B, Lv, d)
        s = self.sentence(text, text_mask)  # (B, d)
        v_s = F.cosine_similarity(video, s[:, None, :], dim=-1, eps=1e-6)  # (B, Lv)
        v_s = v_s[..., None] * self.sim_expand  # (B, Lv, d)
        s_v = self.dropout(s)[:, None, :].expand(-1, video.shape[1], d)
        fused = torch.cat((self.dropout(video), v_q, v_s, s_v), dim=-1)  # (B, Lv, 4d)
        out = self.dropout(F.relu(self.fuse(fused)))  # (B, Lv, d)
        if self.output == "residual":
            out = video + out
        elif self.output == "norm":
            out = self.norm(out)
        return out * video_mask[..., None]
