"""Feature extraction cost: `python -m benchmarks.extract` prints one JSON line.

- decode: the clip-centre frames of 30-fps pattern videos (tests/videos.py; 2-s clips) read by
  seeking (vl.data.video.ClipFrameReader, the default) vs decoding every frame, per codec:
  ms per clip each way and the ratio (sequential / seek);
- extract_job: `jobs.extract` on a folder of videos with a tiny random CLIP on the CPU (an
  in-process 2-CPU Ray): videos/s, clips/s, decode seconds per clip (from its summary);
- predict_video: `python -m jobs.predict --video` (a subprocess) on a 10-minute and a 150-s
  video with a randomly initialised CLIP-only model saved as a local pyfunc model: wall time and
  peak RSS (memory must not grow with the video's length beyond its features).
Nothing is downloaded (the CLIP is built from a CLIPConfig).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.tiny_models import CLIP_PROJ, CLIP_TEXT_HIDDEN, build_tiny_clip
from tests.videos import write_pattern_video
from vl.config import ExperimentConfig
from vl.data.video import ClipFrameReader

REPO = Path(__file__).resolve().parents[1]


def decode_costs(root: Path, seconds: float, size: int) -> dict[str, dict[str, float]]:
    """ms per clip seeking vs sequential, per codec (libx264 with a keyframe every 2 s, as web
    video typically has; libx264's default 250-frame GOP; mpeg4's default 12-frame GOP)."""
    out = {}
    for codec, gop in (("libx264", 60), ("libx264", None), ("mpeg4", None)):
        path = root / f"{codec}-{gop}.mp4"
        write_pattern_video(path, seconds, fps=30, size=size, segment_s=3.0, codec=codec,
                            gop=gop)
        ms = {}
        for method in ("seek", "sequential"):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                with ClipFrameReader(path, 2.0, method=method) as reader:
                    n = sum(1 for _ in reader.frames())
                    decoded = reader.frames_decoded
                best = min(best, time.perf_counter() - t0)
            ms[method] = (1000 * best / n, decoded)
        out[f"{codec}_gop{gop or 'default'}"] = {
            "seek_ms_per_clip": round(ms["seek"][0], 3),
            "sequential_ms_per_clip": round(ms["sequential"][0], 3),
            "ratio_sequential_over_seek": round(ms["sequential"][0] / ms["seek"][0], 2),
            "frames_decoded_seek": ms["seek"][1], "frames_decoded_sequential": ms["sequential"][1],
        }
    return out


def extract_job(root: Path, clip: Path, videos: int, seconds: float, size: int) -> dict:
    import ray

    from jobs.extract import ExtractSettings, JobOptions, run

    folder = root / "library"
    folder.mkdir()
    for i in range(videos):
        write_pattern_video(folder / f"v{i}.mp4", seconds, fps=30, size=size, segment_s=3.0,
                            codec="libx264", gop=60, seed=i)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="vlbx", dir="/tmp"))
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        summary = run(ExtractSettings(models=(str(clip),)),
                      JobOptions(videos=str(folder), out=str(root / "features"), device="cpu",
                                 videos_per_batch=2), log=lambda _: None)
    finally:
        ray.shutdown()
    keys = ("videos_processed", "clips", "seconds", "videos_per_s", "clips_per_s",
            "decode_s_per_clip")
    return {k: summary[k] for k in keys}


def save_model(root: Path, clip: Path) -> Path:
    """A random CLIP-only smoke model at the tiny CLIP's widths as a local pyfunc model."""
    import mlflow.pyfunc

    from vl import serving
    from vl.checkpoint import CHECKPOINT_ARTIFACT
    from vl.extractors import recipe_from_config
    from vl.model import build_model

    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml", [
        "data.video_features=[clip]", "data.text_features=[clip]",
        f"model.video_dim={CLIP_PROJ}", f"model.text_dim={CLIP_TEXT_HIDDEN}"])
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, ckpt)
    recipe = recipe_from_config(cfg.to_dict(), models={"clip": str(clip)})
    path = root / "pyfunc"
    mlflow.pyfunc.save_model(path=str(path), python_model=str(serving.MODEL_CODE),
                             artifacts={CHECKPOINT_ARTIFACT: str(ckpt)},
                             metadata={serving.FEATURES_METADATA: recipe.to_dict()})
    return path


def predict_video(root: Path, model: Path, seconds: float, size: int) -> dict[str, float]:
    video = root / f"long-{int(seconds)}.mp4"
    write_pattern_video(video, seconds, fps=30, size=size, segment_s=7.0, codec="libx264",
                        gop=60)
    cmd = [sys.executable, "-c", "import resource, sys, runpy; sys.argv = sys.argv[1:]; "
           "code = 0\ntry:\n runpy.run_module('jobs.predict', run_name='__main__')\n"
           "except SystemExit as e:\n code = e.code\n"
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
           "sys.exit(code)",
           "jobs.predict", "--model", str(model), "--video", str(video), "--device", "cpu",
           "--query", "a dog on the floor", "--query", "a man in the kitchen",
           "--out", str(root / "rows.jsonl")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    rss = next(int(x.split()[1]) for x in done.stdout.splitlines()
               if x.startswith("PEAK_RSS_KB"))
    rows = [json.loads(x) for x in (root / "rows.jsonl").read_text().splitlines()]
    last = max(st for r in rows for st, _, _ in r["pred_relevant_windows"])
    return {"video_s": seconds, "wall_s": round(wall, 2), "peak_rss_mb": round(rss / 1024, 1),
            "clips": len(rows[0]["pred_saliency_scores"]), "latest_moment_start_s": last}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=8, help="videos for the extract job (8)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each (60 s)")
    p.add_argument("--size", type=int, default=360, help="frame height = width, px (360)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="vl-bench-extract-"))
    try:
        clip = build_tiny_clip(root / "clip")
        result = {"decode": decode_costs(root, args.seconds, args.size),
                  "extract_job": extract_job(root, clip, args.videos, args.seconds, args.size)}
        model = save_model(root, clip)
        result["predict_video"] = [predict_video(root, model, s, args.size) for s in (600, 150)]
        result["peak_rss_ratio_600s_over_150s"] = round(
            result["predict_video"][0]["peak_rss_mb"] / result["predict_video"][1]["peak_rss_mb"],
            3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["cpu_threads"] = torch.get_num_threads()
    result["max_rss_driver_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1)
    print(json.dumps(result))
    return 0 if np.isfinite(result["peak_rss_ratio_600s_over_150s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
