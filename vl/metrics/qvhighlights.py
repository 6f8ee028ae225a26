"""QVHighlights evaluation: the official JSON structure, byte-compatible keys and values.

`evaluate_qvhighlights(submission, ground_truth)` takes rows shaped exactly like the official
submission / GT JSONL rows (the training loop passes its in-memory rows, no file round-trip) and
returns {"brief": ..., "HL-min-Fair": ..., ..., "full": ..., "long": ..., "middle": ...,
"short": ...} with the official key order. MR metrics are computed when the first submission row
has `pred_relevant_windows`, HD metrics when it has `pred_saliency_scores` (as the official
`eval_submission` decides).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from vl.metrics.io import (
    EvalInputError,
    RowSource,
    bad_field,
    field,
    flat_numbers,
    match_qids,
    number_matrix,
    number_vector,
    row_qids,
    rows_of,
    windows,
)
from vl.metrics.retrieval import MomentArrays, moment_retrieval_metrics
from vl.metrics.saliency import CLIP_LENGTH_S, SaliencyArrays, highlight_metrics

MAX_WARNED_ROWS = 5  # rows a ReversedWindowWarning names


class ReversedWindowWarning(UserWarning):
    """A predicted window starts after it ends; scored as IoU 0 (official behaviour)."""


PRED_WINDOWS = "pred_relevant_windows"
PRED_SALIENCY = "pred_saliency_scores"
N_ANNOTATORS = 3

MR_BRIEF_KEYS: dict[str, tuple[str, str, str]] = {
    # brief key -> (bucket, block, key); sorted by brief key as the official script does
    "MR-full-R1@0.3": ("full", "MR-R1", "0.3"),
    "MR-full-R1@0.5": ("full", "MR-R1", "0.5"),
    "MR-full-R1@0.7": ("full", "MR-R1", "0.7"),
    "MR-full-mAP": ("full", "MR-mAP", "average"),
    "MR-full-mAP@0.5": ("full", "MR-mAP", "0.5"),
    "MR-full-mAP@0.75": ("full", "MR-mAP", "0.75"),
    "MR-full-mIoU": ("full", "MR-mIoU", ""),
    "MR-long-mAP": ("long", "MR-mAP", "average"),
    "MR-middle-mAP": ("middle", "MR-mAP", "average"),
    "MR-short-mAP": ("short", "MR-mAP", "average"),
}


def _indexed(qids: list[Hashable], wanted: list[Hashable]) -> list[int]:
    position = {q: i for i, q in enumerate(qids)}
    return [position[q] for q in wanted]


def _column(
    rows: Sequence[dict[str, Any]], index: list[int], name: str, source: RowSource
) -> list[Any]:
    try:
        return [rows[i][name] for i in index]
    except KeyError:
        for i in index:
            field(rows[i], name, source, i)  # raises, naming the first row without it
        raise


def window_column(
    rows: Sequence[dict[str, Any]], index: list[int], name: str, width: int, source: RowSource,
    reversed_ok: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """All windows of field `name` for rows `index`: ((M, width) float64, count per row).

    Vectorised checks on the concatenation; when one fails, the per-row validator re-reads
    the first offending row to say exactly what is wrong (empty, NaN, negative length...).
    `reversed_ok`: a window whose start is after its end is scored as the official evaluation
    scores it (IoU 0 with every window) with a ReversedWindowWarning naming the qid.
    """
    values = _column(rows, index, name, source)
    bulk = flat_numbers(values, width)
    if bulk is not None:
        arr, counts = bulk
        arr = arr.astype(np.float64, copy=False)
        if reversed_ok:
            arr = arr.copy()
            collapse_reversed(arr, rows_of(counts), rows, index, name, source)
        bad_entry = ~np.isfinite(arr).all(axis=1) | (arr[:, 1] < arr[:, 0])
        bad_rows = np.flatnonzero(counts == 0)
        if bad_entry.any():
            bad_rows = np.append(bad_rows, rows_of(counts)[bad_entry][0])
        if bad_rows.size == 0:
            return arr, counts
        k = int(bad_rows.min())
        i = index[k]
        windows(values[k], width, source, i, rows[i]["qid"], name, allow_empty=False)
    # Irregular but possibly valid input: validate (and build) row by row.
    per_row = [
        windows(values[k], width, source, i, rows[i]["qid"], name, allow_empty=False,
                reversed_ok=reversed_ok)
        for k, i in enumerate(index)
    ]
    arr = np.concatenate(per_row)
    counts = np.array([len(a) for a in per_row], dtype=np.int64)
    if reversed_ok:
        collapse_reversed(arr, rows_of(counts), rows, index, name, source)
    return arr, counts


def collapse_reversed(arr: np.ndarray, row_of: np.ndarray, rows: Sequence[dict[str, Any]],
                      index: list[int], name: str, source: RowSource) -> None:  # fmt: skip
    """In place: each window with start > end becomes the zero-length [start, start], whose
    IoU with any window is 0: what the official IoU (intersection clipped at 0) gives it."""
    flipped = np.flatnonzero(np.isfinite(arr[:, :2]).all(axis=1) & (arr[:, 1] < arr[:, 0]))
    if not flipped.size:
        return
    arr[flipped, 1] = arr[flipped, 0]
    affected = sorted({int(row_of[j]) for j in flipped})
    shown = ", ".join(f"{source.where(index[k])} qid {rows[index[k]]['qid']!r}"
                      for k in affected[:MAX_WARNED_ROWS])  # fmt: skip
    more = f" and {len(affected) - MAX_WARNED_ROWS} more row(s)" if len(affected) > \
        MAX_WARNED_ROWS else ""
    warnings.warn(ReversedWindowWarning(
        f"{len(flipped)} window(s) in '{name}' start after they end ({shown}{more}): scored "
        "as IoU 0, as the official evaluation does (--strict refuses them)"), stacklevel=2)


def moment_arrays(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    sub_index: list[int],
    gt_index: list[int],
    sub_source: RowSource,
    gt_source: RowSource,
    strict: bool = False,
) -> MomentArrays:
    """Validated MR arrays for the aligned rows (`sub_index[k]` and `gt_index[k]` match).
    `strict`: a predicted window with start > end is an error instead of IoU 0."""
    pred, pred_counts = window_column(submission, sub_index, PRED_WINDOWS, 3, sub_source,
                                      reversed_ok=not strict)
    gt, gt_counts = window_column(ground_truth, gt_index, "relevant_windows", 2, gt_source)
    return MomentArrays.from_flat(pred, pred_counts, gt, gt_counts)


def _gt_saliency(row: dict[str, Any], source: RowSource, i: int) -> np.ndarray:
    """Full-video (n clips, 3) annotator scores, n = int(duration / 2) (official mk_gt_scores).

    The per-row (slow, precise) path: used to explain a row the bulk path rejected.
    """
    qid = row["qid"]
    duration = field(row, "duration", source, i)
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not (
        duration == duration and abs(duration) != float("inf")
    ):
        raise bad_field(source, i, qid, "duration", f"expected a finite number, got {duration!r}")
    n = int(duration / CLIP_LENGTH_S)
    if n <= 0:
        raise bad_field(source, i, qid, "duration", f"{duration!r} s gives no 2-s clip")
    ids = field(row, "relevant_clip_ids", source, i)
    scores = field(row, "saliency_scores", source, i)
    if not isinstance(ids, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in ids
    ):
        raise bad_field(source, i, qid, "relevant_clip_ids", "expected a list of integers")
    full = np.zeros((n, N_ANNOTATORS))
    if not ids:
        return full
    id_arr = np.array(ids, dtype=np.int64)
    outside = np.flatnonzero((id_arr < 0) | (id_arr >= n))
    if outside.size:
        raise bad_field(source, i, qid, "relevant_clip_ids",
                        f"clip id {ids[int(outside[0])]} is outside 0..{n - 1} "
                        f"(duration {duration!r} s)")
    score_arr = number_matrix(scores, N_ANNOTATORS, source, i, qid, "saliency_scores",
                              allow_empty=False)
    if len(score_arr) != len(ids) or any(len(s) != N_ANNOTATORS for s in scores):
        raise bad_field(source, i, qid, "saliency_scores",
                        f"expected {len(ids)} rows of {N_ANNOTATORS} annotator scores "
                        f"(one per relevant clip id)")
    full[id_arr] = score_arr
    return full


def _gt_saliency_bulk(
    ground_truth: Sequence[dict[str, Any]], gt_index: list[int], source: RowSource
) -> tuple[np.ndarray, np.ndarray] | int | None:
    """(gt (Q, N, 3), n_clips) for all rows at once; the first bad row's position, or None."""
    durations = _column(ground_truth, gt_index, "duration", source)
    ids = _column(ground_truth, gt_index, "relevant_clip_ids", source)
    scores = _column(ground_truth, gt_index, "saliency_scores", source)
    try:
        dur = np.array(durations)
    except ValueError:
        return None
    if dur.ndim != 1 or dur.dtype.kind not in "if":
        return None
    bad = ~np.isfinite(dur)
    n_clips = np.where(bad, 0, dur / CLIP_LENGTH_S).astype(np.int64)  # int() for positives
    bad |= n_clips <= 0
    id_bulk = flat_numbers(ids, 0, kinds="i")
    score_bulk = flat_numbers(scores, N_ANNOTATORS, exact=True)
    if id_bulk is None or score_bulk is None:
        return None
    id_arr, id_counts = id_bulk
    score_arr, score_counts = score_bulk
    row = rows_of(id_counts)
    bad |= id_counts != score_counts
    if bad.any():
        return int(np.flatnonzero(bad)[0])
    outside = (id_arr < 0) | (id_arr >= n_clips[row])
    if not np.isfinite(score_arr).all() or outside.any():
        bad_entry = outside | ~np.isfinite(score_arr).all(axis=1)
        return int(row[bad_entry][0])
    gt = np.zeros((len(gt_index), int(n_clips.max()), N_ANNOTATORS))
    gt[row, id_arr] = score_arr
    return gt, n_clips


