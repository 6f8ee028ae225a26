"""Figures of a run: loss / metric curves and predicted-vs-GT saliency examples.

Plain matplotlib `Figure` objects, never registered with pyplot (no global state, no display);
`vl.tracking.log_figure` stores them in a run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

matplotlib.use("Agg", force=False)  # a file backend: figures are saved, never shown


def figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (no global state, no display needed)."""
    return Figure(figsize=(width, height), layout="constrained")


# Which panel each loss term (its name after "loss_", vl.losses.criterion) is drawn in. Terms
# not listed (a new one) get their own "other losses" panel, so nothing logged is hidden.
LOSS_GROUPS: dict[str, tuple[str, ...]] = {
    "total loss": ("total",),
    "moment retrieval (MR) losses": ("span", "giou", "label", "span_nce"),
    "highlight detection (HD) losses": ("saliency", "margin", "rank_contrastive", "neg_pair", "ts",
                                        "hard_pos", "hard_neg"),
    "alignment / coupling losses": ("sym", "sal_align", "tc"),
}  # fmt: skip
OTHER_LOSSES = "other losses"
METRICS_PANEL = "evaluation metrics"
SPLIT_STYLE = {"train": "-", "val": "--"}  # line style per split; colour per term
_AUX_LAYER = re.compile(r"_\d+$")  # loss_span_0 ...: intermediate decoder layers
_LOG_RATIO = 30.0  # a panel goes log-scale only when its values span more than this factor


def curve_panel(key: str) -> tuple[str, str, str] | None:
    """(panel, term, split) of a logged series, or None for one the curves leave out (the
    intermediate decoder layers' copies of the MR terms). Keys without "loss" are metrics."""
    split, _, name = key.partition("_") if key.startswith(("train_", "val_")) else ("", "", key)
    if not name.startswith("loss"):
        return (METRICS_PANEL, key, split) if "loss" not in key else None
    term = name.removeprefix("loss").removeprefix("_") or "total"
    if _AUX_LAYER.search(term):
        return None
    panel = next((p for p, terms in LOSS_GROUPS.items() if term in terms), OTHER_LOSSES)
    return panel, term, split or "train"


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss curves grouped by what they train (total, MR, HD, alignment / coupling) and the
    evaluation metrics, one panel each, per epoch: colour per term, solid train and dashed
    val, legends beside the panels; log scale only in a panel whose values span > 30x."""
    series: dict[str, dict[tuple[str, str], list[tuple[int, float]]]] = {}
    for key in sorted(history):
        where = curve_panel(key)
        points = [(s, v) for s, v in history[key] if math.isfinite(v)]
        if where is not None and points:
            series.setdefault(where[0], {})[(where[1], where[2])] = points
    order = [*LOSS_GROUPS, OTHER_LOSSES, METRICS_PANEL]
    panels = [p for p in order if p in series]
    cols = 2 if len(panels) > 1 else 1
    rows = max(math.ceil(len(panels) / cols), 1)
    fig = figure(13, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, "no finite values logged yet", ha="center")
        return fig
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, panel, series[panel])
    fig.suptitle("training curves  (solid: train, dashed: val)", fontsize=10)
    return fig


def _draw_panel(ax: Any, panel: str, lines: Mapping[tuple[str, str], Sequence]) -> None:
    """One panel: a colour and one legend entry per term (per split for the total loss), the
    split as the line style."""
    terms = sorted({term for term, _ in lines}, key=_term_order)
    colours = {t: f"C{i % 10}" for i, t in enumerate(terms)}
    labelled: set[str] = set()
    for (term, split), points in sorted(lines.items(), key=lambda kv: (_term_order(kv[0][0]),
                                                                        kv[0][1])):  # fmt: skip
        steps, values = zip(*points, strict=True)
        label = split if term == "total" else None if term in labelled else term
        labelled.add(term)
        ax.plot(steps, values, SPLIT_STYLE.get(split, "-"), color=colours[term], label=label,
                marker="." if len(points) < 30 else None, lw=1.4)
    values = [v for points in lines.values() for _, v in points]
    if min(values) > 0 and max(values) / min(values) > _LOG_RATIO:
        ax.set_yscale("log")
    ax.set_title(panel, fontsize=10, loc="left")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              frameon=False)


def _term_order(term: str) -> tuple[int, str]:
    """Terms in the order LOSS_GROUPS lists them (the criterion's order), others by name."""
    listed = [t for terms in LOSS_GROUPS.values() for t in terms]
    return (listed.index(term), term) if term in listed else (len(listed), term)


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
