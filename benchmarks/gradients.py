"""Which loss terms set the direction of a step? Per-term gradients on planted-signal data.

    python -m benchmarks.gradients                                 # paper recipe, seed 0
    python -m benchmarks.gradients --variant xavier_attention_init --at 0,50,100

Trains one (variant, seed) of `benchmarks.learning` (same data, recipe and variants) and, at
each step listed in --at, takes one fixed training batch and computes the gradient of every
weighted summand of the loss (`SetCriterion.weighted`) separately. Per term it reports:

- `norm`: the L2 norm of its gradient over all parameters;
- `share`: its part of the step direction, g_i . g / |g|^2 (the shares of all terms sum to 1;
  with grad-clip 0.1 always active at the paper recipe only the direction of g counts, so a
  term with a large share steers training and one near 0 is along for the ride);
- `top_groups`: the modules that take most of its gradient norm.

It also reports how the saliency head ranks clips on that batch: `within_video_std` (the spread
of the scores inside one video, mean over the batch: near 0 means the head scores every clip
alike and HD cannot be learned from it) and `label_corr` (the Pearson correlation of scores and
saliency labels inside a video, mean over the batch).

Prints one JSON line, then a Markdown table per probed step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.learning import VARIANTS, Setup, epoch_batches, load_split, start_run
from vl.data.batch import Batch
from vl.engine import forward, train_step


@dataclass
class Probe:
    """Where and what to probe: one run of `benchmarks.learning` stopped at several steps."""

    variant: str = "full"
    seed: int = 0
    at: tuple[int, ...] = (0, 50, 100)
    probe_seed: int = 1234  # dropout / pair sampling of the probe's forward pass


def group_of(name: str) -> str:
    """The top-level module a parameter belongs to (video_proj, bicmf, encoder, ...)."""
    return name.split(".", 1)[0]


def term_gradients(
    model: torch.nn.Module, criterion: torch.nn.Module, batch: Batch, epoch: int, probe_seed: int
) -> dict[str, Any]:
    """Per-term gradient norms, step-direction shares and top modules on one batch."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    torch.manual_seed(probe_seed)
    out = forward(model, batch)
    losses = criterion(out, batch, epoch)
    terms = criterion.weighted(losses, float(losses["hard_weight"]))
    grads: dict[str, list[torch.Tensor]] = {}
    for name, value in terms.items():
        if not value.requires_grad:
            continue
        g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads[name] = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
    total = [sum(gs[i] for gs in grads.values()) for i in range(len(params))]
    total_sq = float(sum((t * t).sum() for t in total))
    rows = {}
    for name, gs in grads.items():
        norm = math.sqrt(float(sum((g * g).sum() for g in gs)))
        dot = float(sum((g * t).sum() for g, t in zip(gs, total)))
        by_group: dict[str, float] = {}
        for (pname, _), g in zip(named, gs):
            by_group[group_of(pname)] = by_group.get(group_of(pname), 0.0) + float((g * g).sum())
        top = sorted(by_group.items(), key=lambda kv: -kv[1])[:3]
        rows[name] = {"value": round(float(terms[name].detach()), 4), "norm": round(norm, 3),
                      "share": round(dot / total_sq, 3) if total_sq else 0.0,
                      "top_groups": {k: round(math.sqrt(v), 3) for k, v in top}}
    return {"total_norm": round(math.sqrt(total_sq), 3), "terms": rows,
            **saliency_spread(out.saliency.detach(), batch)}


def saliency_spread(s: torch.Tensor, batch: Batch) -> dict[str, float]:
    """How differently the head scores the clips of one video, and how that follows the labels."""
    mask = batch.video_mask.bool()  # (B, Lv)
    labels = batch.saliency_labels.float()  # (B, Lv)
    stds, corrs = [], []
    for b in range(s.shape[0]):
        x, y = s[b][mask[b]], labels[b][mask[b]]
        stds.append(float(x.std()))
        xc, yc = x - x.mean(), y - y.mean()
        den = float(xc.norm() * yc.norm())
        if den > 0:
            corrs.append(float((xc * yc).sum()) / den)
    return {"within_video_std": round(sum(stds) / len(stds), 4),
            "label_corr": round(sum(corrs) / max(len(corrs), 1), 4),
            "mean_score": round(float(s[mask].mean()), 4)}


def run(probe: Probe, setup: Setup) -> dict[str, Any]:
    """Train the run up to the last probed step, probing at each listed step."""
    torch.set_num_threads(1)
    cfg, root, model, criterion, optimizer, scheduler = start_run(probe.variant, probe.seed, setup)
    train = load_split(root, "train")
    fixed = epoch_batches(train, cfg, 0, cfg.data.batch_size, shuffle=True)[0]
    probes, step, epoch = [], 0, 0
    while True:
        for batch in epoch_batches(train, cfg, epoch, cfg.data.batch_size, shuffle=True):
            if step in probe.at:
                model.train()
                probes.append({"step": step, "epoch": epoch,
                               **term_gradients(model, criterion, fixed, epoch, probe.probe_seed)})
                print(f"probed step {step}: |g| {probes[-1]['total_norm']}, within-video "
                      f"std {probes[-1]['within_video_std']}", file=sys.stderr, flush=True)
            if step >= max(probe.at):
                return {"variant": probe.variant, "seed": probe.seed, "probes": probes}
            train_step(model, criterion, batch, optimizer, epoch, grad_clip=cfg.train.grad_clip)
            step += 1
        scheduler.step()
        epoch += 1


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for p in result["probes"]:
        parts.append(f"step {p['step']}: |g| {p['total_norm']}, within-video saliency std "
                     f"{p['within_video_std']}, label corr {p['label_corr']}")
        parts.append("| term | value | norm | share | top modules (norm) |")
        parts.append("|---|---:|---:|---:|---|")
        for name, r in sorted(p["terms"].items(), key=lambda kv: -abs(kv[1]["share"])):
            top = ", ".join(f"{k} {v}" for k, v in r["top_groups"].items())
            parts.append(f"| {name} | {r['value']} | {r['norm']} | {r['share']} | {top} |")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default=Probe.variant, help=f"from: {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=Probe.seed, help="data + training seed")
    p.add_argument("--at", default=",".join(map(str, Probe.at)),
                   help="comma-separated training steps to probe at (0 = at init)")
    p.add_argument("--recipe", choices=("small", "paper"), default="paper",
                   help="as benchmarks.learning (paper: configs/qvhighlights.yaml at d=256)")
    p.add_argument("--videos", type=int, default=Setup.videos)
    p.add_argument("--batch-size", type=int, default=Setup.batch_size)
    p.add_argument("--data-root", help="where the per-seed data sets are kept (default: temp)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.attention_init=xavier")
    args = p.parse_args(argv)
    if args.variant not in VARIANTS:
        p.error(f"unknown variant {args.variant!r}; choose from {list(VARIANTS)}")
    try:
        at = tuple(sorted({int(x) for x in args.at.split(",") if x}))
    except ValueError:
        p.error(f"--at wants comma-separated step numbers, got {args.at!r}")
    if not at or at[0] < 0:
        p.error("--at needs at least one step >= 0")
    with tempfile.TemporaryDirectory(prefix="vl-gradients-") as tmp:
        setup = Setup(videos=args.videos, batch_size=args.batch_size, recipe=args.recipe,
                      data_root=args.data_root or tmp, extra=tuple(args.set), epochs=10**6)
        result = run(Probe(args.variant, args.seed, at), setup)
    print(json.dumps({"setup": {"recipe": args.recipe, "videos": args.videos,
                                "batch_size": args.batch_size, "set": args.set}, **result}))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
