"""vl.engine: epochs, official prediction rows, evaluation, and the same step under DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cluster.local.common import free_port
from tests.helpers import tiny_batch, tiny_config
from vl.engine import (
    NonFiniteLossError,
    build_optimizer,
    evaluate,
    predict_rows,
    train_one_epoch,
    train_step,
)
from vl.losses import build_criterion
from vl.model import build_model

torch.set_num_threads(1)


def test_train_one_epoch_updates_weights_and_reports_means():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    crit = build_criterion(cfg.loss)
    opt, sched = build_optimizer(model, cfg.train)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [tiny_batch(cfg, seed=s) for s in range(3)]
    seen = []
    stats = train_one_epoch(model, crit, batches, opt, epoch=0,
                            on_step=lambda step, info: seen.append(step))
    assert stats["steps"] == 3 and stats["samples"] == 12 and seen == [1, 2, 3]
    assert stats["samples_per_s"] > 0 and stats["lr"] == cfg.train.lr
    assert {"loss", "loss_span", "loss_sym", "loss_saliency"} <= set(stats)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > len(before) * 0.9


def test_static_shapes_train_and_evaluate_as_batch_maximum_padding():
    """data.static_shapes pads every batch to (max_v_l, max_q_l) in the engine: with dropout
    off, the same weights after an epoch and the same evaluation as batch-maximum shapes."""
    cfg = tiny_config("model.dropout=0", "model.attention_dropout=0", "model.input_dropout=0",
                      "data.static_shapes=true")
    batches = [tiny_batch(cfg, clips=16, tokens=8, seed=s) for s in range(2)]
    shape = cfg.data.static_shape()
    assert batches[0].video.shape[1] < shape[0]  # the padding is real
    results = []
    for static in (None, shape):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        widths: set[tuple[int, int]] = set()  # (clips, tokens) of every batch the model sees
        model.register_forward_pre_hook(
            lambda m, a, seen=widths: seen.add((a[0].shape[1], a[2].shape[1])))
        crit = build_criterion(cfg.loss)
        opt, _ = build_optimizer(model, cfg.train)
        stats = train_one_epoch(model, crit, batches, opt, epoch=0, static_shape=static)
        result, rows = evaluate(model, crit, batches, dataset="qvhighlights", static_shape=static)
        assert widths == ({(16, 8)} if static is None else {shape})
        results.append((stats, result, rows, [p.detach().clone() for p in model.parameters()]))
    (s0, r0, rows0, p0), (s1, r1, rows1, p1) = results
    for k in ("loss", "loss_hard_pos", "loss_ts", "loss_span"):
        assert s0[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-5), k
    for k in r0:
        assert r0[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), k
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [len(r["pred_saliency_scores"]) for r in rows0] == \
        [len(r["pred_saliency_scores"]) for r in rows1]


@pytest.mark.parametrize("has_spans,field", [(True, "text"), (False, "video")])
def test_non_finite_loss_names_the_batch_qids_and_the_bad_sample(has_spans, field):
    """With spans the matcher meets the NaN first, without them (TVSum) the loss does: either
    way the error names every qid of the batch, the sample whose features are NaN, and no
    optimizer step is taken."""
    cfg = tiny_config()
    model = build_model(cfg.model)
    batch = tiny_batch(cfg, has_spans=has_spans)
    batch.qids = [101, 102, 103, 104]
    getattr(batch, field)[2, 0, 0] = float("nan")
    opt, _ = build_optimizer(model, cfg.train)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError) as caught:
        train_step(model, build_criterion(cfg.loss), batch, opt, 3)
    message = str(caught.value)
    assert isinstance(caught.value, FloatingPointError) and "\n" not in message
    assert message.startswith("non-finite loss at epoch 3 (")
    assert "in the batch of qids [101, 102, 103, 104]" in message
    assert message.endswith("non-finite input features in qid(s) [103]")
    if not has_spans:
        assert "loss=nan" in message  # the non-finite terms
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_non_finite_loss_from_finite_inputs_says_so():
    cfg = tiny_config()
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    opt, _ = build_optimizer(model, cfg.train)
    with pytest.raises(NonFiniteLossError, match=r"qids \[0, 1, 2, 3\]; the inputs are finite"):
        train_step(model, build_criterion(cfg.loss), tiny_batch(cfg), opt, 0)


@pytest.mark.parametrize("dataset", ["qvhighlights", "charades", "tvsum"])
def test_predict_rows_are_official_rows(dataset):
    cfg = tiny_config()
    model = build_model(cfg.model).train()
    batch = tiny_batch(cfg, batch_size=5, clips=20)
    rows = predict_rows(model, batch, dataset)
    assert model.training  # restored
    assert [r["qid"] for r in rows] == batch.qids
    lengths = batch.video_mask.sum(1).long().tolist()
    for row, n in zip(rows, lengths):
        if dataset == "tvsum":
            assert "pred_relevant_windows" not in row
        else:
            windows = row["pred_relevant_windows"]
            assert len(windows) == cfg.model.num_queries
            scores = [w[2] for w in windows]
            assert scores == sorted(scores, reverse=True)
            for st, ed, score in windows:
                assert 0 <= st <= ed <= n * batch.clip_len
                assert st % batch.clip_len == 0 and ed % batch.clip_len == 0
                assert 0 <= score <= 1
        if dataset == "charades":
            assert "pred_saliency_scores" not in row
        else:
            assert len(row["pred_saliency_scores"]) == n


def _qvh_ground_truth(batch):
    """QVHighlights-style GT rows that describe the random batch's targets."""
    rows = []
    for b in range(len(batch)):
        n = int(batch.video_mask[b].sum())
        span = batch.span_targets[b][batch.span_mask[b]]
        windows = [[round(float(c - w / 2) * n * 2), round(float(c + w / 2) * n * 2)]
                   for c, w in span.tolist()]
        ids = [i for i in range(n) if batch.saliency_labels[b, i] > 0]
        scores = [[min(4, int(batch.saliency_labels[b, i]) // 3)] * 3 for i in ids]
        rows.append({"qid": batch.qids[b], "duration": n * 2, "relevant_windows": windows,
                     "relevant_clip_ids": ids, "saliency_scores": scores})
    return rows


def test_evaluate_scores_rows_with_the_official_metrics():
    cfg = tiny_config()
    model = build_model(cfg.model)
    batch = tiny_batch(cfg, batch_size=6, clips=20)
    result, rows = evaluate(model, build_criterion(cfg.loss), [batch], dataset="qvhighlights",
                            ground_truth=_qvh_ground_truth(batch))
    assert len(rows) == 6
    brief = result["metrics"]["brief"]
    assert 0 <= brief["MR-full-R1@0.5"] <= 100 and 0 <= brief["HL-min-VeryGood-mAP"] <= 100
    assert result["selection"] == pytest.approx(result["selection"])  # a finite number
    assert "val_loss" in result and "val_loss_span" in result


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One DDP rank (run in its own process by the test below)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny_config()
    torch.manual_seed(0)  # same initial weights on every rank, as Ray's prepare_model does
    model = torch.nn.parallel.DistributedDataParallel(build_model(cfg.model))
    opt, _ = build_optimizer(model, cfg.train)
    stats = train_one_epoch(model, build_criterion(cfg.loss),
                            [tiny_batch(cfg, seed=10 * rank + s) for s in range(2)], opt, 0)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"loss": stats["loss"], "weights": flat}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_ranks_stay_in_sync(tmp_path):
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    code = "import sys; from tests.test_engine import _ddp_worker as w; " \
           "w(int(sys.argv[1]), 2, int(sys.argv[2]), sys.argv[3])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(port), str(tmp_path / f"{r}.pt")],
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert r0["loss"] != r1["loss"]  # different data per rank ...
    assert torch.equal(r0["weights"], r1["weights"])  # ... all-reduced gradients: same weights


def test_evaluate_runs_one_forward_per_batch():
    """The loss and the prediction rows come from the same forward (engine.postprocess)."""
    cfg = tiny_config()
    model = build_model(cfg.model)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batches = [tiny_batch(cfg, batch_size=3, seed=s) for s in range(2)]
    result, rows = evaluate(model, build_criterion(cfg.loss), batches, dataset="qvhighlights")
    assert len(calls) == 2 and len(rows) == 6 and "val_loss" in result
    calls.clear()
    alone = predict_rows(model, batches[0], dataset="qvhighlights")
    assert len(calls) == 1 and alone == rows[:3]
