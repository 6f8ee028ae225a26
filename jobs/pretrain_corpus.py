"""Build the synthetic pretraining corpus (paper Algorithm 1) from a folder of videos as a Ray Data
job: `python -m jobs.pretrain_corpus --videos s3://bucket/videos/ --out s3://bucket/pretrain/NAME
--interval 10 --captioner PATH_OR_HUB_ID --clip PATH_OR_HUB_ID`.

Pipeline: list videos -> decode one frame per clip with PyAV (CPU tasks) -> caption one frame per
~10-s moment with a BLIP captioning model and embed every clip frame and every caption with CLIP
(an actor pool: one model copy per actor, on a GPU when the cluster has GPUs) -> write feature
shards (jobs.shard's format, readable by jobs.train) under OUT/train and OUT/val.

Failure and re-run semantics: a video that fails to decode (or to annotate) is reported and
skipped; the job carries on. Every written shard has a completion record naming its videos
(OUT/SPLIT/_parts/*.json), so a re-run skips finished videos, retries failed ones, and rewrites
the manifests over everything finished. The settings that determine the rows are stored in
OUT/corpus.json; a re-run with different settings is refused rather than mixing two corpora.
Progress is printed per video; the last line is a JSON summary. With MLFLOW_TRACKING_URI set the
run is tracked in MLflow (row counts, caption examples, failures, per-frame model cost).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from jobs.video_library import (
    DECODE_REMOTE_ARGS,
    Progress,
    ResourceError,
    actor_resources,
    decode_stage,
    ensure_ray,
)
from vl.data.corpus import CorpusSettings, VideoInput, VideoResult
from vl.data.shards import (
    DEFAULT_ROW_GROUP_ROWS,
    PARTS_DIR,
    FeatureSpec,
    ShardInfo,
    ShardManifest,
    filesystem,
    is_remote,
    join_uri,
    read_bytes,
    write_bytes,
    write_manifest,
    write_shard,
)
from vl.data.video import VIDEO_EXTENSIONS, VideoListingError, VideoSource
from vl.data.video import list_videos as _list_videos

DATASET = "pretrain"
SPLITS = ("train", "val")
SETTINGS_FILE = "corpus.json"
DEFAULT_EXPERIMENT = "videolights-pretrain-corpus"
EXIT_BAD_INPUT = 2
EXIT_NO_ROWS = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CorpusInputError(ValueError):
    """Bad input found before any work starts (no videos, a settings clash, a bad model path)."""


# ---- listing and planning ----------------------------------------------------------------------


def list_videos(videos: str) -> list[VideoSource]:
    """Every video under `videos` (vl.data.video.list_videos), listing errors as bad input."""
    try:
        return _list_videos(videos)
    except VideoListingError as err:
        raise CorpusInputError(str(err)) from None


def _unit_hash(vid: str) -> float:
    return int(hashlib.sha256(vid.encode()).hexdigest()[:12], 16) / float(1 << 48)


def assign_splits(
    todo: list[VideoSource], done: dict[str, str], val_fraction: float
) -> list[VideoSource]:
    """train/val per video from a hash of its id, so the split of a video never changes between
    runs. A corpus of two or more videos always gets one validation video (jobs.train needs a
    val set): if the hash gives none, the pending video with the smallest hash goes to val."""
    out = [
        VideoSource(v.vid, v.uri, "val" if _unit_hash(v.vid) < val_fraction else "train")
        for v in todo
    ]
    has_val = "val" in done.values() or any(v.split == "val" for v in out)
    if val_fraction > 0 and not has_val and out and len(out) + len(done) >= 2:
        k = min(range(len(out)), key=lambda i: _unit_hash(out[i].vid))
        out[k] = VideoSource(out[k].vid, out[k].uri, "val")
    return out


def check_model_ref(ref: str, flag: str) -> str:
    """A local model directory, or something that looks like a hub id (downloaded by each
    worker on first use; pre-download to a shared path for large clusters)."""
    if os.path.isdir(ref) or is_remote(ref):
        return ref
    if os.path.exists(ref):
        raise CorpusInputError(f"{flag} {ref}: is a file; give the model's directory")
    if ref.startswith(("/", ".", "~")) or not _HUB_ID.match(ref):
        raise CorpusInputError(f"{flag} {ref}: no such directory and not a hub id (org/name)")
    return ref


# ---- records on storage ------------------------------------------------------------------------


def split_uri(out: str, split: str) -> str:
    return join_uri(out, split)


def read_part_records(out: str) -> list[dict[str, Any]]:
    """Completion records of every shard written by any run, both splits."""
    records = []
    for split in SPLITS:
        parts = join_uri(split_uri(out, split), PARTS_DIR)
        fs, path = filesystem(parts)
        try:
            names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            continue
        for name in names:
            rec = json.loads(read_bytes(join_uri(parts, PurePosixPath(name).name)))
            rec["split"] = split
            records.append(rec)
    return records


def finished_videos(records: list[dict[str, Any]]) -> dict[str, str]:
    """vid -> split for every video some shard record lists."""
    return {vid: rec["split"] for rec in records for vid in rec["vids"]}


def check_settings(out: str, settings: CorpusSettings) -> None:
    """Store the corpus settings on the first run; refuse a re-run that would change them."""
    uri = join_uri(out, SETTINGS_FILE)
    try:
        stored = json.loads(read_bytes(uri))
    except FileNotFoundError:
        stored = None
    current = settings.fingerprint()
    if stored is None:
        write_bytes(uri, json.dumps({"dataset": DATASET, "settings": current}, indent=1).encode())
        return
    old = stored.get("settings", {})
    diff = {k: (old.get(k), v) for k, v in current.items() if old.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CorpusInputError(
            f"{out} was built with other settings ({listing}); use a new --out, or the "
            f"original settings to extend it"
        )


# ---- pipeline stages (run in Ray workers) ------------------------------------------------------


class AnnotateStage:
    """Ray Data actor: holds the captioner and CLIP, annotates a batch of decoded videos."""

    def __init__(self, settings: dict[str, Any], device: str, caption_batch: int,
                 clip_batch: int, threads: int) -> None:
        from vl.data.corpus import CorpusAnnotator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.annotator = CorpusAnnotator(
                CorpusSettings(**settings), device=device, caption_batch=caption_batch,
                clip_batch=clip_batch, threads=threads,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["vid"])
        results: list[VideoResult | None] = [None] * n
        ok = [i for i in range(n) if not batch["error"][i]]
        for i in range(n):
            if batch["error"][i]:
                results[i] = VideoResult(str(batch["vid"][i]), str(batch["split"][i]),
                                         error=str(batch["error"][i]))
        videos = []
        for i in ok:
            decoded = pickle.loads(batch["payload"][i])  # a vl.data.video.DecodedVideo
            videos.append(VideoInput(str(batch["vid"][i]), decoded.duration, decoded.frames,
                                     str(batch["split"][i])))
        try:
            done = self.annotator.annotate(videos) if videos else []
        except Exception:  # noqa: BLE001 - isolate the video that breaks the batch
            done = [self._one(v) for v in videos]
        for i, res in zip(ok, done, strict=True):
            results[i] = res
        return {
            "vid": np.array([str(v) for v in batch["vid"]], dtype=object),
            "decode_s": np.asarray(batch["decode_s"], dtype=np.float64),
            "payload": np.array([pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
                                 for r in results], dtype=object),
        }

    def _one(self, video: VideoInput) -> VideoResult:
        try:
            return self.annotator.annotate([video])[0]
        except Exception as err:  # noqa: BLE001
            return VideoResult(video.vid, video.split,
                               error=f"{video.vid}: annotation failed: {type(err).__name__}: {err}")


def shard_digest(settings: CorpusSettings, split: str, vids: list[str]) -> str:
    """Content address of a shard: the same videos with the same settings give the same file
    name, so a retried writer task overwrites its own shard and never another run's."""
    payload = json.dumps({"settings": settings.fingerprint(), "split": split,
                          "vids": sorted(vids)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_stage(
    batch: dict[str, np.ndarray], out: str, settings: dict[str, Any], row_group_rows: int
) -> dict[str, np.ndarray]:
    """Write the batch's rows as one shard per split plus its completion record; one summary
    row (JSON) per video comes out for the driver's progress lines."""
    cfg = CorpusSettings(**settings)
    results: list[VideoResult] = [pickle.loads(p) for p in batch["payload"]]
    summaries: list[dict[str, Any]] = []
    for split in SPLITS:
        good = [r for r in results if r.split == split and not r.error and r.rows]
        if not good:
            continue
        rows = [row for r in good for row in r.rows]
        first = rows[0]
        video_specs = [FeatureSpec(k, int(a.shape[1])) for k, a in first.video.items()]
        text_specs = [FeatureSpec(k, int(a.shape[1])) for k, a in first.text.items()]
        vids = [r.vid for r in good]
        digest = shard_digest(cfg, split, vids)
        name = f"shard-{digest[:20]}.parquet"
        base = split_uri(out, split)
        info = write_shard(rows, base, name, video_specs, text_specs, qids_sha256=digest,
                           row_group_rows=row_group_rows)
        record = {**asdict(info), "vids": vids,
                  "video_features": [asdict(s) for s in video_specs],
                  "text_features": [asdict(s) for s in text_specs]}
        write_bytes(join_uri(base, PARTS_DIR, name.replace(".parquet", ".json")),
                    json.dumps(record).encode())
        for r in good:
            summaries.append(_summary(r, shard=f"{split}/{name}"))
    for r in results:
        if r.error or not r.rows:
            summaries.append(_summary(r, shard=""))
    decode_s = {str(v): float(s) for v, s in zip(batch["vid"], batch["decode_s"], strict=True)}
    for s in summaries:
        s["decode_s"] = round(decode_s.get(s["vid"], 0.0), 4)
    return {"summary": np.array([json.dumps(s) for s in summaries], dtype=object)}


def _summary(r: VideoResult, shard: str) -> dict[str, Any]:
    error = r.error or ("" if r.rows else "no rows (every caption was empty)")
    return {
        "vid": r.vid, "split": r.split, "status": "failed" if error else "ok", "error": error,
        "rows": len(r.rows), "clips": r.n_clips, "duration": r.duration,
        "empty_captions": r.empty_captions, "caption_frames": r.caption_frames,
        "clip_frames": r.clip_frames, "model_s": round(r.seconds, 4), "shard": shard,
        "captions": [row.query for row in r.rows[:3]],
    }


# ---- manifests ---------------------------------------------------------------------------------


def write_manifests(
    out: str, settings: CorpusSettings, records: list[dict[str, Any]],
    failures: list[dict[str, Any]], row_group_rows: int,
) -> dict[str, ShardManifest]:
    """One manifest per split over every shard any run finished (manifest.json last)."""
    manifests = {}
    for split in SPLITS:
        recs = sorted((r for r in records if r["split"] == split), key=lambda r: r["path"])
        if not recs:
            continue
        manifest = ShardManifest(
            dataset=DATASET,
            clip_len=settings.clip_len,
            video_features=[FeatureSpec(**f) for f in recs[0]["video_features"]],
            text_features=[FeatureSpec(**f) for f in recs[0]["text_features"]],
            shards=[ShardInfo.from_dict(r) for r in recs],
            row_group_rows=row_group_rows,
            max_q_l=settings.max_q_l,
            skipped=[f for f in failures if f["split"] == split],
        )
        write_manifest(split_uri(out, split), manifest)
        manifests[split] = manifest
    return manifests


# ---- driver ------------------------------------------------------------------------------------


@dataclass
class JobOptions:
    """How to run (does not change the rows)."""

    videos: str
    out: str
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0  # annotation actors; 0 = one per GPU, else 1
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    decode_cpus: float = 1.0
    videos_per_batch: int = 8
    videos_per_shard: int = 16
    caption_batch: int = 32
    clip_batch: int = 128
    val_fraction: float = 0.05
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    limit: int = 0  # process at most this many pending videos (0 = all)
    mlflow: bool = True
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str = ""


def _resources(opts: JobOptions) -> tuple[str, int, dict[str, float]]:
    """(device, actor count, per-actor resources) from the flags and the cluster."""
    try:
        return actor_resources(opts.device, opts.workers, opts.gpus_per_worker,
                               opts.cpus_per_worker)
    except ResourceError as err:
        raise CorpusInputError(str(err)) from None


def build_dataset(sources: list[VideoSource], opts: JobOptions, settings: CorpusSettings):
    """The lazy Ray Data pipeline; iterate it to run."""
    import ray.data
    from ray.data import ActorPoolStrategy

    device, workers, resources = _resources(opts)
    ds = ray.data.from_items([asdict(s) for s in sources],
                             override_num_blocks=max(1, len(sources)))
    ds = ds.map(decode_stage, fn_kwargs={"clip_len": settings.clip_len,
                                         "frame_size": settings.frame_size},
                num_cpus=opts.decode_cpus, **DECODE_REMOTE_ARGS)
    ds = ds.map_batches(
        AnnotateStage,
        fn_constructor_kwargs={
            "settings": settings.fingerprint(), "device": device,
            "caption_batch": opts.caption_batch, "clip_batch": opts.clip_batch,
            "threads": max(1, int(resources.get("num_cpus", 1))),
        },
        batch_size=opts.videos_per_batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        **resources,
    )
    ds = ds.map_batches(
        write_stage,
        fn_kwargs={"out": opts.out, "settings": settings.fingerprint(),
                   "row_group_rows": opts.row_group_rows},
        batch_size=opts.videos_per_shard,
        batch_format="numpy",
        num_cpus=0.5,
    )
    return ds, device, workers


def run(settings: CorpusSettings, opts: JobOptions, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Build (or extend) the corpus at opts.out; returns the JSON summary."""
    t0 = time.monotonic()
    try:
        settings.validate()
    except ValueError as err:
        raise CorpusInputError(str(err)) from None
    check_model_ref(settings.captioner, "--captioner")
    check_model_ref(settings.clip, "--clip")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise CorpusInputError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    listed = list_videos(opts.videos)
    if not listed:
        raise CorpusInputError(
            f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {opts.videos}"
        )
    check_settings(opts.out, settings)
    done = finished_videos(read_part_records(opts.out))
    todo = assign_splits([v for v in listed if v.vid not in done], done, opts.val_fraction)
    if opts.limit > 0:
        todo = todo[: opts.limit]
    tracker = _Tracker.start(settings, opts) if opts.mlflow else None
    try:
        summaries: list[dict[str, Any]] = []
        device, workers = "-", 0
        if todo:
            ensure_ray()
            ds, device, workers = build_dataset(todo, opts, settings)
            log(f"{len(listed)} videos under {opts.videos}: {len(done)} already done, "
                f"processing {len(todo)} with {workers} {device} annotation worker(s)")
            progress = Progress(len(todo))
            for row in ds.iter_rows():
                s = json.loads(row["summary"])
                summaries.append(s)
                log(progress.step(_progress(s)))
        else:
            log(f"{len(listed)} videos under {opts.videos}: all already done")
        records = read_part_records(opts.out)
        failures = [{"vid": s["vid"], "split": s["split"], "error": s["error"]}
                    for s in summaries if s["status"] == "failed"]
        manifests = write_manifests(opts.out, settings, records, failures, opts.row_group_rows)
        if opts.val_fraction > 0 and "val" not in manifests:
            log(f"warning: no validation rows yet ({opts.out}/val is empty); jobs.train --data "
                "needs both splits: add videos or point data.val at another shard set")
        summary = _final_summary(opts, listed, done, summaries, manifests, device, workers,
                                 time.monotonic() - t0)
        if tracker is not None:
            tracker.finish(summary, summaries, failures)
        log(json.dumps(summary))
        return summary
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise


def _progress(s: dict[str, Any]) -> str:
    if s["status"] != "ok":
        return f"{s['vid']}: FAILED, skipped: {s['error']}"
    return (f"{s['vid']} ({s['split']}): {s['rows']} rows, {s['clips']} clips, "
            f"{s['duration']:.1f} s; decode {s['decode_s']:.2f} s, models {s['model_s']:.2f} s; "
            f"e.g. {s['captions'][0]!r}")


def _final_summary(opts, listed, done, summaries, manifests, device, workers, seconds):
    ok = [s for s in summaries if s["status"] == "ok"]
    caption_frames = sum(s["caption_frames"] for s in ok)
    clip_frames = sum(s["clip_frames"] for s in ok)
    model_s = sum(s["model_s"] for s in ok)
    frames = caption_frames + clip_frames
    return {
        "out": opts.out,
        "videos_listed": len(listed),
        "videos_already_done": len(done),
        "videos_processed": len(ok),
        "videos_failed": len(summaries) - len(ok),
        "rows_this_run": sum(s["rows"] for s in ok),
        "rows_train": manifests["train"].num_rows if "train" in manifests else 0,
        "rows_val": manifests["val"].num_rows if "val" in manifests else 0,
        "shards": sum(len(m.shards) for m in manifests.values()),
        "device": device,
        "workers": workers,
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(summaries) / seconds, 4) if summaries and seconds else 0.0,
        "decode_s_per_video": round(sum(s["decode_s"] for s in ok) / len(ok), 4) if ok else 0.0,
        "model_ms_per_frame": round(1000 * model_s / frames, 3) if frames else 0.0,
        "caption_frames": caption_frames,
        "clip_frames": clip_frames,
    }


class _Tracker:
    """The corpus as an MLflow run: settings as params, counts as metrics, examples/failures as
    artifacts. Same helpers (and run-name tag resume) as the training job."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @staticmethod
    def start(settings: CorpusSettings, opts: JobOptions) -> _Tracker | None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            return None
        tracking = _tracking()
        tracking.check_tracking_server()
        name = opts.run_name or f"corpus-{PurePosixPath(opts.out.rstrip('/')).name}"
        run_id = tracking.start_or_resume_run(opts.experiment, name)
        tracking.log_params(run_id, {"corpus": settings.fingerprint(),
                                     "videos": opts.videos, "out": opts.out})
        from mlflow.tracking import MlflowClient

        MlflowClient().set_tag(run_id, "vl.corpus_uri", opts.out)
        return _Tracker(run_id)

    def finish(self, summary: dict[str, Any], summaries: list[dict[str, Any]],
               failures: list[dict[str, Any]]) -> None:
        from mlflow.tracking import MlflowClient

        tracking = _tracking()
        numeric = {k: float(v) for k, v in summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        tracking.log_epoch(self.run_id, 0, numeric)
        client = MlflowClient()
        examples = [{"vid": s["vid"], "split": s["split"], "captions": s["captions"]}
                    for s in summaries if s["status"] == "ok"][:20]
        client.log_dict(self.run_id, examples, "caption_examples.json")
        client.log_dict(self.run_id, failures, "failures.json")
        client.log_dict(self.run_id, summary, "summary.json")
        tracking.finish_run(self.run_id)

    def fail(self) -> None:
        _tracking().finish_run(self.run_id, status="FAILED")


def _tracking():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from vl import tracking
    return tracking


# ---- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain_corpus",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="local dir or s3://bucket/prefix of videos")
    p.add_argument("--out", required=True, help="s3://bucket/pretrain/NAME or a local dir; "
                   "shards go to OUT/train and OUT/val (jobs.train --data OUT)")
    p.add_argument("--captioner", required=True,
                   help="BLIP captioning model: local dir or hub id, e.g. "
                        "Salesforce/blip-image-captioning-large")
    p.add_argument("--clip", required=True,
                   help="CLIP model: local dir or hub id, e.g. openai/clip-vit-base-patch32")
    p.add_argument("--interval", type=float, default=10.0, help="moment length in s (10)")
    p.add_argument("--clip-len", type=float, default=2.0, help="seconds per clip (2)")
    p.add_argument("--frame-size", type=int, default=224, help="decode frames down to this "
                   "shorter side (224)")
    p.add_argument("--caption-max-tokens", type=int, default=30)
    p.add_argument("--caption-min-tokens", type=int, default=3)
    p.add_argument("--caption-beams", type=int, default=1)
    p.add_argument("--max-q-l", type=int, default=32, help="caption tokens kept (32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=0,
                   help="annotation actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs (and torch threads) per annotation actor on CPU")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task")
    p.add_argument("--videos-per-batch", type=int, default=8,
                   help="videos whose frames go through the models together")
    p.add_argument("--videos-per-shard", type=int, default=16)
    p.add_argument("--caption-batch", type=int, default=32, help="frames per BLIP generate")
    p.add_argument("--clip-batch", type=int, default=128, help="frames/captions per CLIP call")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of videos held out in OUT/val (by a hash of the video id)")
    p.add_argument("--limit", type=int, default=0, help="process at most N pending videos")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    p.add_argument("--name", default="", help="MLflow run name (default corpus-<OUT name>)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not track in MLflow even if MLFLOW_TRACKING_URI is set")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = CorpusSettings(
        captioner=args.captioner, clip=args.clip, interval=args.interval,
        clip_len=args.clip_len, frame_size=args.frame_size,
        caption_max_tokens=args.caption_max_tokens, caption_min_tokens=args.caption_min_tokens,
        caption_beams=args.caption_beams, max_q_l=args.max_q_l,
    )
    opts = JobOptions(
        videos=args.videos, out=args.out.rstrip("/"), device=args.device, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        decode_cpus=args.decode_cpus, videos_per_batch=args.videos_per_batch,
        videos_per_shard=args.videos_per_shard, caption_batch=args.caption_batch,
        clip_batch=args.clip_batch, val_fraction=args.val_fraction, limit=args.limit,
        mlflow=not args.no_mlflow, experiment=args.experiment, run_name=args.name,
    )
    try:
        summary = run(settings, opts, log=lambda m: print(m, flush=True))
    except CorpusInputError as err:
        print(f"jobs.pretrain_corpus: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary["rows_train"] + summary["rows_val"] == 0:
        print("jobs.pretrain_corpus: error: no rows were produced (every video failed)",
              file=sys.stderr)
        return EXIT_NO_ROWS
    return 0


if __name__ == "__main__":
    sys.exit(main())
