"""Features for a library of videos as a Ray Data job, in the official per-video layout:
`python -m jobs.extract --videos DIR|s3://BUCKET/videos/ --out URI [--features clip]`.

Pipeline: list videos -> decode the frame at each clip centre (PyAV, one CPU task per video) ->
extract every requested feature set in an actor pool (one model copy per actor; float16 on GPU
actors when the cluster has GPUs) -> write OUT/<official dir>/<vid>.npz (`features`: (n_clips,
dim) float32, un-normalised like the released files; `duration`: seconds), e.g.
OUT/clip_features/<vid>.npz. jobs.predict --features OUT reads them, and so does jobs.shard
(with annotations) for training.

Re-runs: a video whose files exist for every requested set is skipped (a file is written under
a temporary name and renamed, or put as one S3 object, so an existing file is complete). What
made the features is stored in OUT/extraction.json; a re-run with other settings is refused
rather than mixing two extractions. A video that cannot be decoded is named in a progress line
and in OUT/failures.json, and skipped. Progress: one line per video with done/total, videos/s
and ETA; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from jobs.pretrain_corpus import CorpusInputError, check_model_ref
from jobs.video_library import (
    DECODE_REMOTE_ARGS,
    Progress,
    ResourceError,
    StorageUnreachableError,
    actor_resources,
    check_s3_endpoint,
    decode_stage,
    ensure_ray,
)
from vl.data.features import OFFICIAL_DIR
from vl.data.shards import filesystem, is_remote, join_uri, read_bytes, write_bytes
from vl.data.video import VIDEO_EXTENSIONS, VideoListingError, VideoSource, list_videos
from vl.extractors import OFFICIAL_MODELS, VIDEO_EXTRACTORS, FeatureRecipe, FeatureSource

EXIT_BAD_INPUT, EXIT_ALL_FAILED = 2, 1
SETTINGS_FILE, FAILURES_FILE = "extraction.json", "failures.json"
FEATURE_DIRS = OFFICIAL_DIR[("qvhighlights", "video")]  # set -> official directory name


class ExtractInputError(ValueError):
    """Bad input found before any work starts; main prints it as one line and exits 2."""


@dataclass(frozen=True)
class ExtractSettings:
    """What determines the files (stored in OUT/extraction.json)."""

    features: tuple[str, ...] = ("clip",)
    models: tuple[str, ...] = (OFFICIAL_MODELS["clip"],)  # one per feature set
    clip_len: float = 2.0
    frame_size: int = 224

    def recipe(self) -> FeatureRecipe:
        video = {n: FeatureSource(VIDEO_EXTRACTORS[n] or "", m)
                 for n, m in zip(self.features, self.models, strict=True)}
        return FeatureRecipe(video=video, clip_len=self.clip_len)

    def fingerprint(self) -> dict[str, Any]:
        return {"features": {n: {"dir": FEATURE_DIRS[n], "model": m}
                             for n, m in zip(self.features, self.models, strict=True)},
                "clip_len": self.clip_len, "frame_size": self.frame_size}


def feature_uri(out: str, name: str, vid: str) -> str:
    return join_uri(out, FEATURE_DIRS[name], f"{vid}.npz")


def write_npz(uri: str, **arrays: np.ndarray) -> None:
    """One complete file or none: a local file is renamed into place, S3 gets one PUT."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    if is_remote(uri):
        write_bytes(uri, buf.getvalue())
        return
    fs, path = filesystem(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def read_npz(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


def finished(out: str, features: tuple[str, ...]) -> set[str]:
    """Videos whose files exist for every set."""
    per_set = []
    for name in features:
        fs, path = filesystem(join_uri(out, FEATURE_DIRS[name]))
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            names = []
        per_set.append({PurePosixPath(n).stem for n in names if n.endswith(".npz")
                        and not PurePosixPath(n).name.startswith(".tmp-")})
    return set.intersection(*per_set) if per_set else set()


def check_settings(out: str, settings: ExtractSettings) -> None:
    """Store the settings on the first run; refuse a re-run that would change them."""
    uri = join_uri(out, SETTINGS_FILE)
    try:
        stored = json.loads(read_bytes(uri))
    except FileNotFoundError:
        write_bytes(uri, json.dumps(settings.fingerprint(), indent=1).encode())
        return
    except (OSError, ValueError) as err:
        raise ExtractInputError(f"cannot read {uri}: {err}") from None
    current = settings.fingerprint()
    diff = [k for k in current if stored.get(k) != current[k]]
    if diff:
        raise ExtractInputError(f"{out} was extracted with other {', '.join(diff)} "
                                f"({uri}); use a new --out or the original settings")


class ExtractStage:
    """Ray Data actor: the extractors of one recipe; extracts and writes a batch of videos."""

    def __init__(self, settings: dict[str, Any], out: str, device: str, threads: int,
                 batch_size: int) -> None:
        from vl.extractors import build_extractors

        cfg = ExtractSettings(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in settings.items()})
        self.out = out
        self.extractors = build_extractors(cfg.recipe(), device=device, threads=threads,
                                           batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for i, vid in enumerate(batch["vid"]):
            s = {"vid": str(vid), "uri": str(batch["uri"][i]), "error": str(batch["error"][i]),
                 "decode_s": float(batch["decode_s"][i]), "clips": 0, "duration": 0.0,
                 "model_s": 0.0}
            if not s["error"]:
                try:
                    self._one(pickle.loads(batch["payload"][i]), s)
                except Exception as err:  # noqa: BLE001 - one bad video never stops the job
                    s["error"] = f"{s['uri']}: extraction failed: {type(err).__name__}: {err}"
            summaries.append(json.dumps(s))
        return {"summary": np.array(summaries, dtype=object)}

    def _one(self, video: Any, s: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        for extractor in self.extractors.video:
            features = np.asarray(extractor(video.frames), np.float32)  # (n_clips, dim)
            write_npz(feature_uri(self.out, extractor.name, s["vid"]), features=features,
                      duration=np.float64(video.duration))
        s.update(clips=int(video.n_clips), duration=float(video.duration),
                 model_s=round(time.perf_counter() - t0, 4))


@dataclass
class JobOptions:
    """How to run (does not change the files)."""

    videos: str
    out: str
    device: str = "auto"
    workers: int = 0
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    decode_cpus: float = 1.0
    videos_per_batch: int = 4
    clip_batch: int = 128
    limit: int = 0


def build_dataset(todo: list[VideoSource], settings: ExtractSettings, opts: JobOptions):
    import ray.data
    from ray.data import ActorPoolStrategy

    try:
        device, workers, resources = actor_resources(opts.device, opts.workers,
                                                     opts.gpus_per_worker, opts.cpus_per_worker)
    except ResourceError as err:
        raise ExtractInputError(str(err)) from None
    ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.map(decode_stage, fn_kwargs={"clip_len": settings.clip_len,
                                         "frame_size": settings.frame_size},
                num_cpus=opts.decode_cpus, **DECODE_REMOTE_ARGS)
    ds = ds.map_batches(
        ExtractStage,
        fn_constructor_kwargs={"settings": asdict(settings), "out": opts.out, "device": device,
                               "threads": max(1, int(resources.get("num_cpus", 1))),
                               "batch_size": opts.clip_batch},
        batch_size=opts.videos_per_batch, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=workers), **resources)
    return ds, device, workers


def run(settings: ExtractSettings, opts: JobOptions, log=print) -> dict[str, Any]:
    """Extract what is missing under opts.out; returns the JSON summary."""
    t0 = time.monotonic()
    unknown = [n for n in settings.features if not VIDEO_EXTRACTORS.get(n)]
    if unknown:
        raise ExtractInputError(f"--features {','.join(unknown)}: no extractor here (this job "
                                "extracts clip; README 'Your own videos' says how to plug in "
                                "SlowFast)")
    for m in settings.models:
        try:
            check_model_ref(m, "--clip-model")
        except CorpusInputError as err:
            raise ExtractInputError(str(err)) from None
    try:
        check_s3_endpoint(opts.videos)
        check_s3_endpoint(opts.out)
        listed = list_videos(opts.videos)
    except (VideoListingError, StorageUnreachableError) as err:
        raise ExtractInputError(str(err)) from None
    if not listed:
        raise ExtractInputError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under "
                                f"{opts.videos}")
    check_settings(opts.out, settings)
    done = finished(opts.out, settings.features)
    todo = [v for v in listed if v.vid not in done][: opts.limit or None]
    summaries: list[dict[str, Any]] = []
    device, workers = "-", 0
    if todo:
        ensure_ray()
        ds, device, workers = build_dataset(todo, settings, opts)
        log(f"{len(listed)} videos under {opts.videos}: {len(done)} already done, extracting "
            f"{len(todo)} with {workers} {device} worker(s)")
        progress = Progress(len(todo))
        for row in ds.iter_rows():
            s = json.loads(row["summary"])
            summaries.append(s)
            what = (f"{s['vid']}: FAILED, skipped: {s['error']}" if s["error"] else
                    f"{s['vid']}: {s['clips']} clips, {s['duration']:.1f} s; decode "
                    f"{s['decode_s']:.2f} s, models {s['model_s']:.2f} s")
            log(progress.step(what))
    else:
        log(f"{len(listed)} videos under {opts.videos}: all already done")
    failures = [{"vid": s["vid"], "uri": s["uri"], "error": s["error"]}
                for s in summaries if s["error"]]
    write_bytes(join_uri(opts.out, FAILURES_FILE), json.dumps(failures, indent=1).encode())
    ok = [s for s in summaries if not s["error"]]
    seconds = time.monotonic() - t0
    summary = {
        "out": opts.out, "videos_listed": len(listed), "videos_already_done": len(done),
        "videos_processed": len(ok), "videos_failed": len(failures),
        "failed": [f["vid"] for f in failures], "clips": sum(s["clips"] for s in ok),
        "device": device, "workers": workers, "seconds": round(seconds, 2),
        "videos_per_s": round(len(summaries) / seconds, 4) if summaries else 0.0,
        "clips_per_s": round(sum(s["clips"] for s in ok) / seconds, 2) if ok else 0.0,
        "decode_s_per_clip": round(sum(s["decode_s"] for s in ok)
                                   / max(1, sum(s["clips"] for s in ok)), 5),
    }
    log(json.dumps(summary))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="local dir or s3://bucket/prefix of videos")
    p.add_argument("--out", required=True, help="local dir or s3:// prefix; files go to "
                   "OUT/clip_features/<vid>.npz (the official layout)")
    p.add_argument("--features", default="clip", help="video feature sets, comma-separated "
                   "(available: clip)")
    p.add_argument("--clip-model", default=OFFICIAL_MODELS["clip"],
                   help="CLIP model: local dir or hub id (default: the official features' "
                        "ViT-B/32)")
    p.add_argument("--clip-len", type=float, default=2.0, help="seconds per clip (2)")
    p.add_argument("--frame-size", type=int, default=224, help="decode frames down to this "
                   "shorter side (224)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=0, help="model actors (default: one per "
                   "GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs (torch threads) per model actor on CPU")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task")
    p.add_argument("--videos-per-batch", type=int, default=4)
    p.add_argument("--clip-batch", type=int, default=128, help="frames per model call")
    p.add_argument("--limit", type=int, default=0, help="extract at most N pending videos")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    features = tuple(f.strip() for f in args.features.split(",") if f.strip())
    settings = ExtractSettings(features=features, models=(args.clip_model,) * len(features),
                               clip_len=args.clip_len, frame_size=args.frame_size)
    opts = JobOptions(videos=args.videos, out=args.out.rstrip("/"), device=args.device,
                      workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                      cpus_per_worker=args.cpus_per_worker, decode_cpus=args.decode_cpus,
                      videos_per_batch=args.videos_per_batch, clip_batch=args.clip_batch,
                      limit=args.limit)
    try:
        if not features or args.clip_len <= 0 or args.frame_size < 1:
            raise ExtractInputError("--features must name a set; --clip-len and --frame-size "
                                    "must be > 0")
        summary = run(settings, opts, log=lambda m: print(m, flush=True))
    except ExtractInputError as err:
        print(f"jobs.extract: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary["videos_failed"] and not summary["videos_processed"] + summary[
            "videos_already_done"]:
        print("jobs.extract: error: every video failed", file=sys.stderr)
        return EXIT_ALL_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
