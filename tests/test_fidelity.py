"""The decisions of docs/FIDELITY.md, one test each: every test fails with its fix undone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_batch, tiny_config
from vl.config import TVSUM_TABLE7, ConfigError, ExperimentConfig
from vl.engine import forward
from vl.losses import build_criterion
from vl.model import build_model
from vl.model.bicmf import BiCMFLayer
from vl.model.layers import additive_mask

torch.set_num_threads(1)


def _sym_loss_after_training(*overrides: str, steps: int = 150) -> float:
    """Train only L_sym with video drawn fresh every step, independent of the text."""
    cfg = tiny_config("model.dropout=0", "model.input_dropout=0", "model.attention_dropout=0",
                      *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    crit = build_criterion(cfg.loss)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    text_batch = tiny_batch(cfg, batch_size=8, seed=1)  # fixed queries: easy to memorise
    losses = []
    for step in range(steps):
        batch = tiny_batch(cfg, batch_size=8, seed=100 + step)
        batch.text, batch.text_mask = text_batch.text, text_batch.text_mask
        loss = crit.symmetric_alignment_loss(forward(model, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_sym_alignment_cannot_be_met_without_the_video():
    """L_sym contrasts query-free video with the text: with video independent of the text it
    stays at chance (ln B), where the FRA output (which contains the text) lets it fall."""
    chance = math.log(8)
    honest = _sym_loss_after_training()
    leaky = _sym_loss_after_training("model.align_video=fra")
    assert honest > 0.85 * chance
    assert leaky < 0.5 * chance


def test_class_loss_is_the_mean_over_queries():
    cfg = tiny_config()
    batch = tiny_batch(cfg, batch_size=3)
    model = build_model(cfg.model).eval()
    crit = build_criterion(cfg.loss)
    with torch.no_grad():
        out = forward(model, batch)
    out.pred_logits = torch.zeros_like(out.pred_logits)  # CE = ln 2 for every query
    losses = crit(out, batch)
    B, Nq = out.pred_logits.shape[:2]
    n_fg = int(batch.span_mask.sum())  # each GT window is matched to one query
    expected = (n_fg + 0.1 * (B * Nq - n_fg)) * math.log(2) / (B * Nq)
    assert float(losses["loss_label"]) == pytest.approx(expected, rel=1e-5)


def test_decoder_reads_the_clips_only():
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    seen = []
    model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    batch = tiny_batch(cfg, clips=20)
    with torch.no_grad():
        forward(model, batch)
    assert seen == [20]  # memory of the 20 clips, not [global; clips]


def test_text_positions_start_small():
    model = build_model(tiny_config("model.hidden_dim=64", "model.max_q_l=32").model)
    assert float(model.text_pos.weight.std()) < 0.03


def test_negative_pass_refines_clips_with_its_own_query():
    """The mismatched half equals a matching pass run on the rolled queries: no part of it has
    seen the true query."""
    cfg = tiny_config("model.mr2hd=false")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = tiny_batch(cfg, batch_size=4, seed=2)
    rolled = tiny_batch(cfg, batch_size=4, seed=2)
    rolled.text, rolled.text_mask = batch.text.roll(-1, 0), batch.text_mask.roll(-1, 0)
    with torch.no_grad():
        neg = forward(model, batch).saliency_neg
        alone = build_model(dataclasses.replace(cfg.model, negative_pass=False))
        alone.load_state_dict(model.state_dict())
        expected = forward(alone.eval(), rolled).saliency
    valid = batch.video_mask.bool()
    torch.testing.assert_close(neg[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_saliency_profile_alignment_rewards_clip_sentence_similarity():
    cfg = tiny_config("loss.sal_align_coef=0.5")
    batch = tiny_batch(cfg, batch_size=3)
    model = build_model(cfg.model).eval()
    crit = build_criterion(cfg.loss)
    with torch.no_grad():
        out = forward(model, batch)
    labels, mask = batch.saliency_labels, batch.video_mask.bool()
    sentence = F.normalize(torch.randn(3, cfg.model.hidden_dim), dim=-1)
    out.sym_text = sentence
    noise = F.normalize(torch.randn_like(out.refined_video), dim=-1)
    along = (noise * sentence[:, None]).sum(-1, keepdim=True) * sentence[:, None]
    orth = F.normalize(noise - along, dim=-1)
    # clips whose cosine to the sentence is the GT profile (labels / 12) -> zero loss
    cos = (labels / 12.0)[..., None]
    out.refined_video = cos * sentence[:, None] + (1 - cos**2).sqrt() * orth
    matched = float(crit.saliency_alignment_loss(out, labels, mask))
    out.refined_video = noise
    unrelated = float(crit.saliency_alignment_loss(out, labels, mask))
    assert matched < 0.1 < unrelated
    assert "loss_sal_align" in crit(out, batch)


def test_margin_is_a_per_pair_mean():
    """sum / (B * P) * 2 as the reference: one hard pair (TVSum) weighs as much per pair as
    two (QVHighlights)."""
    cfg = tiny_config()
    batch = tiny_batch(cfg, batch_size=2)
    crit = build_criterion(cfg.loss)
    s = torch.zeros_like(batch.saliency_labels)
    full = float(crit.margin_loss(s, batch))
    batch.saliency_pos_idx = batch.saliency_pos_idx[:, :1]
    batch.saliency_neg_idx = batch.saliency_neg_idx[:, :1]
    assert full == pytest.approx(2 * cfg.loss.margin)
    assert float(crit.margin_loss(s, batch)) == pytest.approx(full)


@pytest.mark.parametrize("domain", ["GA", "VT", "BK"])
def test_tvsum_recipe_takes_table7_per_domain(domain):
    cfg = ExperimentConfig.from_yaml("configs/tvsum.yaml", [f"data.tvsum_domain={domain}"])
    row = TVSUM_TABLE7["i3d"][domain]
    assert (cfg.loss.hl_coef, cfg.loss.scsl_coef) == (row["hl_coef"], row["scsl_coef"])
    assert cfg.loss.al_coef == 0.8  # Table 6
    # an explicit value beats the table
    cfg = ExperimentConfig.from_yaml("configs/tvsum.yaml",
                                     [f"data.tvsum_domain={domain}", "loss.hl_coef=7"])
    assert cfg.loss.hl_coef == 7


def test_table7_as_printed():
    """Paper Table 7, I3D column, domain order VT VU GA MS PK PR FM BK BT DS."""
    order = ["VT", "VU", "GA", "MS", "PK", "PR", "FM", "BK", "BT", "DS"]
    hl = [TVSUM_TABLE7["i3d"][d]["hl_coef"] for d in order]
    scsl = [TVSUM_TABLE7["i3d"][d]["scsl_coef"] for d in order]
    assert hl == [10, 1, 1, 1, 10, 10, 10, 1, 10, 10]
    assert scsl == [1, 1, 10, 5, 5, 10, 5, 1, 1, 10]


@pytest.mark.parametrize(("dataset", "cal"), [("qvhighlights", 0.2), ("charades", 0.3),
                                              ("pretrain", 0.01)])
def test_reference_script_preset_trains_the_scripts_objective(dataset, cal):
    cfg = ExperimentConfig.from_preset("reference_script", [f"data.dataset={dataset}"])
    lo = cfg.loss
    assert cfg.model.span_nce and lo.span_nce_coef == cal and lo.sal_align_coef == cal
    assert lo.al_coef == 0  # the symmetric loss is dead code in the scripts


def _across_clips(x: torch.Tensor) -> float:
    return float((x - x.mean(1, keepdim=True)).pow(2).mean().sqrt())


def test_bicmf_post_norm_keeps_the_clips_apart():
    """With the attention branch normalised before the sum (Algorithm 2 as printed), its
    unit-scale output swamps clips arriving at FRA's scale and every clip leaves alike."""
    assert ExperimentConfig.from_preset("paper").model.bicmf_norm == "post"
    torch.manual_seed(0)
    B, Lv, Lq, d = 4, 30, 12, 64
    video = 0.14 * torch.randn(B, Lv, d)  # FRA's output scale
    text = torch.randn(B, Lq, d)
    vmask = additive_mask(torch.ones(B, Lv, dtype=torch.bool), video.dtype)
    tmask = additive_mask(torch.ones(B, Lq, dtype=torch.bool), video.dtype)
    kept = {}
    for norm in ("post", "branch"):
        torch.manual_seed(1)
        layer = BiCMFLayer(d, 4, 128, 0.0, 0.0, norm).eval()
        for p in layer.parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)
        with torch.no_grad():
            out, _ = layer(video, text, vmask, tmask, torch.zeros_like(video), 0.0)
        kept[norm] = _across_clips(out) / float(out.pow(2).mean().sqrt())
    assert kept["post"] > 2 * kept["branch"]


