"""Moments and highlights for a video of any length, from a model that sees at most max_v_l clips.

The model is trained on videos of up to `max_v_l` clips (QVHighlights: 75 x 2 s = 150 s) and its
temporal endpoint features (TEF) say where a clip sits in what it sees. A longer video is cut
into overlapping windows of max_v_l clips (stride default max_v_l // 2; the last window ends at
the video's end), each (window, query) pair is one model sample whose TEF spans the window, and
the answers are put back on the video's timeline:
- moments: each window's [start, end] seconds plus the window's offset, clamped to the duration,
  then non-maximum suppression over all windows (a moment seen whole by two overlapping windows
  is reported once, with the higher score);
- saliency: per clip, the mean over the windows that contain it.
A video of at most max_v_l clips is one window, i.e. exactly the model's normal input.

Framework-free: numpy only; the model is any callable from pyfunc input columns to official rows
(the registered model's `predict`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vl.data.features import l2_normalize, tef

PredictFn = Callable[[dict[str, list]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Window:
    """Clips [start, end) of the video."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_windows(n_clips: int, max_v_l: int, stride: int | None = None) -> list[Window]:
    """Windows of max_v_l clips every `stride` clips covering all n_clips (one if it fits)."""
    if n_clips < 1 or max_v_l < 1:
        raise ValueError(f"n_clips ({n_clips}) and max_v_l ({max_v_l}) must be >= 1")
    stride = max(1, max_v_l // 2) if stride is None else stride
    if not 1 <= stride <= max_v_l:
        raise ValueError(f"stride must be in [1, max_v_l={max_v_l}], got {stride}")
    if n_clips <= max_v_l:
        return [Window(0, n_clips)]
    starts = list(range(0, n_clips - max_v_l + 1, stride))
    if starts[-1] + max_v_l < n_clips:
        starts.append(n_clips - max_v_l)
    return [Window(s, s + max_v_l) for s in starts]


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every [start, end] in a (N, 2) with every one in b (M, 2) -> (N, M)."""
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1])
                    - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)  # (N, M)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(moments: Sequence[Sequence[float]], iou: float) -> list[list[float]]:
    """Greedy non-maximum suppression of [start, end, score] moments, best score first: a
    moment overlapping an already kept one by IoU > `iou` is dropped."""
    if not len(moments):
        return []
    m = np.asarray(moments, dtype=np.float64)  # (N, 3)
    order = np.argsort(-m[:, 2], kind="stable")
    m = m[order]
    overlaps = temporal_iou(m[:, :2], m[:, :2])  # (N, N)
    keep = np.ones(len(m), dtype=bool)
    for i in range(len(m)):
        if keep[i]:
            keep[i + 1 :] &= overlaps[i, i + 1 :] <= iou
    return [[_num(s), _num(e), round(float(c), 4)] for s, e, c in m[keep]]


def _num(x: float) -> float:
    x = round(float(x), 4)
    return int(x) if x.is_integer() else x


def merge_windows(rows: Sequence[dict[str, Any]], windows: Sequence[Window], *, clip_len: float,
                  duration: float, n_clips: int, iou: float = 0.7) -> dict[str, Any]:
    """One query's per-window rows (same order as `windows`) -> its row on the video timeline:
    `pred_relevant_windows` (absolute seconds, NMS-merged, best first) and, when the model
    predicts saliency, `pred_saliency_scores` (n_clips, mean over covering windows)."""
    moments = []
    for row, w in zip(rows, windows, strict=True):
        offset = w.start * clip_len
        for st, ed, score in row.get("pred_relevant_windows", []):
            st, ed = min(st + offset, duration), min(ed + offset, duration)
            if ed > st:
                moments.append([st, ed, score])
    out: dict[str, Any] = {"pred_relevant_windows": nms(moments, iou)}
    if all("pred_saliency_scores" in r for r in rows):
        sums, counts = np.zeros(n_clips), np.zeros(n_clips)
        for row, w in zip(rows, windows, strict=True):
            scores = np.asarray(row["pred_saliency_scores"][: w.length], dtype=np.float64)
            sums[w.start : w.start + len(scores)] += scores
            counts[w.start : w.start + len(scores)] += 1
        out["pred_saliency_scores"] = [round(float(x), 4)
                                       for x in sums / np.maximum(counts, 1)]
    return out


# ---- model inputs -------------------------------------------------------------------------------


def model_features(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Raw feature sets (each (L_i, d_i)) -> the model's per-clip / per-token input (L, sum d):
    each set L2-normalised and rounded through float16 exactly as the training shards store it,
    all truncated to the shortest, concatenated in the given (the model's) order."""
    n = min(len(s) for s in sets)
    parts = [l2_normalize(np.asarray(s[:n], np.float32)).astype(np.float16).astype(np.float32)
             for s in sets]
    return np.concatenate(parts, axis=1)


def with_tef(video: np.ndarray) -> np.ndarray:
    """(L, D) -> (L, D + 2): the window's temporal endpoint features appended."""
    return np.concatenate([video, tef(len(video))], axis=1)


def answer(predict: PredictFn, video: np.ndarray, queries: Sequence[np.ndarray], *,
           clip_len: float, duration: float, max_v_l: int, stride: int | None = None,
           iou: float = 0.7, chunk: int = 256) -> list[dict[str, Any]]:
    """Rows (pred_relevant_windows, pred_saliency_scores) for each query on one video.

    `video`: (n_clips, D) from `model_features`; `queries`: per query (n_tokens, Dt). Samples go
    to `predict` `chunk` at a time, so memory is bounded by the chunk, not by the video.
    """
    n_clips = len(video)
    windows = plan_windows(n_clips, max_v_l, stride)
    inputs = [with_tef(video[w.start : w.end]) for w in windows]  # one TEF per window
    pairs = [(q, k) for q in range(len(queries)) for k in range(len(windows))]
    per_query: list[list[dict[str, Any]]] = [[] for _ in queries]
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        columns = {
            "video_features": [inputs[k] for _, k in part],
            "text_features": [queries[q] for q, _ in part],
            "duration": [windows[k].length * clip_len for _, k in part],
            "qid": [f"{q}:{k}" for q, k in part],
        }
        rows = {r["qid"]: r for r in predict(columns)}
        for q, k in part:
            per_query[q].append(rows[f"{q}:{k}"])
    return [merge_windows(rows, windows, clip_len=clip_len, duration=duration,
                          n_clips=n_clips, iou=iou) for rows in per_query]
