"""Highlight-detection metrics of QVHighlights (HL mAP, HIT@1), vectorised over queries.

The official code runs, per (query, annotator), sklearn's `precision_recall_curve` plus the
video2gif `get_ap` in an 8-process pool. Re-derived semantics (EVAL_SPEC §3), computed here for
all queries, annotators and levels at once on a (Q, clips, columns) tensor:

- thresholds are the DISTINCT predicted values, descending: tied scores form one group and enter
  the curve together (precision = TP / (TP + FP) counted at the group's end);
- `get_ap` makes precision a cumulative max along sklearn's returned order (lowest threshold
  first), i.e. each point gets the best precision at any lower threshold, and averages those
  precisions at the points where recall changes = groups that contain at least one positive;
- a constant label column scores 0 (all negative) or 1 (all positive) without a curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# level name -> minimum annotator score (0..4) for a positive clip
SALIENCY_LEVELS: dict[str, int] = {"Fair": 2, "Good": 3, "VeryGood": 4}
CLIP_LENGTH_S = 2.0


@dataclass
class SaliencyArrays:
    """Padded per-query saliency inputs, rows in evaluation order.

    pred_full: (Q, L) full predicted list, -inf padding (HIT@1 takes its argmax).
    pred: (Q, N) prediction truncated or zero-padded to each query's n clips (0 beyond n).
    n_clips: (Q,) n = int(duration / 2).
    gt: (Q, N, A) annotator scores, 0 for clips outside `relevant_clip_ids` and beyond n.
    """

    pred_full: np.ndarray
    pred: np.ndarray
    n_clips: np.ndarray
    gt: np.ndarray

    @classmethod
    def from_flat(
        cls, pred: np.ndarray, pred_counts: np.ndarray, n_clips: np.ndarray, gt: np.ndarray
    ) -> SaliencyArrays:
        """pred: concatenated predicted scores with per-query counts; gt: (Q, N, A) full scores."""
        n_q = len(pred_counts)
        big_l, big_n = int(pred_counts.max()), gt.shape[1]
        starts = np.cumsum(pred_counts) - pred_counts
        row = np.repeat(np.arange(n_q), pred_counts)
        pos = np.arange(len(pred)) - np.repeat(starts, pred_counts)
        pred_full = np.full((n_q, big_l), -np.inf)
        pred_full[row, pos] = pred
        inside = pos < n_clips[row]
        padded = np.zeros((n_q, big_n))
        padded[row[inside], pos[inside]] = pred[inside]
        return cls(pred_full, padded, n_clips, gt)


def _descending(pred: np.ndarray, n_clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row order of the first n clips by score, descending, padding last; and the mask."""
    valid = np.arange(pred.shape[1])[None, :] < n_clips[:, None]
    # Tie order inside a group of equal scores never matters (groups enter the curve whole).
    order = np.argsort(np.where(valid, -pred, np.inf), axis=1, kind="stable")
    return order, valid


