"""Moment-retrieval metrics (mAP@t, R1@t, mIoU), vectorised over all queries at once.

Exactly the official `standalone_eval` semantics (EVAL_SPEC §2), re-derived rather than ported:

- mAP: per query the first 10 predicted windows, sorted by score descending with a STABLE sort
  (Python's `sorted`, so tied scores keep list order); each prediction in turn takes the
  not-yet-matched GT window with the highest IoU >= t. Among GT windows with the same IoU the
  official loop walks `argsort()[::-1]`, i.e. the highest index first, which we reproduce. AP is
  the VOC-2011 interpolated area; queries are averaged per threshold, then thresholds averaged.
- R1: the FIRST window in list order, against the in-bucket GT window of largest IoU (first
  index on ties, as `np.argmax`), scored with the "intersection / (max end - min start)" IoU.
- Buckets: GT windows filtered by length (lo, hi]; queries without any are dropped; `full`
  bypasses filtering entirely.

Instead of a process pool over per-query Python loops, the greedy matching runs as 10 vectorised
steps (one per prediction rank) over a (queries, thresholds, GT windows) lock tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_PRED_WINDOWS = 10
MAP_THRESHOLDS: tuple[float, ...] = tuple(
    float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10)
)
R1_THRESHOLDS: tuple[float, ...] = tuple(float(f"{t:.2f}") for t in np.linspace(0.3, 0.95, 14))
# name -> (lo, hi): GT window length l is in the bucket when lo < l <= hi; `full` bypasses.
LENGTH_BUCKETS: dict[str, tuple[float, float] | None] = {
    "short": (0.0, 10.0),
    "middle": (10.0, 30.0),
    "long": (30.0, 150.0),
    "full": None,
}


def pct(value: float) -> float:
    """x100 and rounded to 2 decimals the way the official script does (`f"{:.2f}"`)."""
    return float(f"{100 * value:.2f}")


@dataclass
class MomentArrays:
    """Padded per-query windows, rows in evaluation (submission) order.

    pred: (Q, P, 3) [st, ed, score] of the first <= 10 predicted windows, list order.
    pred_count: (Q,) number of real rows in `pred` (>= 1).
    gt: (Q, G, 2) [st, ed] GT windows; gt_count: (Q,) real rows (>= 1).
    """

    pred: np.ndarray
    pred_count: np.ndarray
    gt: np.ndarray
    gt_count: np.ndarray

    @classmethod
    def from_flat(
        cls, pred: np.ndarray, pred_counts: np.ndarray, gt: np.ndarray, gt_counts: np.ndarray
    ) -> MomentArrays:
        """From concatenated windows (M, 3) / (K, 2) and the number of windows of each query."""
        pred_count = np.minimum(pred_counts, MAX_PRED_WINDOWS)
        return cls(pad_flat(pred, pred_counts, int(pred_count.max())), pred_count,
                   pad_flat(gt, gt_counts, int(gt_counts.max())), gt_counts)


def pad_flat(flat: np.ndarray, counts: np.ndarray, length: int, fill: float = 0.0) -> np.ndarray:
    """Concatenated per-row entries -> (rows, length, ...) padded with `fill`, truncated."""
    n_rows = len(counts)
    starts = np.cumsum(counts) - counts
    row = np.repeat(np.arange(n_rows), counts)
    pos = np.arange(len(flat)) - np.repeat(starts, counts)
    keep = pos < length
    out = np.full((n_rows, length, *flat.shape[1:]), fill, dtype=np.float64)
    out[row[keep], pos[keep]] = flat[keep]
    return out


def _cross_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every predicted window with every GT window: (Q, P, 2) x (Q, G, 2) -> (Q, P, G).

    Same arithmetic as the official `compute_temporal_iou_batch_cross` (union = a1 + a2 - inter);
    a 0/0 (two zero-length windows) is 0 here, where the official code produces NaN.
    """
    area_p = pred[:, :, 1] - pred[:, :, 0]
    area_g = gt[:, :, 1] - gt[:, :, 0]
    left = np.maximum(pred[:, :, None, 0], gt[:, None, :, 0])
    right = np.minimum(pred[:, :, None, 1], gt[:, None, :, 1])
    inter = np.clip(right - left, 0, None)
    union = area_p[:, :, None] + area_g[:, None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union != 0)


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Official `compute_temporal_iou_batch_paired`: inter / (max end - min start)."""
    inter = np.maximum(0, np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]))
    union = np.maximum(a[:, 1], b[:, 1]) - np.minimum(a[:, 0], b[:, 0])
    return np.divide(inter, union, out=np.zeros_like(inter), where=union != 0)


def _greedy_tp(iou: np.ndarray, pred_valid: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(Q, T, P) 1 where the prediction (in score order) claims a still-free GT window.

    One vectorised step per prediction rank over a (Q, T, G) lock tensor. With a single GT
    window the walk reduces to "the first prediction reaching t is the only TP".
    """
    n_q, n_p, n_g = iou.shape
    thr = thresholds[None, :, None]
    if n_g == 1:
        reach = (iou[:, None, :, 0] >= thr) & pred_valid[:, None, :]  # (Q, T, P)
        return reach & (np.cumsum(reach, axis=2) == 1)
    locked = np.zeros((n_q, len(thresholds), n_g), dtype=bool)
    tp = np.zeros((n_q, len(thresholds), n_p), dtype=bool)
    g_index = np.arange(n_g)
    for p in range(n_p):
        iou_p = iou[:, None, p, :]  # (Q, 1, G)
        value = np.where((iou_p >= thr) & ~locked, iou_p, -np.inf)  # candidates only
        best = value.max(axis=2)
        hit = (best > -np.inf) & pred_valid[:, None, p]
        # Highest IoU, ties -> highest GT index (the official walk of argsort()[::-1]).
        chosen = n_g - 1 - np.argmax((value == best[:, :, None])[:, :, ::-1], axis=2)
        tp[:, :, p] = hit
        locked |= (g_index == chosen[:, :, None]) & hit[:, :, None]
    return tp