def test_fra_output_is_normalised_per_clip():
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    batch = tiny_batch(cfg, batch_size=3, clips=12)
    batch.video_mask[0, 8:] = 0
    with torch.no_grad():
        out = forward(model, batch).refined_video  # (B, Lv, d)
    valid = batch.video_mask.bool()
    torch.testing.assert_close(out[valid].mean(-1), torch.zeros(int(valid.sum())), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(out[valid].std(-1, unbiased=False), torch.ones(int(valid.sum())),
                               atol=1e-2, rtol=0)
    assert float(out[~valid].abs().max()) == 0.0


@pytest.mark.parametrize("key", ["text_pos_std", "global_token_std"])
@pytest.mark.parametrize("value", ["-1", ".nan"])
def test_init_stds_must_be_non_negative(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        ExperimentConfig.from_preset("tiny", [f"model.{key}={value}"])


def _bicmf_layer(**switches) -> BiCMFLayer:
    torch.manual_seed(1)
    return BiCMFLayer(32, 4, 64, 0.0, 0.0, "post", **switches).eval()


def _bicmf_inputs(B: int = 2, Lv: int = 10, Lq: int = 6, d: int = 32):
    torch.manual_seed(0)
    video, text = torch.randn(B, Lv, d), torch.randn(B, Lq, d)
    vmask = additive_mask(torch.ones(B, Lv, dtype=torch.bool), video.dtype)
    tmask = additive_mask(torch.ones(B, Lq, dtype=torch.bool), video.dtype)
    return video, text, vmask, tmask, torch.zeros_like(video), torch.zeros_like(text)


def test_bicmf_reference_layer_shape_switches():
    """The three differences from the authors' layer, each a switch that does what it says."""
    inputs = _bicmf_inputs()
    text = inputs[1]
    # The words are handed on unchanged (the reference's text stream) or updated (O2).
    with torch.no_grad():
        _, kept = _bicmf_layer(carry_text=False)(*inputs)
        _, carried = _bicmf_layer()(*inputs)
    assert torch.equal(kept, text) and not torch.allclose(carried, text)
    # No clip self-attention stage: no such parameters, and a different output.
    assert not any("self_attn" in k for k in _bicmf_layer(self_attention=False).state_dict())
    assert any("self_attn" in k for k in _bicmf_layer().state_dict())
    # No residual around the FFN: with the FFN's output zeroed, nothing of the clips is left.
    for residual in (True, False):
        layer = _bicmf_layer(ffn_residual=residual)
        torch.nn.init.zeros_(layer.ffn.linear2.weight)
        torch.nn.init.zeros_(layer.ffn.linear2.bias)
        with torch.no_grad():
            out, _ = layer(*inputs)
        assert (_across_clips(out) > 0.1) == residual


def test_mr2hd_padded_gru_reads_zeros_after_the_slice():
    """`padded` (the reference) runs the GRU on the slice followed by zeros up to Lv; `slice`
    on the slice alone: the two agree only when the slice fills the video."""
    from vl.model.mr2hd import MomentToHighlight

    torch.manual_seed(0)
    B, Lv, d = 2, 12, 16
    video, memory = torch.randn(B, Lv, d), torch.randn(B, Lv, d)
    mask = torch.ones(B, Lv, dtype=torch.bool)
    logits = torch.tensor([[[5.0, 0.0]], [[5.0, 0.0]]])  # one query per sample
    heads = {}
    for how in ("slice", "padded"):
        torch.manual_seed(1)
        heads[how] = MomentToHighlight(d, how).eval()
    part = torch.tensor([[[0.25, 0.2]], [[0.5, 0.3]]])  # a few clips each
    whole = torch.tensor([[[0.5, 1.0]], [[0.5, 1.0]]])
    with torch.no_grad():
        s_part = {h: m(video, memory, mask, logits, part) for h, m in heads.items()}
        s_whole = {h: m(video, memory, mask, logits, whole) for h, m in heads.items()}
    assert not torch.allclose(s_part["slice"], s_part["padded"], atol=1e-4)
    torch.testing.assert_close(s_whole["slice"], s_whole["padded"], atol=1e-5, rtol=1e-5)


def test_fra_word_term_bias_is_the_same_vector_for_every_clip():
    """`fra_word_term: bias` (the reference's collapsed V_Q): the clip-word block of FRA's
    fusion input does not depend on the clip, the words or the query."""
    from vl.model.fra import FeatureRefinementAlignment

    torch.manual_seed(0)
    B, Lv, Lq, d = 2, 9, 5, 16
    fra = FeatureRefinementAlignment(d, 0.0, "plain", "bias").eval()
    torch.nn.init.normal_(fra.word_bias)
    seen = []
    fra.fuse.register_forward_hook(lambda m, args, out: seen.append(args[0][..., d:2 * d]))
    mask_v, mask_t = torch.ones(B, Lv, dtype=torch.bool), torch.ones(B, Lq, dtype=torch.bool)
    with torch.no_grad():
        fra(torch.randn(B, Lv, d), torch.randn(B, Lq, d), mask_v, mask_t)
    v_q = seen[0]  # (B, Lv, d)
    torch.testing.assert_close(v_q, fra.word_bias.expand(B, Lv, d))
    attention = FeatureRefinementAlignment(d, 0.0, "plain", "attention").eval()
    attention.fuse.register_forward_hook(lambda m, args, out: seen.append(args[0][..., d:2 * d]))
    with torch.no_grad():
        attention(torch.randn(B, Lv, d), torch.randn(B, Lq, d), mask_v, mask_t)
    assert _across_clips(seen[1]) > 1e-3  # per clip


def test_reference_attention_init_matches_multihead_attention_scale():
    cfg = {how: tiny_config(f"model.attention_init={how}") for how in ("xavier", "reference")}
    torch.manual_seed(0)
    models = {how: build_model(c.model) for how, c in cfg.items()}
    d = cfg["xavier"].model.hidden_dim
    for how, model in models.items():
        attn = model.bicmf.layers[0].video_to_text
        bound = math.sqrt(6 / (4 * d)) if how == "reference" else math.sqrt(6 / (2 * d))
        w = attn.q_proj.weight.abs().max().item()
        assert 0.9 * bound < w <= bound, (how, w, bound)
        zero_bias = all(float(p.bias.abs().max()) == 0.0
                        for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
        assert zero_bias == (how == "reference")


def test_bicmf_reference_positions_keep_clip_positions_out_of_the_values():
    """With every clip alike, the words' update reads no clip position under `reference`
    (positions steer the attention weights only); under `all` the sine positions are values."""
    torch.manual_seed(0)
    B, Lv, Lq, d = 2, 10, 6, 32
    video = torch.randn(B, 1, d).expand(B, Lv, d)
    text = torch.randn(B, Lq, d)
    vmask = additive_mask(torch.ones(B, Lv, dtype=torch.bool), video.dtype)
    tmask = additive_mask(torch.ones(B, Lq, dtype=torch.bool), video.dtype)
    pos_a, pos_b = torch.randn(B, Lv, d), torch.randn(B, Lv, d)
    for positions, independent in (("reference", True), ("all", False)):
        layer = _bicmf_layer(positions=positions)
        with torch.no_grad():
            _, words_a = layer(video, text, vmask, tmask, pos_a, torch.zeros_like(text))
            _, words_b = layer(video, text, vmask, tmask, pos_b, torch.zeros_like(text))
        assert torch.allclose(words_a, words_b, atol=1e-5) == independent, positions


def test_paper_presets_use_the_reference_attention_init():
    for preset in ("paper", "reference_script"):
        assert ExperimentConfig.from_preset(preset).model.attention_init == "reference"
    assert ExperimentConfig.from_preset("tiny").model.attention_init == "xavier"