def saliency_arrays(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    sub_index: list[int],
    gt_index: list[int],
    sub_source: RowSource,
    gt_source: RowSource,
) -> SaliencyArrays:
    """Validated HD arrays for the aligned rows."""
    values = _column(submission, sub_index, PRED_SALIENCY, sub_source)
    bulk = flat_numbers(values, 0)
    bad: list[int] = []
    if bulk is not None:
        pred, counts = bulk
        pred = pred.astype(np.float64, copy=False)
        bad = np.flatnonzero(counts == 0).tolist()
        finite = np.isfinite(pred)
        if not finite.all():
            bad.append(int(rows_of(counts)[~finite][0]))
    if bulk is None or bad:
        # Validate row by row: raises on the first bad row (the smallest flagged one).
        per_row = [
            number_vector(values[k], sub_source, i, submission[i]["qid"], PRED_SALIENCY)
            for k, i in enumerate(sub_index)
        ]
        pred = np.concatenate(per_row)
        counts = np.array([len(a) for a in per_row], dtype=np.int64)
    gt_bulk = _gt_saliency_bulk(ground_truth, gt_index, gt_source)
    if isinstance(gt_bulk, tuple):
        gt, n_clips = gt_bulk
    else:
        first = 0 if gt_bulk is None else gt_bulk
        full = [_gt_saliency(ground_truth[i], gt_source, i) for i in gt_index[first:]]
        full = [_gt_saliency(ground_truth[i], gt_source, i) for i in gt_index[:first]] + full
        n_clips = np.array([len(f) for f in full], dtype=np.int64)
        gt = np.zeros((len(full), int(n_clips.max()), N_ANNOTATORS))
        for k, f in enumerate(full):
            gt[k, : len(f)] = f
    return SaliencyArrays.from_flat(pred, counts, n_clips, gt)


