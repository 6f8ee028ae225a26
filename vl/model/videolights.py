"""The assembled VideoLights model: projection, FRA, Bi-CMF, encoder, anchor decoder, heads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vl.config import ModelConfig
from vl.model.bicmf import BiCMF
from vl.model.fra import FeatureRefinementAlignment
from vl.model.layers import MLP, Attention, additive_mask, sine_positions
from vl.model.mr2hd import MomentToHighlight
from vl.model.projection import InputProjection
from vl.model.transformer import AnchorDecoder, Encoder
from vl.spans import inverse_sigmoid


@dataclass
class ModelOutput:
    """Everything the criterion and the post-processing read. B batch, Nq queries, Lv clips."""

    pred_logits: torch.Tensor  # (B, Nq, 2); index 0 = foreground
    pred_spans: torch.Tensor  # (B, Nq, 2) (center, width) in [0, 1]
    saliency: torch.Tensor  # (B, Lv) HD scores from the matching query
    video_mask: torch.Tensor  # (B, Lv) bool
    sym_video: torch.Tensor  # (B, d) pooled video (model.align_video), for L_sym
    sym_text: torch.Tensor  # (B, d) pooled projected text, for L_sym
    logit_scale: torch.Tensor  # () learnable log-temperature of L_sym
    saliency_neg: torch.Tensor | None = None  # (B, Lv) with the mismatched query
    saliency_mr: torch.Tensor | None = None  # (B, Lv) MR->HD branch
    aux_logits: list[torch.Tensor] = field(default_factory=list)  # per earlier decoder layer
    aux_spans: list[torch.Tensor] = field(default_factory=list)
    proj_queries: torch.Tensor | None = None  # (L, B, Nq, c) for the optional span NCE
    proj_text: torch.Tensor | None = None  # (B, Lq, c)
    text_mask: torch.Tensor | None = None  # (B, Lq) bool
    refined_video: torch.Tensor | None = None  # (B, Lv, d) FRA output, for the profile alignment


class VideoLights(nn.Module):
    """Joint moment retrieval and highlight detection (VIDEOLIGHTS_SPEC sections 2 and 6c).

    The matching pass and the mismatched-query (negative) pass share Bi-CMF and the encoder, so
    they run as ONE batch of 2B; only the matching half goes through the decoder (the reference
    decodes the negative half too and throws the result away).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.video_proj = InputProjection(
            cfg.video_input_dim, d, cfg.n_input_proj, cfg.input_dropout, cfg.proj_kernel_size
        )
        self.text_proj = InputProjection(
            cfg.text_dim, d, cfg.n_input_proj, cfg.input_dropout, cfg.proj_kernel_size
        )
        self.fra = (
            FeatureRefinementAlignment(d, cfg.dropout, cfg.fra_output, cfg.fra_word_term)
            if cfg.fra else None
        )
        self.text_pos = nn.Embedding(cfg.max_q_l, d)
        nn.init.normal_(self.text_pos.weight, std=cfg.text_pos_std)
        ffn, drop, adrop = cfg.dim_feedforward, cfg.dropout, cfg.attention_dropout
        self.bicmf = BiCMF(
            cfg.bicmf_layers, d, cfg.nheads, ffn, drop, adrop, cfg.bicmf_norm,
            cfg.bicmf_self_attention, cfg.bicmf_ffn_residual, cfg.bicmf_carry_text,
            cfg.bicmf_positions,
        )
        self.global_token = nn.Parameter(torch.randn(d) * cfg.global_token_std)
        self.global_pos = nn.Parameter(torch.randn(d) * cfg.global_token_std)
        self.encoder = Encoder(cfg.enc_layers, d, cfg.nheads, ffn, drop, adrop)
        self.anchors = nn.Embedding(cfg.num_queries, 2)
        self.decoder = AnchorDecoder(cfg.dec_layers, d, cfg.nheads, ffn, drop, adrop)
        self.class_embed = nn.Linear(d, 2)
        self.span_embed = MLP(d, d, 2, 3)
        self.saliency_clip = nn.Linear(d, d)
        self.saliency_global = nn.Linear(d, d)
        self.mr2hd = MomentToHighlight(d, cfg.mr2hd_gru_input) if cfg.mr2hd else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.span_nce:
            self.query_contrast = nn.Linear(d, cfg.contrastive_dim)
            self.text_contrast = nn.Linear(d, cfg.contrastive_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier init for the transformer matrices (paper), anchors spread over the video."""
        for module in (self.bicmf, self.encoder, self.decoder):
            for name, p in module.named_parameters():
                if p.dim() > 1 and "bbox_embed.layers.2" not in name:
                    nn.init.xavier_uniform_(p)
        if self.cfg.attention_init == "reference":  # nn.MultiheadAttention's in_proj scale
            for module in (self.bicmf, self.encoder):
                for attn in (m for m in module.modules() if isinstance(m, Attention)):
                    bound = math.sqrt(6 / (4 * attn.dim))  # Xavier of one 3d x d matrix
                    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                        nn.init.uniform_(proj.weight, -bound, bound)
                    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                        nn.init.zeros_(proj.bias)
        nn.init.uniform_(self.anchors.weight, -2.0, 2.0)

    def forward(
        self,
        video: torch.Tensor,  # (B, Lv, Dv + 2)
        video_mask: torch.Tensor,  # (B, Lv) float or bool, 1 = valid
        text: torch.Tensor,  # (B, Lq, Dt)
        text_mask: torch.Tensor,  # (B, Lq)
    ) -> ModelOutput:
        vmask, tmask = video_mask.bool(), text_mask.bool()
        B, Lv, _ = video.shape
        Lq = text.shape[1]
        if Lq > self.text_pos.num_embeddings:
            raise ValueError(
                f"text has {Lq} tokens but model.max_q_l is {self.text_pos.num_embeddings}"
            )
        v_proj = self.video_proj(video, vmask) * vmask[..., None]  # (B, Lv, d)
        t_proj = self.text_proj(text, tmask) * tmask[..., None]  # (B, Lq, d)
        pos_v = sine_positions(vmask, self.cfg.hidden_dim).to(v_proj.dtype)  # (B, Lv, d)
        pos_t = self.text_pos.weight[:Lq][None].to(v_proj.dtype)  # (1, Lq, d)

        n_pass = 2 if (self.cfg.negative_pass and B > 1) else 1
        if n_pass == 2:  # sample b is paired with the query of sample b+1
            t_all = torch.cat((t_proj, t_proj.roll(-1, dims=0)))  # (2B, Lq, d)
            tm_all = torch.cat((tmask, tmask.roll(-1, dims=0)))
            vp_all, vm_all, pv_all = (torch.cat((x, x)) for x in (v_proj, vmask, pos_v))
        else:
            t_all, tm_all, vp_all, vm_all, pv_all = t_proj, tmask, v_proj, vmask, pos_v
        if self.fra is None:  # ablation: the projected clips go straight to Bi-CMF
            v_all, v_fra = vp_all, v_proj
        elif n_pass == 2 and not self.cfg.negative_fra:  # refined with the matching query
            v_fra = self.fra(v_proj, t_proj, vmask, tmask)  # (B, Lv, d)
            v_all = torch.cat((v_fra, v_fra))
        else:  # each pass refines the clips with the query it is paired with
            v_all = self.fra(vp_all, t_all, vm_all, tm_all)  # (nB, Lv, d)
            v_fra = v_all[:B]
        dtype = v_all.dtype
        fused = self.bicmf(  # (nB, Lv, d)
            v_all, t_all, additive_mask(vm_all, dtype), additive_mask(tm_all, dtype),
            pv_all, pos_t,
        )

        nB = fused.shape[0]
        src = torch.cat((self.global_token.expand(nB, 1, -1).to(fused.dtype), fused), dim=1)
        mask = torch.cat((vm_all.new_ones(nB, 1), vm_all), dim=1)  # (nB, 1+Lv)
        pos = torch.cat((self.global_pos.expand(nB, 1, -1).to(fused.dtype), pv_all), dim=1)
        mask = additive_mask(mask, dtype)  # (nB, 1, 1, 1+Lv), shared by encoder and decoder
        memory = self.encoder(src, mask, pos)  # (nB, 1+Lv, d)
        saliency_all = self.saliency(memory)  # (nB, Lv)

        first = 1 if self.cfg.decoder_memory == "clips" else 0  # the global token is for HD
        hidden, refs = self.decoder(
            memory[:B, first:], mask[:B, ..., first:], pos[:B, first:], self.anchors.weight
        )
        logits = self.class_embed(hidden)  # (L, B, Nq, 2)
        spans = (self.span_embed(hidden) + inverse_sigmoid(refs)).sigmoid()  # (L, B, Nq, 2)

        out = ModelOutput(
            pred_logits=logits[-1],
            pred_spans=spans[-1],
            saliency=saliency_all[:B],
            saliency_neg=saliency_all[B:] if n_pass == 2 else None,
            video_mask=vmask,
            text_mask=tmask,
            sym_video=_masked_mean(v_proj if self.cfg.align_video == "projection" else v_fra,
                                   vmask),
            sym_text=_masked_mean(t_proj, tmask),
            logit_scale=self.logit_scale,
            refined_video=v_fra,
            aux_logits=list(logits[:-1].unbind(0)),
            aux_spans=list(spans[:-1].unbind(0)),
        )
        if self.mr2hd is not None:
            out.saliency_mr = self.mr2hd(v_proj, memory[:B, 1:], vmask, logits[-1], spans[-1])
        if self.cfg.span_nce:
            out.proj_queries = F.normalize(self.query_contrast(hidden), dim=-1)
            out.proj_text = F.normalize(self.text_contrast(t_proj), dim=-1)
        return out

    def saliency(self, memory: torch.Tensor) -> torch.Tensor:
        """s_j = <P1 m_j, P2 g> / sqrt(d) from the clip memory and the global token (spec 2.8)."""
        g = self.saliency_global(memory[:, 0])  # (B, d)
        m = self.saliency_clip(memory[:, 1:])  # (B, Lv, d)
        return torch.einsum("bld,bd->bl", m, g) / math.sqrt(m.shape[-1])


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def build_model(cfg: ModelConfig) -> VideoLights:
    return VideoLights(cfg)
