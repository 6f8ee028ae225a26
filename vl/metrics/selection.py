"""Checkpoint-selection score (EVAL_SPEC §5): one number to rank evaluations during training.

Not a reported metric. It mirrors the reference's `calculate_stop_score`: weights normalised by
their sum first, then a weighted sum of the brief metrics (same arithmetic order). A missing key
is an error here (the reference silently skips it, which would rank checkpoints on a different
scale without anyone noticing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vl.metrics.io import EvalInputError

QVH_WEIGHTS: dict[str, float] = {
    "MR-full-R1@0.3": 0.3,
    "MR-full-R1@0.5": 0.5,
    "MR-full-R1@0.7": 0.7,
    "MR-full-mAP@0.5": 0.5,
    "MR-full-mAP@0.75": 0.75,
    "MR-full-mAP": 0.25,
    "MR-long-mAP": 0.25,
    "MR-middle-mAP": 0.25,
    "MR-short-mAP": 0.25,
}
MR_WEIGHTS: dict[str, float] = {
    "MR-full-R1@0.3": 0.3,
    "MR-full-R1@0.5": 0.5,
    "MR-full-R1@0.7": 0.7,
    "MR-full-mIoU": 0.5,
}
QVH_NAMES = frozenset({"qvhighlights", "qvh", "hl"})
TVSUM_NAMES = frozenset({"tvsum"})


def _weighted(brief: Mapping[str, Any], weights: dict[str, float]) -> float:
    total = sum(weights.values())
    score = 0.0
    for key, weight in weights.items():
        if key not in brief:
            raise EvalInputError(f"selection score needs metric '{key}', absent from the brief")
        score += float(brief[key]) * (weight / total)
    return score


def selection_score(metrics: Mapping[str, Any], dataset: str) -> float:
    """Higher is better. `metrics`: an evaluate_* result (or its `brief`); dataset: its name.

    QVHighlights ("qvhighlights"/"hl"): weighted MR score over 9 brief metrics (/3.75).
    TVSum: the top-5 mAP (brief "mAP"). Any other name is an MR set (Charades-STA, TACoS...):
    R1@0.3/0.5/0.7 and mIoU (/2.0). NaN metrics (an empty bucket) give NaN.
    """
    brief = metrics.get("brief", metrics)
    name = dataset.lower()
    if name in TVSUM_NAMES:
        if "mAP" not in brief:
            raise EvalInputError("selection score needs the TVSum 'mAP', absent from the brief")
        return float(brief["mAP"])
    return _weighted(brief, QVH_WEIGHTS if name in QVH_NAMES else MR_WEIGHTS)
