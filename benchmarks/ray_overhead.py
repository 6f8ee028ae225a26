"""Ray Train's per-epoch overhead: one Ray Train worker vs `vl.engine` in a plain process.

Both sides train the same model on the same shards with the same thread count; start-up (Ray
init, worker group, process group, first-epoch warm-up) is excluded: each side runs a warm-up
epoch, then the epochs that are timed. The Ray side times, inside the worker, what jobs.train
does per epoch: the DDP-prepared model's epoch plus the `ray.train.report` barrier. Prints one
JSON line; the target is an overhead of at most +10%.

`--preset smoke` (the default) trains configs/smoke.yaml on 32-dim features; `--preset paper`
(or any preset of vl.config) trains that preset on synthetic features of its real feature-set
widths. Both sides collate half batches (`make_loader(half_batches=True)`) and report the
thread settings they ran with (torch intra-op threads, OMP_NUM_THREADS as the process saw it),
since a Ray worker's environment differs from a shell's (Ray sets OMP_NUM_THREADS from the
worker's CPUs).

    python -m benchmarks.ray_overhead [--preset paper] [--videos 120] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.shard import run as shard_run
from vl.config import ExperimentConfig
from vl.data.dataset import make_loader
from vl.data.synthetic import SyntheticConfig, generate
from vl.engine import build_optimizer, train_one_epoch
from vl.losses import build_criterion
from vl.model import build_model


def make_shards(root: Path, videos: int, preset: str = "smoke") -> tuple[str, ExperimentConfig]:
    """Synthetic QVHighlights-shaped shards in a local directory and the config to train on
    them: smoke dims for "smoke", else the preset's feature sets at their real widths."""
    if preset == "smoke":
        cfg = ExperimentConfig.from_yaml(
            Path(__file__).resolve().parents[1] / "configs/smoke.yaml",
            ["model.video_dim=32", "model.text_dim=16"])
        dims = {"slowfast": 16, "clip": 16}
    else:
        cfg = ExperimentConfig.from_preset(preset)
        dims = {}
    layout = generate(SyntheticConfig("qvhighlights", videos=videos, seed=0, dims=dims,
                                      video_sets=tuple(cfg.data.video_features),
                                      text_sets=tuple(cfg.data.text_features),
                                      val_fraction=0.0), root / "raw")
    out = str(root / "train")
    manifest = shard_run(dataset="qvhighlights", annotations=str(layout.train_jsonl),
                         video_features=layout.video_arg(), text_features=layout.text_arg(),
                         out=out, rows_per_shard=64, ray_mode="off", log=lambda *_: None)
    widths = manifest.input_widths(cfg.data.video_features, cfg.data.text_features)
    assert widths == (cfg.model.video_dim, cfg.model.text_dim), widths
    return out, cfg


def timed_epochs(cfg_dict: dict[str, Any], uri: str, epochs: int, threads: int,
                 report: Any = None) -> dict[str, Any]:
    """Warm-up epoch + `epochs` timed epochs; `report(metrics)` is called after each (Ray).
    Returns the timed epochs' seconds and the thread settings they ran under."""
    cfg = ExperimentConfig.from_dict(cfg_dict)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if report is not None:
        model = ray.train.torch.prepare_model(model)
    criterion = build_criterion(cfg.loss)
    optimizer, _ = build_optimizer(model, cfg.train)
    loader = make_loader(uri, cfg.data.batch_size, shuffle=True, seed=0,
                         max_v_l=cfg.data.max_v_l, max_q_l=cfg.data.max_q_l,
                         video_features=cfg.data.video_features,
                         text_features=cfg.data.text_features,
                         half_batches=True)
    times = []
    for epoch in range(epochs + 1):
        loader.dataset.set_epoch(epoch)
        start = time.perf_counter()
        stats = train_one_epoch(model, criterion, loader, optimizer, epoch,
                                grad_clip=cfg.train.grad_clip)
        if report is not None:
            report({"epoch": epoch, "loss": stats["loss"]})
        if epoch > 0:  # epoch 0 warms up allocators, caches and the shard reader
            times.append(time.perf_counter() - start)
    return {"epochs_s": times, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


def ray_loop(config: dict[str, Any]) -> None:
    times = timed_epochs(config["cfg"], config["uri"], config["epochs"], config["threads"],
                         report=ray.train.report)
    Path(config["out"]).write_text(json.dumps(times))


def run_ray(cfg: ExperimentConfig, uri: str, epochs: int, threads: int, out: Path
            ) -> dict[str, Any]:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000,
             log_to_driver=False)
    try:
        trainer = TorchTrainer(
            ray_loop,
            train_loop_config={"cfg": cfg.to_dict(), "uri": uri, "epochs": epochs,
                               "threads": threads, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="ray_overhead", storage_path=str(out.parent / "ray")),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=120, help="synthetic videos (2 queries each)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--preset", default="smoke",
                        help="smoke (configs/smoke.yaml, 32-dim features) or a vl.config preset")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vl-ray-overhead-") as tmp:
        root = Path(tmp)
        uri, cfg = make_shards(root, args.videos, args.preset)
        plain_run = timed_epochs(cfg.to_dict(), uri, args.epochs, args.threads)
        ray_run = run_ray(cfg, uri, args.epochs, args.threads, root / "ray_times.json")
    plain, ray_times = plain_run.pop("epochs_s"), ray_run.pop("epochs_s")
    plain_s, ray_s = statistics.median(plain), statistics.median(ray_times)
    print(json.dumps({
        "benchmark": "ray_overhead",
        "preset": args.preset,
        "batch_size": cfg.data.batch_size,
        "samples_per_epoch": args.videos * 2,
        "epochs_timed": args.epochs,
        "threads": args.threads,
        "plain_epoch_s": round(plain_s, 3),
        "ray_1_worker_epoch_s": round(ray_s, 3),
        "overhead_pct": round(100 * (ray_s / plain_s - 1), 1),
        "plain_epochs_s": [round(t, 3) for t in plain],
        "ray_epochs_s": [round(t, 3) for t in ray_times],
        "plain_samples_per_s": round(args.videos * 2 / plain_s, 2),
        "ray_samples_per_s": round(args.videos * 2 / ray_s, 2),
        "plain_threads": plain_run,
        "ray_threads": ray_run,
        "target_pct": 10,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
