"""`python -m vl.eval {qvhighlights,charades,tvsum} --submission P --gt G [--out M]`.

Prints the `brief` block as one JSON line on stdout and writes the full JSON (indent 4, the
official file layout) to --out. Bad input is one line on stderr and exit status 2, never a
traceback. Only NumPy and the standard library are imported: start-up time is most of the
command's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vl.metrics.charades import evaluate_charades
from vl.metrics.io import EvalInputError, RowSource, json_safe, load_jsonl
from vl.metrics.qvhighlights import ReversedWindowWarning, evaluate_qvhighlights
from vl.metrics.tvsum import evaluate_tvsum

EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "qvhighlights": evaluate_qvhighlights,
    "charades": evaluate_charades,
    "tvsum": evaluate_tvsum,
}
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vl.eval",
        description="Official-compatible moment retrieval / highlight detection evaluation.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name in EVALUATORS:
        p = sub.add_parser(name, help=f"evaluate a {name} submission")
        p.add_argument("--submission", required=True, type=Path, help="prediction JSONL")
        p.add_argument("--gt", required=True, type=Path, help="ground-truth JSONL")
        p.add_argument("--out", type=Path, default=None, help="write the full metrics JSON here")
        p.add_argument(
            "--intersect", action="store_true",
            help="evaluate the qids shared by both files instead of requiring identical sets "
            "(the official match_number=False)",
        )
        if name != "tvsum":
            p.add_argument(
                "--strict", action="store_true",
                help="refuse a predicted window whose start is after its end (by default it is "
                "scored as the official evaluation scores it, IoU 0, with a warning)",
            )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, write --out; returns the full metrics. Raises EvalInputError."""
    submission, sub_lines = load_jsonl(args.submission)
    ground_truth, gt_lines = load_jsonl(args.gt)
    extra = {"strict": args.strict} if hasattr(args, "strict") else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReversedWindowWarning)
        metrics = EVALUATORS[args.dataset](
            submission, ground_truth,
            match_number=not args.intersect,
            sub_source=RowSource(str(args.submission), sub_lines),
            gt_source=RowSource(str(args.gt), gt_lines),
            **extra,
        )
    for warning in caught:
        print(f"vl.eval: warning: {warning.message}", file=sys.stderr)
    metrics = json_safe(metrics)
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(metrics, indent=4, allow_nan=False) + "\n"
            tmp = args.out.with_name(f".{args.out.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(args.out)
        except OSError as exc:
            raise EvalInputError(f"{args.out}: cannot write metrics: {exc.strerror}") from None
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = run(args)
    except EvalInputError as exc:
        print(f"vl.eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(metrics["brief"], allow_nan=False))
    return 0
