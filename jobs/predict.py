"""python -m jobs.predict: a registered model -> official-format predictions for a shard set.

The model is loaded through MLflow's pyfunc flavour (`models:/NAME@champion`, `runs:/ID/model`,
a local path), i.e. exactly what a serving endpoint would run; this job only turns shards into
the pyfunc's per-sample input (the same loader and collation as training, so features are
normalised and carry the TEF dims the model was trained with) and writes the rows as JSONL.
With --gt it also scores the rows against the shard set's ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jobs.preflight import EXIT_BAD_INPUT, PreflightError, check_tracking, require_manifest


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.predict",
        description="Predict with a registered VideoLights model on a shard set and write "
                    "official-format rows (JSONL). Needs MLFLOW_TRACKING_URI for models:/ URIs "
                    "and AWS_* variables for s3:// shards.",
    )
    parser.add_argument("--model", required=True,
                        help="model URI, e.g. models:/videolights-demo@champion or runs:/ID/model")
    parser.add_argument("--data", required=True, help="shard set (s3://.../val or a local dir)")
    parser.add_argument("--out", required=True, type=Path, help="predictions JSONL to write")
    parser.add_argument("--gt", action="store_true",
                        help="also score the predictions against the shard set's ground truth "
                             "and print the brief metrics")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        manifest = require_manifest(args.data, "prediction")
        if args.model.startswith(("models:/", "runs:/")):
            check_tracking()
    except PreflightError as err:
        print(f"jobs.predict: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    rows = predict(args.model, args.data, args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} predictions to {args.out}", flush=True)
    if args.gt:
        from vl.data.dataset import read_annotations
        from vl.engine import score_rows

        metrics = score_rows(manifest.dataset, rows, read_annotations(args.data))
        print(json.dumps(metrics["brief"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
