"""Bi-Directional Cross-Modal Fusion (Bi-CMF, the paper's Algorithm 2)."""

from __future__ import annotations

import torch
from torch import nn

from vl.model.layers import Attention, Dropout, FeedForward


class BiCMFLayer(nn.Module):
    """One Bi-CMF layer: video->text, text->video, fusion, self-attention, FFN.

    O1 = norm(V + drop(linear(attn(q=V, k=T, v=T))))     video attends to the words
    O2 = norm(T + drop(linear(attn(q=T, k=V, v=V))))     words attend to the clips
    O3 = norm(O1 + drop(attn(q=O1, k=O2, v=O2)))         clips read the video-aware words
    F  = norm(O3 + drop(selfattn(O3)));  out = norm(F + FFN(F))

    Positions (sine for clips, learned for words) are added to every attention input. Unlike the
    reference (spec 2.4 / 6, item 6), the text stream O2 is carried to the next layer, and every
    stage keeps its residual ("residuals, layer norm, dropout at each stage" in the paper): the
    literal Algorithm 2 has none on O3 and the FFN, which would leave each clip with nothing of
    its own features but attention weights over words.

    Three more switches measure the reference's layer shape (docs/FIDELITY.md, 11):
    `self_attention=False` drops the clip self-attention stage, `ffn_residual=False` makes the
    output `norm(FFN(O3))` (the reference's last stage has no residual), `carry_text=False`
    hands every layer the words as they entered Bi-CMF (the reference keeps its text stream
    unchanged) and leaves the layer's own word update O2 unnormalised, as the reference does.

    Positions (`positions`): "all" adds them to the queries, keys *and values* of the first two
    stages and to the fusion stage's query and key; "reference" (the authors' layer) adds them
    to the first two stages' queries and keys only, so the words gather clip content without
    the clips' sine positions and the fusion stage matches on content alone.

    Norm placement (`norm="post"`, the default): the residual sum is normalised, as in the
    reference and every post-norm transformer. Algorithm 2 as printed normalises the attention
    branch before adding it (`norm="branch"`): its unit-variance output then swamps the FRA
    output it is added to (rms 1.0 against 0.14, the clips differing by 0.07), every clip
    leaves Bi-CMF nearly the same, and the saliency profile starts flat (std across clips
    0.003) and barely learns (docs/FIDELITY.md, 8).
    """

    def __init__(
        self, dim: int, nheads: int, ffn_dim: int, dropout: float, attn_dropout: float,
        norm: str = "post", self_attention: bool = True, ffn_residual: bool = True,
        carry_text: bool = True, positions: str = "all",
    ) -> None:
        super().__init__()
        self.post_norm = norm == "post"
        self.values_with_pos = positions == "all"
        self.ffn_residual = ffn_residual
        self.carry_text = carry_text
        self.video_to_text = Attention(dim, nheads, attn_dropout)
        self.text_to_video = Attention(dim, nheads, attn_dropout)
        self.fusion = Attention(dim, nheads, attn_dropout)
        self.self_attn = Attention(dim, nheads, attn_dropout) if self_attention else None
        self.linear_v = nn.Linear(dim, dim)
        self.linear_t = nn.Linear(dim, dim)
        self.norm_v = nn.LayerNorm(dim)
        self.norm_t = nn.LayerNorm(dim)
        self.norm_fuse = nn.LayerNorm(dim)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        video_mask: torch.Tensor,  # (B, 1, 1, Lv) additive
        text_mask: torch.Tensor,  # (B, 1, 1, Lq) additive
        video_pos: torch.Tensor,
        text_pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, Lv, d), text (B, Lq, d) -> (video, text), same shapes."""
        v_in, t_in = video + video_pos, text + text_pos
        # values: "all" = with their positions; "reference" = the bare features (the clip
        # positions then reach the words only through the attention weights)
        v_val, t_val = (v_in, t_in) if self.values_with_pos else (video, text)
        a_v = self.linear_v(self.dropout(self.video_to_text(v_in, t_in, t_val, text_mask)))
        a_t = self.linear_t(self.dropout(self.text_to_video(t_in, v_in, v_val, video_mask)))
        if self.post_norm:
            o1 = self.norm_v(video + self.dropout(a_v))
            o2 = text + self.dropout(a_t)
            o2 = self.norm_t(o2) if self.carry_text else o2
        else:  # Algorithm 2 as printed: the branch is normalised, the sum is not
            o1, o2 = video + self.norm_v(a_v), text + self.norm_t(a_t)
        q, k = (o1 + video_pos, o2 + text_pos) if self.values_with_pos else (o1, o2)
        o3 = self.norm_fuse(o1 + self.dropout(self.fusion(q, k, o2, text_mask)))
        f = o3
        if self.self_attn is not None:
            q = o3 + video_pos
            f = self.norm_self(o3 + self.dropout(self.self_attn(q, q, o3, video_mask)))
        h = self.dropout(self.ffn(f))
        out = self.norm_out(f + h if self.ffn_residual else h)  # (B, Lv, d)
        return out, (o2 if self.carry_text else text)


class BiCMF(nn.Module):
    """A stack of Bi-CMF layers; returns the fused video stream."""

    def __init__(
        self, num_layers: int, dim: int, nheads: int, ffn_dim: int, dropout: float,
        attn_dropout: float, norm: str = "post", self_attention: bool = True,
        ffn_residual: bool = True, carry_text: bool = True, positions: str = "all",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            BiCMFLayer(dim, nheads, ffn_dim, dropout, attn_dropout, norm, self_attention,
                       ffn_residual, carry_text, positions)
            for _ in range(num_layers)
        )

    def forward(self, video, text, video_mask, text_mask, video_pos, text_pos) -> torch.Tensor:
        for layer in self.layers:
            video, text = layer(video, text, video_mask, text_mask, video_pos, text_pos)
        return video
