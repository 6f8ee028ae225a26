"""Charades-STA evaluation: the QVHighlights MR code path on the `full` bucket only.

The VideoLights reference scores Charades-STA with the same `standalone_eval` script; the paper
reports R1@0.3/0.5/0.7 and mIoU of the full bucket (which bypasses the 150-s length filter, so
long windows still count). The full block (mAP included) is returned too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vl.metrics.io import RowSource
from vl.metrics.qvhighlights import align, moment_arrays
from vl.metrics.retrieval import moment_retrieval_metrics

CHARADES_BRIEF_KEYS: dict[str, tuple[str, str]] = {
    "MR-full-R1@0.3": ("MR-R1", "0.3"),
    "MR-full-R1@0.5": ("MR-R1", "0.5"),
    "MR-full-R1@0.7": ("MR-R1", "0.7"),
    "MR-full-mIoU": ("MR-mIoU", ""),
}


def evaluate_charades(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    *,
    match_number: bool = True,
    sub_source: RowSource | None = None,
    gt_source: RowSource | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """{"brief": {R1@0.3/0.5/0.7, mIoU}, "full": {"MR-mIoU", "MR-mAP", "MR-R1"}} (x100, 2 dp)."""
    sub_source = sub_source or RowSource("submission")
    gt_source = gt_source or RowSource("ground truth")
    sub_index, gt_index = align(submission, ground_truth, match_number, sub_source, gt_source)
    arrays = moment_arrays(submission, ground_truth, sub_index, gt_index, sub_source, gt_source,
                           strict)
    full = moment_retrieval_metrics(arrays, buckets=("full",))["full"]
    brief = {}
    for key, (block, sub) in CHARADES_BRIEF_KEYS.items():
        value = full[block]
        brief[key] = value[sub] if sub else value
    return {"brief": brief, "full": full}
