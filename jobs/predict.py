"""python -m jobs.predict: a registered model -> moments and highlights.

Four inputs, one model path. The model is loaded through MLflow's pyfunc flavour
(`models:/NAME@champion`, `runs:/ID/model`, a local path), i.e. exactly what a serving endpoint
runs; this job only builds its per-sample input:
- `--data SHARDS --out rows.jsonl`: a shard set (the training loader and collation; --gt scores
  the rows against the set's ground truth);
- `--video PATH --query "..." [--query ...]`: a user's video, features extracted on the fly with
  the extractors the model was trained with (the registered model records them), printed per
  query as the top windows in seconds and the highest-saliency clips; `--out` writes the rows;
- `--videos DIR|s3://... --queries Q.jsonl --out rows.jsonl`: a library, through Ray Data
  (decode tasks, extractor + model actors), one row per (video, query);
- `--features OUT --queries Q.jsonl --out rows.jsonl`: videos already extracted by jobs.extract.
A video longer than the model's max_v_l clips is answered window by window (vl.long_video).
Q.jsonl: one JSON object per line, {"query": "...", "qid": optional, "vid": optional}; a line
without "vid" is asked of every video. Rows are written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs.preflight import EXIT_BAD_INPUT, PreflightError, check_tracking, require_manifest
from vl.data.shards import ShardCorruptError
from vl.metrics.io import json_safe


def shard_inputs(uri: str, cfg: Any) -> tuple[dict[str, list], list[dict[str, Any]]]:
    """(pyfunc input columns, per-sample metadata) for every sample of the shard set at `uri`.

    `cfg` is the model's ExperimentConfig: it names the feature sets and length limits.
    """
    from vl.data.dataset import make_loader

    d = cfg.data
    loader = make_loader(uri, d.eval_batch_size, shuffle=False, max_v_l=d.max_v_l,
                         max_q_l=d.max_q_l, max_windows=d.max_windows,
                         video_features=d.video_features, text_features=d.text_features,
                         domain=d.tvsum_domain or None)
    columns: dict[str, list] = {"video_features": [], "text_features": [], "duration": [],
                                "qid": []}
    meta: list[dict[str, Any]] = []
    for batch in loader:
        n_v = batch.video_mask.sum(1).long().tolist()
        n_t = batch.text_mask.sum(1).long().tolist()
        for b in range(len(batch)):
            columns["video_features"].append(batch.video[b, : n_v[b]].numpy())
            columns["text_features"].append(batch.text[b, : n_t[b]].numpy())
            columns["duration"].append(batch.durations[b])
            columns["qid"].append(batch.qids[b])
            meta.append({"qid": batch.qids[b], "query": batch.queries[b], "vid": batch.vids[b]})
    return columns, meta


def load_model(uri: str):
    import mlflow.pyfunc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.load_model(uri)


def predict(model_uri: str, data: str, batch_size: int = 32) -> list[dict[str, Any]]:
    """Official rows (qid, query, vid, windows, saliency) for every sample of `data`."""
    model = load_model(model_uri)
    cfg = model.unwrap_python_model().cfg
    columns, meta = shard_inputs(data, cfg)
    rows = model.predict(columns, params={"batch_size": batch_size})
    by_qid = {m["qid"]: m for m in meta}
    out = []
    for row in rows:
        info = by_qid[row["qid"]]
        out.append({**row, "query": info["query"], "vid": info["vid"]})
    return out


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """JSONL at `path`, complete or not at all (temporary file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# ---- the model's feature recipe -----------------------------------------------------------------


def model_recipe(model: Any):
    """The FeatureRecipe the model records (vl.tracking), else the one its config implies."""
    from vl.extractors import FeatureRecipe, recipe_from_config
    from vl.serving import FEATURES_METADATA

    raw = (getattr(model.metadata, "metadata", None) or {}).get(FEATURES_METADATA)
    if raw:
        return FeatureRecipe.from_dict(raw)
    return recipe_from_config(model.unwrap_python_model().cfg.to_dict())


def open_model(uri: str, clip_model: str, device: str, threads: int | None = None):
    """(pyfunc model, VideoAnswerer factory inputs) after checking the model's feature sets can
    be extracted here; PreflightError (one line) otherwise."""
    from vl.extractors import ExtractionError, build_extractors

    try:
        model = load_model(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
        raise PreflightError(f"cannot load model {uri}: {str(err).splitlines()[0]}") from None
    recipe = model_recipe(model)
    missing = recipe.missing()
    if missing:
        raise PreflightError(
            f"model {uri} needs {recipe.describe()}; no extractor here for "
            f"{', '.join(missing)} (jobs.predict extracts video 'clip' and text 'clip'; "
            "use --data with pre-extracted shards, or train with configs/qvhighlights_clip.yaml)"
        )
    overrides = {"clip": clip_model} if clip_model else None
    try:
        extractors = build_extractors(recipe, models=overrides, device=device, threads=threads)
    except (ExtractionError, OSError) as err:
        raise PreflightError(f"model {uri}: {str(err).splitlines()[0]}") from None
    return model, extractors


def make_answerer(model: Any, extractors: Any, stride: int | None, iou: float,
                  batch_size: int):
    from vl.answers import VideoAnswerer

    cfg = model.unwrap_python_model().cfg

    def run(columns: dict[str, list]) -> list[dict[str, Any]]:
        return model.predict(columns, params={"batch_size": batch_size})

    return VideoAnswerer(run, extractors, max_v_l=cfg.data.max_v_l, stride=stride, iou=iou)


# ---- one video ----------------------------------------------------------------------------------


def check_queries(queries: list[str]) -> list[str]:
    clean = [q.strip() for q in queries]
    for i, q in enumerate(clean, 1):
        if not q:
            raise PreflightError(f"--query {i} is empty: give the text to search for")
    return clean


def predict_video(args: argparse.Namespace) -> int:
    from vl.data.video import ClipFrameReader, VideoDecodeError

    queries = check_queries(args.query or [])
    if not queries:
        raise PreflightError("--video needs at least one --query \"...\"")
    try:  # the packet index only: a path that is not a video fails here, before the model
        with ClipFrameReader(args.video, 1.0) as probe:
            duration = probe.duration
    except VideoDecodeError as err:
        raise PreflightError(str(err)) from None
    model, extractors = open_model(args.model, args.clip_model, args.device)
    answerer = make_answerer(model, extractors, args.stride, args.iou, args.batch_size)
    print(f"{args.video}: {duration:.1f} s; extracting {extractors.recipe.describe()}",
          flush=True)
    features = answerer.from_file(args.video)
    rows = answerer.answer(features, queries)
    vid = Path(args.video).stem
    rows = [{"qid": i, "vid": vid, **r} for i, r in enumerate(rows)]
    for row in rows:
        print(format_answer(row, answerer.clip_len, args.top_k), flush=True)
    if args.out:
        n = write_rows(args.out, rows)
        print(f"wrote {n} rows to {args.out}", flush=True)
    return 0


def format_answer(row: dict[str, Any], clip_len: float, top_k: int) -> str:
    """The query, its top windows in seconds with scores, its highest-saliency clips."""
    lines = [f"query {row['qid']}: {row['query']!r} ({row['duration']:.1f} s video)"]
    for st, ed, score in row["pred_relevant_windows"][:top_k]:
        lines.append(f"  moment {st:8.1f} s - {ed:8.1f} s   score {score:.4f}")
    saliency = row.get("pred_saliency_scores")
    if saliency:
        best = sorted(range(len(saliency)), key=lambda j: -saliency[j])[:top_k]
        clips = ", ".join(f"{j * clip_len:.0f}-{(j + 1) * clip_len:.0f} s ({saliency[j]:.3f})"
                          for j in best)
        lines.append(f"  highlights: {clips}")
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.predict", description=__doc__.split("\n\n")[0],
        epilog="Needs MLFLOW_TRACKING_URI for models:/ URIs and AWS_* variables for s3://.")
    parser.add_argument("--model", required=True,
                        help="model URI, e.g. models:/videolights-demo@champion or runs:/ID/model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="shard set (s3://.../val or a local dir)")
    source.add_argument("--video", help="one video file; ask it --query")
    source.add_argument("--videos", help="a folder or s3:// prefix of videos; ask --queries")
    source.add_argument("--features", help="jobs.extract output (OUT); ask --queries")
    parser.add_argument("--query", action="append", help="text to search for (repeatable)")
    parser.add_argument("--queries", type=Path, help="Q.jsonl for --videos / --features")
    parser.add_argument("--out", type=Path, help="rows JSONL to write (required except with "
                        "--video)")
    parser.add_argument("--gt", action="store_true",
                        help="--data: also score the rows against the shard set's ground truth")
    parser.add_argument("--clip-model", default="", help="CLIP weights to extract with (local "
                        "dir or hub id) instead of the ones the model records")
    parser.add_argument("--stride", type=int, default=None, help="clips between window starts "
                        "on long videos (default: max_v_l // 2)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU merging moments "
                        "across windows (0.7)")
    parser.add_argument("--top-k", type=int, default=5, help="moments / clips printed (5)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workers", type=int, default=0, help="--videos/--features: model "
                        "actors (default: one per GPU, else 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = None
    try:
        check_numbers(args)
        if args.model.startswith(("models:/", "runs:/")):
            check_tracking()
        if args.data:
            return predict_shards(args)
        if args.video:
            return predict_video(args)
        from jobs.predict_library import predict_library

        return predict_library(args)
    except (PreflightError, ShardCorruptError) as err:
        print(f"jobs.predict: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def check_numbers(args: argparse.Namespace) -> None:
    """Sizes and thresholds that cannot work, refused before any model is loaded."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--top-k", args.top_k, 1),
                             ("--workers", args.workers, 0)):  # fmt: skip
        if value < low:
            raise PreflightError(f"{flag} must be >= {low}, got {value}")
    if args.stride is not None and args.stride < 1:
        raise PreflightError(f"--stride must be >= 1, got {args.stride}")
    if not 0.0 <= args.iou <= 1.0:
        raise PreflightError(f"--iou must be in [0, 1], got {args.iou}")


def predict_shards(args: argparse.Namespace) -> int:
    if args.out is None:
        raise PreflightError("--data needs --out rows.jsonl")
    manifest = require_manifest(args.data, "prediction")
    rows = predict(args.model, args.data, args.batch_size)
    write_rows(args.out, rows)
    print(f"wrote {len(rows)} predictions to {args.out}", flush=True)
    if args.gt:
        from vl.data.dataset import read_annotations
        from vl.engine import score_rows

        metrics = score_rows(manifest.dataset, rows, read_annotations(args.data))
        print(json.dumps(json_safe(metrics["brief"]), indent=1, allow_nan=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