def align(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    match_number: bool,
    sub_source: RowSource,
    gt_source: RowSource,
) -> tuple[list[int], list[int]]:
    """Row indices (submission, GT) of the evaluated qids, in submission order."""
    sub_qids = row_qids(submission, sub_source)
    gt_qids = row_qids(ground_truth, gt_source)
    wanted = match_qids(sub_qids, gt_qids, match_number, sub_source, gt_source)
    return _indexed(sub_qids, wanted), _indexed(gt_qids, wanted)


def evaluate_qvhighlights(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    *,
    match_number: bool = True,
    sub_source: RowSource | None = None,
    gt_source: RowSource | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """The official QVHighlights metrics JSON (values x100, 2 decimals).

    A predicted window whose start is after its end scores IoU 0 (as in the official script)
    with a ReversedWindowWarning; `strict` makes it an EvalInputError.

    Raises EvalInputError on malformed input (the message names the row/line, qid and field).
    """
    sub_source = sub_source or RowSource("submission")
    gt_source = gt_source or RowSource("ground truth")
    sub_index, gt_index = align(submission, ground_truth, match_number, sub_source, gt_source)
    first = submission[sub_index[0]]
    do_mr, do_hd = PRED_WINDOWS in first, PRED_SALIENCY in first
    if not (do_mr or do_hd):
        raise EvalInputError(
            f"{sub_source.where(sub_index[0])}: qid {first['qid']!r}: missing field "
            f"'{PRED_WINDOWS}' (and '{PRED_SALIENCY}'): nothing to evaluate"
        )
    brief: dict[str, float] = {}
    blocks: dict[str, Any] = {}
    if do_mr:
        arrays = moment_arrays(submission, ground_truth, sub_index, gt_index, sub_source,
                               gt_source, strict)
        buckets = moment_retrieval_metrics(arrays)
        blocks.update(buckets)
        for key, (bucket, block, sub) in MR_BRIEF_KEYS.items():
            value = buckets[bucket][block]
            brief[key] = value[sub] if sub else value
    if do_hd:
        hd = highlight_metrics(
            saliency_arrays(submission, ground_truth, sub_index, gt_index, sub_source, gt_source)
        )
        blocks.update(hd)
        for level, values in hd.items():
            for name, value in values.items():
                brief[f"{level}-{name.split('-')[1]}"] = value
    return {"brief": brief, **{k: blocks[k] for k in sorted(blocks)}}
