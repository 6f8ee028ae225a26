"""Each loss term: finite, zero or minimal where the paper says so, and jointly trainable."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from tests.helpers import tiny_batch, tiny_config
from vl.config import LossConfig
from vl.engine import forward, train_step
from vl.losses import build_criterion
from vl.model import ModelOutput, build_model

torch.set_num_threads(1)


def _output(batch, spans=None, logits=None, saliency=None, s_neg=None, s_mr=None, Nq=5):
    B, Lv = batch.saliency_labels.shape
    d = 8
    spans = spans if spans is not None else torch.full((B, Nq, 2), 0.5)
    return ModelOutput(
        pred_logits=logits if logits is not None else torch.zeros(B, Nq, 2),
        pred_spans=spans,
        saliency=saliency if saliency is not None else torch.zeros(B, Lv),
        saliency_neg=s_neg,
        saliency_mr=s_mr,
        video_mask=batch.video_mask.bool(),
        sym_video=torch.randn(B, d),
        sym_text=torch.randn(B, d),
        logit_scale=torch.tensor(math.log(1 / 0.07)),
        aux_logits=[], aux_spans=[],
    )


def test_all_terms_finite_and_named():
    cfg = tiny_config()
    model = build_model(cfg.model)
    batch = tiny_batch(cfg)
    losses = build_criterion(cfg.loss)(forward(model, batch), batch, epoch=4)
    expected = {"loss_span", "loss_giou", "loss_label", "loss_span_0", "loss_giou_0",
                "loss_label_0", "loss_margin", "loss_rank_contrastive", "loss_neg_pair",
                "loss_ts", "loss_tc", "loss_hard_pos", "loss_hard_neg", "loss_sym",
                "loss_sal_align", "loss_saliency", "loss", "hard_weight"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["hard_weight"]) == 5 * cfg.loss.hl_coef  # W_j = (epoch + 1) * hl


def test_the_weighted_summands_make_the_total_and_each_coefficient_scales_its_own_term():
    cfg = tiny_config("model.span_nce=true", "loss.span_nce_coef=0.3")
    model = build_model(cfg.model)
    batch = tiny_batch(cfg)
    torch.manual_seed(0)
    crit = build_criterion(cfg.loss)
    with torch.no_grad():
        losses = crit(forward(model, batch), batch, epoch=2)
    w_hard = float(losses["hard_weight"])
    weighted = crit.weighted(losses, w_hard)
    assert float(sum(weighted.values())) == pytest.approx(float(losses["loss"]), rel=1e-6)
    c = cfg.loss
    expect = {"loss_ts": c.saliency_coef * c.scsl_coef, "loss_tc": c.saliency_coef * c.tcl_coef,
              "loss_hard_pos": c.saliency_coef * w_hard, "loss_sym": c.al_coef,
              "loss_sal_align": c.sal_align_coef, "loss_label_0": c.label_coef,
              "loss_giou": c.giou_coef, "loss_span": c.span_coef,
              "loss_span_nce": c.span_nce_coef}
    for name, coef in expect.items():
        assert float(weighted[name]) == pytest.approx(coef * float(losses[name]), rel=1e-6), name
    assert "loss_saliency" not in weighted and "hard_weight" not in weighted  # not summands


def test_perfect_spans_give_zero_span_and_giou_loss():
    cfg = tiny_config()
    batch = tiny_batch(cfg, batch_size=3)
    B, W = batch.span_mask.shape
    Nq = 5
    spans = torch.rand(B, Nq, 2) * 0.3 + 0.1
    spans[:, :W] = batch.span_targets  # some queries sit exactly on the GT windows
    logits = torch.zeros(B, Nq, 2)
    logits[:, :W, 0] = 5.0  # and are confident
    crit = build_criterion(cfg.loss)
    losses = crit.moment_losses(_output(batch, spans=spans, logits=logits, Nq=Nq), batch)
    assert float(losses["loss_span"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    # class CE falls with the right logits: compare with uninformative logits
    flat = crit.moment_losses(_output(batch, spans=spans, Nq=Nq), batch)
    assert float(losses["loss_label"]) < float(flat["loss_label"])


def test_saliency_cosine_and_hard_losses_vanish_for_a_perfect_profile():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    crit = build_criterion(cfg.loss)
    mask = batch.video_mask.bool()
    labels = batch.saliency_labels
    s = labels * 0.37 - 1.0  # same profile, other scale and offset
    assert float(crit.cosine_loss(s, labels, mask)) == pytest.approx(0.0, abs=1e-5)
    pos, neg = crit.hard_losses(s, labels, mask)
    assert float(pos) == pytest.approx(0.0, abs=1e-6)
    assert float(neg) == pytest.approx(0.0, abs=1e-6)
    wrong = -s
    assert float(crit.cosine_loss(wrong, labels, mask)) > 0.5
    assert sum(map(float, crit.hard_losses(wrong, labels, mask))) > 1e-3


def test_margin_loss_zero_when_positives_win_by_the_margin():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    crit = build_criterion(cfg.loss)
    s = torch.zeros_like(batch.saliency_labels)
    assert float(crit.margin_loss(s, batch)) == pytest.approx(2 * cfg.loss.margin)  # 2 pairs
    s.scatter_(1, batch.saliency_pos_idx, 1.0)
    s.scatter_(1, batch.saliency_neg_idx, 0.0)
    hard_pos_is_hard_neg = (batch.saliency_pos_idx[:, 0] == batch.saliency_neg_idx[:, 0])
    if not hard_pos_is_hard_neg.any():
        assert float(crit.margin_loss(s, batch)) == 0.0


def test_rank_contrastive_hand_computed():
    crit = build_criterion(LossConfig())
    s = torch.tensor([[1.0, -1.0]])
    labels = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    tau = 0.5
    logp0 = s[0, 0] / tau - torch.logsumexp(s[0] / tau, 0)
    expected = 2 * (-logp0) / 12  # ranks 1 and 2 have the positive clip; 3..11 are skipped
    assert float(crit.rank_contrastive_loss(s, None, labels, mask)) == pytest.approx(
        float(expected), rel=1e-4)
    # the mismatched pass enters the softmax as extra negatives: the loss can only grow
    with_neg = crit.rank_contrastive_loss(s, torch.tensor([[0.5, 0.5]]), labels, mask)
    assert float(with_neg) > float(expected)


def test_negative_pair_loss_prefers_low_mismatched_saliency():
    mask = torch.ones(2, 3, dtype=torch.bool)
    crit = build_criterion(LossConfig())
    low = crit.negative_pair_loss(torch.full((2, 3), -8.0), mask)
    high = crit.negative_pair_loss(torch.full((2, 3), 2.0), mask)
    assert float(low) < 0.01 < float(high)
    # padding does not count
    mask[:, 2] = False
    assert float(crit.negative_pair_loss(torch.tensor([[-8.0, -8.0, 50.0]] * 2), mask)) < 0.01


def test_symmetric_alignment_is_minimal_for_aligned_pairs():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    out = _output(batch)
    eye = torch.eye(4, 8)
    out.sym_video, out.sym_text = eye, eye * 3.0
    crit = build_criterion(cfg.loss)
    aligned = float(crit.symmetric_alignment_loss(out))
    out.sym_text = eye.roll(1, dims=0)
    shuffled = float(crit.symmetric_alignment_loss(out))
    out.sym_text = torch.ones(4, 8)
    uninformative = float(crit.symmetric_alignment_loss(out))
    assert uninformative == pytest.approx(math.log(4), rel=1e-4)  # chance level
    assert aligned < 1e-3 < uninformative < shuffled


def test_hard_weight_grows_with_epoch_and_can_be_capped():
    assert build_criterion(LossConfig(hl_coef=10)).hard_weight(0) == 10
    assert build_criterion(LossConfig(hl_coef=10)).hard_weight(199) == 2000
    assert build_criterion(LossConfig(hl_coef=10, hl_cap=100.0)).hard_weight(199) == 100


def test_hd_only_batches_skip_matching_and_moment_losses():
    cfg = tiny_config()
    model = build_model(cfg.model)
    batch = tiny_batch(cfg, has_spans=False)
    losses = build_criterion(cfg.loss)(forward(model, batch), batch, 0)
    assert not any(k.startswith(("loss_span", "loss_giou", "loss_label")) for k in losses)
    assert "loss_ts" in losses and "loss_sym" in losses


def test_overfitting_one_tiny_batch_drops_total_loss_tenfold():
    cfg = tiny_config("model.dropout=0", "model.input_dropout=0", "model.attention_dropout=0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    crit = build_criterion(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = tiny_batch(cfg, batch_size=4, clips=16, tokens=8)
    first = float(train_step(model, crit, batch, opt, 0, grad_clip=1.0)["loss"])
    for _ in range(180):
        last = float(train_step(model, crit, batch, opt, 0, grad_clip=1.0)["loss"])
    assert last < first / 10, (first, last)


def test_cosine_terms_sum_over_the_worker_batch():
    """L_ts sums its per-video terms over the batch (as the reference does, so the paper's
    coefficients keep their meaning): a batch of 8 is the sum of its two halves when they share
    the rescaling's shift and label range, so it exceeds either half (a mean would not)."""
    torch.manual_seed(0)
    B, Lv = 8, 6
    labels = torch.randint(0, 5, (B, Lv)).float()
    mask = torch.ones(B, Lv, dtype=torch.bool)
    mask[1, 4:] = False
    s = torch.randn(B, Lv)
    s[0, 0] = s[4, 0] = -9.0  # each half holds the batch minimum (the rescaling's shift)
    labels[0, 0] = labels[4, 0] = 0.0
    labels[0, 1] = labels[4, 1] = 4.0  # and the same label range
    crit = build_criterion(LossConfig())
    whole = float(crit.cosine_loss(s, labels, mask))
    halves = [float(crit.cosine_loss(s[h], labels[h], mask[h])) for h in (slice(0, 4), slice(4, 8))]
    assert whole == pytest.approx(sum(halves), rel=1e-6)
    assert min(halves) > 0 and whole > max(halves)  # a sum, not a mean
    assert "world_size" not in inspect.signature(build_criterion).parameters  # per worker
