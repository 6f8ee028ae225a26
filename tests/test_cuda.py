"""The training path on a CUDA device: what `jobs.train` does on GPU workers, without Ray.

These need a GPU and are skipped on machines without one (CI has none); run them on a GPU
machine with `python -m pytest --noconftest tests/test_cuda.py` (--noconftest: the local-stack
fixtures need Ray and MLflow, which a bare GPU image may lack). The rest of the suite covers
the same code on CPU, so what is checked here is what only a GPU can break: device placement
(no tensor left on the CPU), bf16 autocast, dropout on the GPU, an optimizer state resumed next
to its parameters, and DDP over NCCL with the default arguments `ray.train.torch.prepare_model`
uses. Last run: 2026-11-26 on an NVIDIA H200 (torch 2.11), 7 passed.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.local.common import free_port
from tests.helpers import tiny_batch, tiny_config
from vl.engine import build_optimizer, evaluate, predict_rows, train_step
from vl.losses import build_criterion
from vl.model import build_model
from vl.model.layers import Dropout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_forward_on_cuda_matches_cpu(monkeypatch):
    cfg = tiny_config()
    torch.manual_seed(0)
    cpu_model = build_model(cfg.model).eval()
    gpu_model = build_model(cfg.model).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(CUDA)
    batch = tiny_batch(cfg, batch_size=4, clips=20)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # exact fp32 GEMMs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with torch.no_grad():
        ref = cpu_model(batch.video, batch.video_mask, batch.text, batch.text_mask)
        g = batch.to(CUDA)
        out = gpu_model(g.video, g.video_mask, g.text, g.text_mask)
    compared = 0
    for key, value in vars(ref).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            got = getattr(out, key)
            assert got.device.type == "cuda", key
            torch.testing.assert_close(got.cpu(), value, atol=2e-4, rtol=2e-4, msg=key)
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_on_cuda_is_inverted_dropout(p):
    """vl's Dropout uses the native kernel on a GPU (its cheap mask is a CPU trick)."""
    torch.manual_seed(0)
    x = torch.ones(400_000, device=CUDA, requires_grad=True)
    drop = Dropout(p).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(1)  # the same draw as the native kernel's: the CPU mask is not used here
    ours = Dropout(p).train()(x.detach())
    torch.manual_seed(1)
    assert torch.equal(ours, F.dropout(x.detach(), p, training=True))


@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_cuda_fits_a_batch(bf16):
    """The CPU suite's overfitting check (tests/test_losses.py), on the GPU, fp32 and bf16."""
    cfg = tiny_config("model.dropout=0", "model.input_dropout=0", "model.attention_dropout=0",
                      "train.lr=2e-3")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(CUDA)
    criterion = build_criterion(cfg.loss).to(CUDA)
    optimizer, _ = build_optimizer(model, cfg.train)
    assert all(p.device.type == "cuda" for p in model.parameters())
    batch = tiny_batch(cfg, batch_size=4, clips=16, tokens=8).to(CUDA)
    def step() -> float:
        losses = train_step(model, criterion, batch, optimizer, 0, grad_clip=1.0, bf16=bf16)
        return float(losses["loss"])

    first = step()
    for _ in range(180):
        last = step()
    assert last < first / (10 if not bf16 else 5), (first, last)
    rows = predict_rows(model, batch, "qvhighlights", bf16=bf16)
    assert len(rows) == 4 and all(len(r["pred_relevant_windows"]) > 0 for r in rows)


def test_resumed_optimizer_state_lives_next_to_cuda_parameters():
    """jobs.train's resume: weights + optimizer state saved from GPU, loaded with
    map_location="cpu" into a model moved to the GPU before its optimizer was built. The resumed
    step must equal the uninterrupted one."""
    cfg = tiny_config("model.dropout=0", "model.attention_dropout=0", "model.input_dropout=0")
    batch = tiny_batch(cfg, batch_size=4, clips=20).to(CUDA)
    criterion = build_criterion(cfg.loss).to(CUDA)

    torch.manual_seed(0)
    model = build_model(cfg.model).to(CUDA)
    optimizer, _ = build_optimizer(model, cfg.train)
    for _ in range(2):
        train_step(model, criterion, batch, optimizer, 0)
    saved = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict()}
    buf = io.BytesIO()
    torch.save(saved, buf)
    train_step(model, criterion, batch, optimizer, 0)  # the uninterrupted third step

    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=False)
    resumed = build_model(cfg.model).to(CUDA)
    opt2, _ = build_optimizer(resumed, cfg.train)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    moments = [s["exp_avg"] for s in opt2.state.values()]
    assert moments and all(m.device.type == "cuda" for m in moments)
    train_step(resumed, criterion, batch, opt2, 0)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def test_ddp_over_nccl_with_prepare_model_defaults():
    """One NCCL rank, DDP with default arguments (as ray.train.torch.prepare_model wraps it):
    several steps must run (an unused parameter would fail the second one) and evaluate."""
    cfg = tiny_config()
    port = free_port()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(cfg.model).to(CUDA),
                                                          device_ids=[0])
        criterion = build_criterion(cfg.loss).to(CUDA)
        optimizer, _ = build_optimizer(model, cfg.train)
        batches = [tiny_batch(cfg, batch_size=4, clips=20, seed=s).to(CUDA) for s in range(3)]
        for batch in batches:
            losses = train_step(model, criterion, batch, optimizer, 0, bf16=True)
            assert torch.isfinite(losses["loss"])
        result, rows = evaluate(model.module, build_criterion(cfg.loss).to(CUDA), batches,
                                dataset="charades", device=CUDA)
        assert len(rows) == 12 and result["val_loss"] > 0
    finally:
        dist.destroy_process_group()