def average_precision_per_query(
    iou_sorted: np.ndarray, pred_valid: np.ndarray, gt_in: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """AP of each query at each threshold: (Q, T).

    iou_sorted: (Q, P, G) IoU with predictions already in score order (real ones first);
    pred_valid: (Q, P) real predictions; gt_in: (Q, G) GT windows that count (bucket filter).
    """
    n_p = iou_sorted.shape[1]
    iou = np.where(gt_in[:, None, :], iou_sorted, -1.0)  # never reaches a threshold
    tp_cum = np.cumsum(_greedy_tp(iou, pred_valid, thresholds), axis=2, dtype=np.float64)
    # TP + FP after rank k is k + 1 for real predictions; padding (last) adds neither, so
    # recall stays flat there and adds 0 area.
    seen = np.minimum(np.arange(1.0, n_p + 1), pred_valid.sum(axis=1)[:, None])[:, None, :]
    precision = tp_cum / seen
    recall = tp_cum / gt_in.sum(axis=1)[:, None, None]
    # VOC-2011: area = sum over recall steps of step * (best precision at >= that recall).
    # The official padding (precision 0 at both ends, recall 0 and 1) adds only zero terms.
    best = np.maximum.accumulate(precision[:, :, ::-1], axis=2)[:, :, ::-1]
    step = np.diff(recall, axis=2, prepend=0.0)
    return np.sum(step * best, axis=2)


# Queries are matched in groups of similar GT-window count so that the (Q, T, G) tensors are
# only as wide as the group needs (most QVHighlights queries have 1-2 windows, a few have 25).
_GT_COUNT_GROUPS = ((1, 1), (2, 3), (4, 7), (8, 1 << 30))


def _grouped_ap(iou_sorted: np.ndarray, pred_valid: np.ndarray, gt_in: np.ndarray) -> np.ndarray:
    """average_precision_per_query on groups of queries with compacted GT columns.

    In-bucket GT columns move to the front in their original order, so "highest index among
    equal IoU" keeps its meaning after compaction.
    """
    thresholds = np.array(MAP_THRESHOLDS)
    counts = gt_in.sum(axis=1)
    compact = bool((gt_in == (np.arange(gt_in.shape[1])[None, :] < counts[:, None])).all())
    columns = None if compact else np.argsort(~gt_in, axis=1, kind="stable")
    ap = np.empty((len(counts), len(thresholds)))
    for lo, hi in _GT_COUNT_GROUPS:
        sel = np.flatnonzero((counts >= lo) & (counts <= hi))
        if sel.size == 0:
            continue
        width = int(counts[sel].max())
        if columns is None:  # in-bucket windows already form a prefix (the full bucket)
            iou, inside = iou_sorted[sel, :, :width], gt_in[sel, :width]
        else:
            cols = columns[sel, :width]
            iou = np.take_along_axis(iou_sorted[sel], cols[:, None, :], axis=2)
            inside = np.take_along_axis(gt_in[sel], cols, axis=1)
        ap[sel] = average_precision_per_query(iou, pred_valid[sel], inside, thresholds)
    return ap


@dataclass
class _Prepared:
    arrays: MomentArrays
    iou: np.ndarray  # (Q, P, G) list order
    iou_sorted: np.ndarray  # (Q, P, G) score order
    pred_valid_sorted: np.ndarray  # (Q, P)
    gt_valid: np.ndarray  # (Q, G)


def _prepare(arrays: MomentArrays) -> _Prepared:
    n_q, n_p, _ = arrays.pred.shape
    n_g = arrays.gt.shape[1]
    pred_valid = np.arange(n_p)[None, :] < arrays.pred_count[:, None]
    gt_valid = np.arange(n_g)[None, :] < arrays.gt_count[:, None]
    iou = _cross_iou(arrays.pred[:, :, :2], arrays.gt)
    # Stable sort by -score (Python's list.sort(key=-score)); padding goes last.
    key = np.where(pred_valid, -arrays.pred[:, :, 2], np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    iou_sorted = np.take_along_axis(iou, order[:, :, None], axis=1)
    pred_valid_sorted = np.take_along_axis(pred_valid, order, axis=1)
    return _Prepared(arrays, iou, iou_sorted, pred_valid_sorted, gt_valid)


def _bucket_metrics(prep: _Prepared, gt_in: np.ndarray) -> dict[str, object]:
    """Metrics of one bucket given which GT windows are in it; queries without any dropped."""
    keep = gt_in.any(axis=1)
    if not keep.any():
        nan = float("nan")
        return {
            "MR-mIoU": nan,
            "MR-mAP": {**{str(t): nan for t in MAP_THRESHOLDS}, "average": nan},
            "MR-R1": {str(t): nan for t in R1_THRESHOLDS},
        }
    if not keep.all():
        idx = np.flatnonzero(keep)
        gt_in = gt_in[idx]
        iou_sorted, pred_valid = prep.iou_sorted[idx], prep.pred_valid_sorted[idx]
        iou_first, gt, first = prep.iou[idx, 0, :], prep.arrays.gt[idx], prep.arrays.pred[idx, 0]
    else:
        iou_sorted, pred_valid = prep.iou_sorted, prep.pred_valid_sorted
        iou_first, gt, first = prep.iou[:, 0, :], prep.arrays.gt, prep.arrays.pred[:, 0]

    ap = _grouped_ap(iou_sorted, pred_valid, gt_in)
    ap_thds = ap.mean(axis=0)
    mr_map = {str(t): pct(v) for t, v in zip(MAP_THRESHOLDS, ap_thds, strict=True)}
    mr_map["average"] = pct(np.mean(ap_thds))

    best = np.argmax(np.where(gt_in, iou_first, -np.inf), axis=1)
    best_gt = gt[np.arange(len(best)), best]
    top1_iou = _paired_iou(first[:, :2], best_gt)
    r1 = {str(t): float(f"{np.mean(top1_iou >= t) * 100:.2f}") for t in R1_THRESHOLDS}
    return {
        "MR-mIoU": float(f"{np.mean(top1_iou) * 100:.2f}"),
        "MR-mAP": mr_map,
        "MR-R1": r1,
    }


def bucket_masks(
    arrays: MomentArrays, buckets: tuple[str, ...] = ("full", "long", "middle", "short")
) -> dict[str, np.ndarray]:
    """(Q, G) mask of the GT windows each bucket keeps (`full`: every real window)."""
    valid = np.arange(arrays.gt.shape[1])[None, :] < arrays.gt_count[:, None]
    length = arrays.gt[:, :, 1] - arrays.gt[:, :, 0]
    masks = {}
    for name in buckets:
        rng = LENGTH_BUCKETS[name]
        masks[name] = valid if rng is None else valid & (length > rng[0]) & (length <= rng[1])
    return masks


def moment_retrieval_metrics(
    arrays: MomentArrays, buckets: tuple[str, ...] = ("full", "long", "middle", "short")
) -> dict[str, dict[str, object]]:
    """{bucket: {"MR-mIoU": x, "MR-mAP": {thr: x, "average": x}, "MR-R1": {thr: x}}} (x100, 2 dp).

    An empty bucket (no query has a GT window of that length) gives NaN values; the official
    script crashes there.
    """
    prep = _prepare(arrays)
    return {name: _bucket_metrics(prep, gt_in)
            for name, gt_in in bucket_masks(arrays, buckets).items()}
