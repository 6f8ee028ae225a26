"""Time one VideoLights training step (forward + criterion + backward + clip + AdamW).

    python -m benchmarks.train_step --preset paper --batch-size 32 --clips 75 \
        --query-tokens 32 --steps 10 --warmup 2 --threads 2

Prints one JSON line. The batch is synthetic with the reference benchmark's statistics
(VIDEOLIGHTS_SPEC section 7), so the figures compare with the reference's 2.45 s (2 threads) /
3.4-3.8 s (1 thread) and ~2.7 GB peak RSS. `--device cuda` times the same step on a GPU
(synchronised around each phase; peak GPU memory reported as `peak_gpu_mb`).

`--compile` times the same step with the model under `torch.compile` (static shapes: the batch is
padded to the preset's max_v_l / max_q_l, as `data.static_shapes` does in training). The first
step's extra time is the compile time (`compile_s`); `payback_steps` is how many steps the
compiled step needs to win it back against `--eager-step-s` (the same command without
`--compile`, run first), or null when the compiled step is not faster.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from vl.config import FEATURE_DIMS, TEXT_FEATURE_DIMS, ExperimentConfig
from vl.engine import build_optimizer, forward
from vl.losses import build_criterion
from vl.model import build_model
from vl.testing import random_batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", help="config preset (paper, reference_script)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clips", type=int, default=75)
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model "
                    "(implies --static-shapes)")
    ap.add_argument("--static-shapes", action="store_true",
                    help="pad the batch to data.max_v_l / data.max_q_l")
    ap.add_argument("--eager-step-s", type=float, default=None,
                    help="the eager median step time, for payback_steps under --compile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. model.negative_pass=false")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(2018)

    cfg = ExperimentConfig.from_preset(args.preset, args.set)
    device = torch.device(args.device)
    model = build_model(cfg.model).to(device)
    criterion = build_criterion(cfg.loss).to(device)
    optimizer, _ = build_optimizer(model, cfg.train)
    batch = random_batch(
        args.batch_size, args.clips, args.query_tokens,
        [FEATURE_DIMS[n] for n in cfg.data.video_features],
        [TEXT_FEATURE_DIMS[n] for n in cfg.data.text_features],
    ).to(device)
    if args.compile or args.static_shapes:
        batch = batch.padded_to(cfg.data.max_v_l, cfg.data.max_q_l)
    step_model = (torch.compile(model, dynamic=False, backend=cfg.train.compile_backend)
                  if args.compile else model)
    model.train()

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    fwd, crit, bwd, opt, total, cpu, first = [], [], [], [], [], [], []
    for i in range(args.warmup + args.steps):
        c0 = time.process_time()
        t0 = now()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = forward(step_model, batch)
        t1 = now()
        losses = criterion(out, batch, epoch=0)
        t2 = now()
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        t3 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        t4 = now()
        if i == 0:
            first.append(t4 - t0)
        if i >= args.warmup:
            fwd.append(t1 - t0)
            crit.append(t2 - t1)
            bwd.append(t3 - t2)
            opt.append(t4 - t3)
            total.append(t4 - t0)
            cpu.append(time.process_time() - c0)
    med = statistics.median
    compiled = {}
    if args.compile:
        compile_s = first[0] - med(total)
        gain = (args.eager_step_s - med(total)) if args.eager_step_s else None
        compiled = {"compile_s": round(compile_s, 1),
                    "payback_steps": (round(compile_s / gain) if gain and gain > 0 else None)}
    print(json.dumps({
        "preset": args.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size, "clips": args.clips, "query_tokens": args.query_tokens,
        "threads": args.threads, "bf16": args.bf16, "overrides": args.set,
        "compile": args.compile, "static_shapes": args.compile or args.static_shapes,
        **compiled,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "median_step_s": round(med(total), 4),
        "forward_s": round(med(fwd), 4),
        "criterion_s": round(med(crit), 4),
        "backward_s": round(med(bwd), 4),
        "clip_adamw_s": round(med(opt), 4),
        "cpu_step_s": round(med(cpu), 4),  # process CPU time: robust to a busy machine
        "samples_per_s": round(args.batch_size / med(total), 2),
        "last_loss": round(float(losses["loss"].detach()), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
           if device.type == "cuda" else {}),
    }))


if __name__ == "__main__":
    main()
