"""Figures of a run: loss / metric curves and predicted-vs-GT saliency examples.

Plain matplotlib `Figure` objects, never registered with pyplot (no global state, no display);
`vl.tracking.log_figure` stores them in a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

matplotlib.use("Agg", force=False)  # a file backend: figures are saved, never shown


def figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (no global state, no display needed)."""
    return Figure(figsize=(width, height), layout="constrained")


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss curves (left, log scale when positive) and evaluation metrics (right) per epoch."""
    fig = figure(11, 4)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in sorted(history):
        points = [(s, v) for s, v in history[key] if math.isfinite(v)]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax = ax_loss if "loss" in key else ax_metric
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    for ax, title in ((ax_loss, "losses"), (ax_metric, "metrics")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    loss_values = [y for line in ax_loss.get_lines() for y in line.get_ydata()]
    if loss_values and min(loss_values) > 0:
        ax_loss.set_yscale("log")
    return fig


def gt_saliency(gt_row: Mapping[str, Any], num_clips: int) -> np.ndarray:
    """QVHighlights GT saliency per clip: the sum of the 3 annotators on relevant clips, else 0."""
    labels = np.zeros(num_clips, dtype=np.float32)
    clip_ids = gt_row.get("relevant_clip_ids") or []
    scores = gt_row.get("saliency_scores") or []
    for clip, per_annotator in zip(clip_ids, scores, strict=False):
        if 0 <= clip < num_clips:
            labels[clip] = float(sum(per_annotator))
    return labels


def plot_saliency_examples(
    rows: Sequence[Mapping[str, Any]], gt_rows: Sequence[Mapping[str, Any]], n: int = 4,
    clip_len: float = 2.0,
) -> Figure:
    """Predicted vs GT saliency over time for `n` queries, with the predicted top-1 window and
    the GT windows drawn as spans (the paper's qualitative figures)."""
    gt_by_qid = {row["qid"]: row for row in gt_rows}
    pairs = [(row, gt_by_qid[row["qid"]]) for row in rows if row["qid"] in gt_by_qid][:n]
    fig = figure(10, 2.2 * max(len(pairs), 1))
    axes = fig.subplots(max(len(pairs), 1), 1, squeeze=False)[:, 0]
    if not pairs:
        axes[0].text(0.5, 0.5, "no prediction has a ground-truth row", ha="center")
        axes[0].set_axis_off()
        return fig
    for ax, (row, gt) in zip(axes, pairs, strict=False):
        pred = np.asarray(row.get("pred_saliency_scores") or [], dtype=np.float32)
        num_clips = max(len(pred), int(math.ceil(float(gt.get("duration", 0)) / clip_len)))
        times = (np.arange(num_clips) + 0.5) * clip_len  # clip centres, seconds
        for st, ed in gt.get("relevant_windows") or []:
            ax.axvspan(st, ed, color="tab:green", alpha=0.18, lw=0)
        ax.plot(times, gt_saliency(gt, num_clips), color="tab:green", label="GT saliency (0..12)")
        ax.set_ylabel("GT")
        ax.set_ylim(0, 12.5)
        twin = ax.twinx()
        if len(pred):
            twin.plot(times[: len(pred)], pred, color="tab:blue", label="predicted saliency")
        twin.set_ylabel("pred")
        windows = row.get("pred_relevant_windows") or []
        if windows:
            st, ed, score = max(windows, key=lambda w: w[2])
            ax.axvspan(st, ed, ymin=0.92, ymax=1.0, color="tab:red", alpha=0.8, lw=0,
                       label=f"pred top-1 ({score:.2f})")
        query = str(gt.get("query", row.get("query", "")))
        ax.set_title(f"qid {row['qid']}: {query[:90]}", fontsize=9, loc="left")
        ax.set_xlim(0, num_clips * clip_len)
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = twin.get_legend_handles_labels()
        ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time (s)")
    return fig