def _sorted_ap(score: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """AP per (query, column) from scores sorted descending (Q, N) and labels in that order.

    y: (Q, C, N) bool, False beyond n; valid: (Q, N) prefix mask of the n real clips.
    """
    n_q, n_n = score.shape
    pos = np.arange(n_n)
    differs = score[:, 1:] != score[:, :-1]
    last = np.ones((n_q, 1), bool)
    next_valid = np.concatenate([valid[:, 1:], ~last], axis=1)
    group_end = (valid & (~next_valid | np.concatenate([differs, last], axis=1)))[:, None, :]
    group_start = (valid & np.concatenate([last, differs], axis=1))[:, None, :]

    count = np.int16 if n_n < np.iinfo(np.int16).max else np.int64
    tp = np.cumsum(y, axis=2, dtype=count)  # (Q, C, N) positives at rank <= j
    # TP count before each position's group: the value just before the group start, carried
    # through the group (a running max works because tp never decreases).
    shifted = np.concatenate([np.zeros((n_q, tp.shape[1], 1), count), tp[:, :, :-1]], axis=2)
    before = np.maximum.accumulate(np.where(group_start, shifted, 0), axis=2)
    # Recall changes exactly at the end of a group holding a positive. Between such points
    # precision only falls, so "best precision at any lower threshold" only needs them.
    step = group_end & (tp > before)
    point_prec = np.where(step, tp / (pos + 1.0), 0.0)
    best_lower = np.maximum.accumulate(point_prec[:, :, ::-1], axis=2)[:, :, ::-1]
    n_steps = step.sum(axis=2)
    ap = (best_lower * step).sum(axis=2) / np.maximum(n_steps, 1)

    n_pos = tp[:, :, -1]
    n_clips = valid.sum(axis=1)[:, None]
    ap = np.where(n_pos == 0, 0.0, ap)
    return np.where(n_pos == n_clips, 1.0, ap)


def binary_ap(pred: np.ndarray, labels: np.ndarray, n_clips: np.ndarray) -> np.ndarray:
    """AP of each (query, column): pred (Q, N), labels (Q, C, N) in {0, 1} -> (Q, C).

    Positions >= n_clips[q] are ignored. Implements sklearn precision_recall_curve + get_ap.
    """
    order, valid = _descending(pred, n_clips)
    score = np.take_along_axis(pred, order, axis=1)
    y = np.take_along_axis(labels.astype(bool), order[:, None, :], axis=2) & valid[:, None, :]
    return _sorted_ap(score, y, valid)


def hit_at_one(pred_full: np.ndarray, gt: np.ndarray, n_clips: np.ndarray) -> np.ndarray:
    """(Q, A) annotator scores (gt: (Q, N, A)) at the argmax clip of the FULL prediction.

    An argmax at or beyond n clips is a miss, scored -inf so no level counts it (the official
    `pred_clip_idx < len(gt)` test).
    """
    top = np.argmax(pred_full, axis=1)
    at_top = gt[np.arange(len(top)), np.minimum(top, gt.shape[1] - 1)]  # (Q, A)
    return np.where((top < n_clips)[:, None], at_top, -np.inf)


def highlight_metrics(arrays: SaliencyArrays) -> dict[str, dict[str, float]]:
    """{"HL-min-Fair": {"HL-mAP": x, "HL-Hit1": x}, ...Good, ...VeryGood} (x100, 2 dp).

    All levels in one pass: the label tensor stacks (levels x annotators) columns.
    """
    n_q, n_n, n_annot = arrays.gt.shape
    minimums = np.array(list(SALIENCY_LEVELS.values()), dtype=np.float64)
    order, valid = _descending(arrays.pred, arrays.n_clips)
    # Sort the 3 annotator scores once (row gather), then threshold into levels x annotators.
    flat = (np.arange(n_q)[:, None] * n_n + order).ravel()
    gt_sorted = arrays.gt.reshape(n_q * n_n, n_annot)[flat].reshape(n_q, n_n, n_annot)
    y = gt_sorted.transpose(0, 2, 1)[:, None, :, :] >= minimums[None, :, None, None]
    y = y.reshape(n_q, -1, n_n)  # column = level * A + annotator; GT is 0 beyond n clips
    score = arrays.pred[np.arange(n_q)[:, None], order]
    ap = _sorted_ap(score, y, valid)
    top_scores = hit_at_one(arrays.pred_full, arrays.gt, arrays.n_clips)  # (Q, A)
    hits = (top_scores[:, None, :] >= minimums[None, :, None]).astype(np.float64)
    hits = hits.reshape(n_q, -1)  # same column layout as `ap`
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(SALIENCY_LEVELS):
        cols = slice(k * n_annot, (k + 1) * n_annot)
        out[f"HL-min-{name}"] = {
            # (Q, A) arrays, contiguous like the official ones before the mean
            "HL-mAP": float(f"{100 * np.mean(np.ascontiguousarray(ap[:, cols])):.2f}"),
            "HL-Hit1": float(f"{100 * np.mean(np.max(hits[:, cols], axis=1)):.2f}"),
        }
    return out
