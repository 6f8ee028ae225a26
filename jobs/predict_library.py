"""jobs.predict over a library (--videos DIR|s3://... or --features OUT, with --queries Q.jsonl)
as a Ray Data job: decode tasks (for --videos), then an actor pool where each actor holds the
registered model and its extractors and answers every query of a video; one row per
(video, query) comes back to the driver, which writes them all at once (temporary name,
renamed). A video that cannot be decoded is named in a progress line and skipped.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.extract import FEATURE_DIRS, SETTINGS_FILE, feature_uri, finished, read_npz
from jobs.predict import make_answerer, open_model, write_rows
from jobs.preflight import PreflightError
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
from vl.data.shards import join_uri, read_bytes
from vl.data.video import VideoListingError, list_videos


def read_queries(path: Path) -> list[dict[str, Any]]:
    """Q.jsonl lines as {"qid", "query", "vid" or None}; PreflightError names file:line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise PreflightError(f"--queries {path}: cannot read ({err.strerror})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreflightError(f"{path}:{n}: not JSON ({err.msg})") from None
        query = item.get("query") if isinstance(item, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise PreflightError(f"{path}:{n}: field 'query' must be a non-empty string")
        vid = item.get("vid")
        out.append({"qid": item.get("qid", len(out)), "query": query.strip(),
                    "vid": str(vid) if vid is not None else None})
    if not out:
        raise PreflightError(f"--queries {path}: no queries")
    return out


def plan(args: argparse.Namespace, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One item per video with its queries (JSON), its source (uri or feature files)."""
    try:
        check_s3_endpoint(args.videos or args.features)
    except StorageUnreachableError as err:
        raise PreflightError(str(err)) from None
    if args.videos:
        try:
            videos = [{"vid": v.vid, "uri": v.uri} for v in list_videos(args.videos)]
        except VideoListingError as err:
            raise PreflightError(str(err)) from None
        where = args.videos
    else:
        try:
            settings = json.loads(read_bytes(join_uri(args.features, SETTINGS_FILE)))
        except (OSError, ValueError) as err:
            raise PreflightError(f"--features {args.features}: no jobs.extract output "
                                 f"({SETTINGS_FILE}: {err})") from None
        sets = tuple(settings["features"])
        videos = [{"vid": v, "uri": ""} for v in sorted(finished(args.features, sets))]
        where = args.features
    if not videos:
        raise PreflightError(f"no videos under {where}")
    known = {v["vid"] for v in videos}
    for q in queries:
        if q["vid"] is not None and q["vid"] not in known:
            raise PreflightError(f"--queries: vid {q['vid']!r} (qid {q['qid']}) is not among "
                                 f"the {len(known)} videos under {where}")
    items = []
    for v in videos:
        mine = [q for q in queries if q["vid"] in (None, v["vid"])]
        if mine:
            items.append({**v, "queries": json.dumps(mine)})
    return items


class AnswerStage:
    """Ray Data actor: the registered model + its extractors; answers one batch of videos."""

    def __init__(self, model: str, clip_model: str, device: str, threads: int, stride: Any,
                 iou: float, batch_size: int, features: str) -> None:
        model_obj, extractors = open_model(model, clip_model, device, threads)
        self.answerer = make_answerer(model_obj, extractors, stride, iou, batch_size)
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for i, vid in enumerate(batch["vid"]):
            queries = json.loads(batch["queries"][i])
            result: dict[str, Any] = {"vid": str(vid), "error": "", "rows": []}
            t0 = time.perf_counter()
            try:
                error = str(batch["error"][i]) if "error" in batch else ""
                if error:
                    raise RuntimeError(error)
                video = self._video(batch, i)
                rows = self.answerer.answer(video, [q["query"] for q in queries])
                result["rows"] = [{"qid": q["qid"], "vid": str(vid), **r}
                                  for q, r in zip(queries, rows, strict=True)]
            except Exception as err:  # noqa: BLE001 - one bad video never stops the library
                result["error"] = str(err)
            result["seconds"] = round(time.perf_counter() - t0, 3)
            out.append(json.dumps(result))
        return {"result": np.array(out, dtype=object)}

    def _video(self, batch: dict[str, np.ndarray], i: int):
        from vl.answers import VideoFeatures

        if not self.features:
            decoded = pickle.loads(batch["payload"][i])  # vl.data.video.DecodedVideo
            return self.answerer.from_frames(decoded.frames, decoded.duration)
        sets, duration = [], 0.0
        for extractor in self.answerer.extractors.video:
            z = read_npz(feature_uri(self.features, extractor.name, str(batch["vid"][i])))
            sets.append(z["features"])
            duration = float(z["duration"]) if "duration" in z else len(z["features"]) * (
                self.answerer.clip_len)
        return VideoFeatures(sets, duration)


def check_features(args: argparse.Namespace, recipe: Any) -> None:
    """--features: the extraction holds the model's video sets with the model's clip length."""
    settings = json.loads(read_bytes(join_uri(args.features, SETTINGS_FILE)))
    missing = [n for n in recipe.video if n not in settings["features"] or n not in FEATURE_DIRS]
    if missing or float(settings["clip_len"]) != recipe.clip_len:
        raise PreflightError(
            f"--features {args.features} holds {sorted(settings['features'])} at "
            f"{settings['clip_len']} s clips; the model needs {recipe.describe()}")


def predict_library(args: argparse.Namespace) -> int:
    if args.queries is None or args.out is None:
        raise PreflightError("--videos / --features need --queries Q.jsonl and --out rows.jsonl")
    queries = read_queries(args.queries)
    items = plan(args, queries)
    _, extractors = open_model(args.model, args.clip_model, args.device or "cpu")
    recipe = extractors.recipe  # checked on the driver: a model we cannot serve fails here
    if args.features:
        check_features(args, recipe)
    ensure_ray()
    ds, device, workers = _dataset(args, items, recipe)
    print(f"{len(items)} videos, {len(queries)} queries: answering with {workers} {device} "
          "worker(s)", flush=True)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    progress = Progress(len(items))
    for record in ds.iter_rows():
        r = json.loads(record["result"])
        rows.extend(r["rows"])
        if r["error"]:
            failed.append(r["vid"])
        what = (f"{r['vid']}: FAILED, skipped: {r['error']}" if r["error"] else
                f"{r['vid']}: {len(r['rows'])} queries in {r['seconds']:.2f} s")
        print(progress.step(what), flush=True)
    n = write_rows(args.out, rows)
    print(json.dumps({"out": str(args.out), "rows": n, "videos": len(items),
                      "videos_failed": len(failed), "failed": failed}), flush=True)
    return 0 if rows or not failed else 1


def _dataset(args: argparse.Namespace, items: list[dict[str, Any]], recipe: Any):
    import ray.data
    from ray.data import ActorPoolStrategy

    try:
        device, workers, resources = actor_resources(args.device or "auto", args.workers,
                                                     1.0, 1.0)
    except ResourceError as err:
        raise PreflightError(str(err)) from None
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if args.videos:
        ds = ds.map(decode_stage, fn_kwargs={"clip_len": recipe.clip_len, "frame_size": 224},
                    **DECODE_REMOTE_ARGS)
    ds = ds.map_batches(
        AnswerStage,
        fn_constructor_kwargs={"model": args.model, "clip_model": args.clip_model,
                               "device": device, "threads": 1, "stride": args.stride,
                               "iou": args.iou, "batch_size": args.batch_size,
                               "features": args.features or ""},
        batch_size=2, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=workers), **resources)
    return ds, device, workers

