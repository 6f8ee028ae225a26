"""Encoder over [global token; clips] and the DAB-style 1-D span-anchor decoder."""

from __future__ import annotations

import torch
from torch import nn

from vl.model.layers import (
    MLP,
    Attention,
    Dropout,
    FeedForward,
    anchor_sine,
    attend,
    merge_heads,
    split_heads,
)
from vl.spans import inverse_sigmoid


class EncoderLayer(nn.Module):
    """Post-norm DETR encoder layer; positions are added to queries and keys only."""

    def __init__(
        self, dim: int, nheads: int, ffn_dim: int, dropout: float, attn_dropout: float
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, nheads, attn_dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    def __init__(
        self, num_layers: int, dim: int, nheads: int, ffn_dim: int, dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, nheads, ffn_dim, dropout, attn_dropout) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), mask (B, 1, 1, L) additive, pos (B, L, d) -> memory (B, L, d)."""
        for layer in self.layers:
            x = layer(x, mask, pos)
        return x


class AnchorDecoderLayer(nn.Module):
    """Conditional-DETR decoder layer on 1-D anchors.

    Cross-attention concatenates, per head, the content part with a positional part (the
    anchor's sine embedding for queries, the memory positions for keys), so the attention map
    factorises into "what" and "where"; this is what lets anchors steer where each query looks.
    Content and position are summed only in the first layer.
    """

    def __init__(
        self, dim: int, nheads: int, ffn_dim: int, dropout: float, attn_dropout: float,
        first: bool,
    ) -> None:
        super().__init__()
        self.nheads = nheads
        self.attn_dropout = attn_dropout
        # self-attention (content and position projected separately, then summed)
        self.sa_q_content = nn.Linear(dim, dim)
        self.sa_q_pos = nn.Linear(dim, dim)
        self.sa_k_content = nn.Linear(dim, dim)
        self.sa_k_pos = nn.Linear(dim, dim)
        self.sa_v = nn.Linear(dim, dim)
        self.sa_out = nn.Linear(dim, dim)
        # cross-attention
        self.ca_q_content = nn.Linear(dim, dim)
        self.ca_q_pos = nn.Linear(dim, dim) if first else None
        self.ca_q_sine = nn.Linear(dim, dim)
        self.ca_k_content = nn.Linear(dim, dim)
        self.ca_k_pos = nn.Linear(dim, dim)
        self.ca_v = nn.Linear(dim, dim)
        self.ca_out = nn.Linear(dim, dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,  # (B, Nq, d) query content
        memory: torch.Tensor,  # (B, Lm, d)
        memory_mask: torch.Tensor,  # (B, 1, 1, Lm) additive
        memory_pos: torch.Tensor,  # (B, Lm, d)
        query_pos: torch.Tensor,  # (B, Nq, d)
        query_sine: torch.Tensor,  # (B, Nq, d), already modulated
    ) -> torch.Tensor:
        H = self.nheads
        drop = self.attn_dropout if self.training else 0.0
        q = self.sa_q_content(tgt) + self.sa_q_pos(query_pos)
        k = self.sa_k_content(tgt) + self.sa_k_pos(query_pos)
        v = self.sa_v(tgt)
        sa = attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), None, drop)
        tgt = self.norm1(tgt + self.dropout(self.sa_out(merge_heads(sa))))

        q = self.ca_q_content(tgt)
        k = self.ca_k_content(memory)
        v = self.ca_v(memory)
        k_pos = self.ca_k_pos(memory_pos)
        if self.ca_q_pos is not None:
            q = q + self.ca_q_pos(query_pos)
            k = k + k_pos
        q = torch.cat((split_heads(q, H), split_heads(self.ca_q_sine(query_sine), H)), dim=-1)
        k = torch.cat((split_heads(k, H), split_heads(k_pos, H)), dim=-1)  # (B, H, Lm, 2hd)
        ca = attend(q, k, split_heads(v, H), memory_mask, drop)  # (B, H, Nq, hd)
        tgt = self.norm2(tgt + self.dropout(self.ca_out(merge_heads(ca))))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class AnchorDecoder(nn.Module):
    """DAB-DETR-style decoder over learned (center, width) anchors with iterative refinement.

    Each layer turns the current anchors into a positional query; a shared head predicts a
    logit-space delta. The refined anchor is returned with its gradient (so the span head of
    the next layer trains the refinement head) but enters the next layer detached, as in
    DAB-DETR, so each layer learns a correction instead of back-propagating through all others.
    """

    def __init__(
        self, num_layers: int, dim: int, nheads: int, ffn_dim: int, dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            AnchorDecoderLayer(dim, nheads, ffn_dim, dropout, attn_dropout, first=(i == 0))
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(dim, dim, dim, 2)
        self.query_scale = MLP(dim, dim, dim, 2)
        self.ref_anchor_head = MLP(dim, dim, 1, 2)
        self.bbox_embed = MLP(dim, dim, 2, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        memory_pos: torch.Tensor,
        anchors: torch.Tensor,  # (Nq, 2) un-sigmoided
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns hidden states (L, B, Nq, d) and the anchor each layer received (L, B, Nq, 2)."""
        B = memory.shape[0]
        Nq = anchors.shape[0]
        tgt = memory.new_zeros(B, Nq, self.dim)
        ref = anchors.sigmoid()[None].expand(B, -1, -1)
        hidden, refs = [], []
        for i, layer in enumerate(self.layers):
            refs.append(ref)  # what this layer's span head refines (keeps its gradient)
            ref = ref.detach()
            sine = anchor_sine(ref, self.dim)  # (B, Nq, d)
            query_pos = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(tgt)
            # width-modulated attention: one scalar per query, relative to the anchor's width
            sine = sine * (self.ref_anchor_head(tgt).sigmoid() / ref[..., 1:].clamp(min=1e-3))
            tgt = layer(tgt, memory, memory_mask, memory_pos, query_pos, sine)
            out = self.norm(tgt)
            hidden.append(out)
            ref = (self.bbox_embed(out) + inverse_sigmoid(ref)).sigmoid()
        return torch.stack(hidden), torch.stack(refs)
