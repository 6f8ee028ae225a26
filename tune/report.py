"""The search's deliverables: the paper's Table 7 (best coefficients per domain) and Table 2
(top-5 mAP per domain + average) layouts as Markdown and CSV, and per-domain heatmaps of top-5
mAP over hl x scsl.

Pure functions of `TrialOutcome`s, so they are unit-tested without a Ray cluster or MLflow.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tune.space import PAPER_GRID
from vl.figures import figure

# Column order of the paper's TVSum tables (Tables 2 and 7).
PAPER_DOMAIN_ORDER = ("VT", "VU", "GA", "MS", "PK", "PR", "FM", "BK", "BT", "DS")


@dataclass
class TrialOutcome:
    """What the summary needs of one finished (or stopped, or failed) trial."""

    domain: str
    trial_id: str
    hl: float
    scsl: float
    al: float
    best_top5_map: float  # x100; NaN when the trial never evaluated
    epochs_run: int
    status: str  # "finished", "stopped" (by the scheduler), "failed" or "diverged" (NaN loss)
    run_id: str = ""
    diverged: str = ""  # the non-finite loss's one-line error, for a diverged trial


def order_domains(domains: Sequence[str]) -> list[str]:
    """Domains in the paper's column order."""
    return sorted(domains, key=PAPER_DOMAIN_ORDER.index)


def best_per_domain(outcomes: Sequence[TrialOutcome]) -> dict[str, TrialOutcome]:
    """The highest best-so-far top-5 mAP of each domain among trials that evaluated at least
    once (failed trials included if they reported: their checkpoint is as good as any).
    Ties go to the earlier trial in `outcomes`."""
    best: dict[str, TrialOutcome] = {}
    for t in outcomes:
        if not math.isfinite(t.best_top5_map):
            continue
        if t.domain not in best or t.best_top5_map > best[t.domain].best_top5_map:
            best[t.domain] = t
    return best


def _fmt_coef(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def table7(best: dict[str, TrialOutcome], features: str) -> tuple[str, str]:
    """Paper Table 7 layout: one row per coefficient, one column per domain. (markdown, csv)"""
    domains = order_domains(best)
    header = ["features", "coef", *domains]
    rows = [
        [features, name, *(_fmt_coef(getattr(best[d], name)) for d in domains)]
        for name in ("hl", "scsl", "al")
    ]
    return _markdown(header, rows), _csv(header, rows)


def table2(best: dict[str, TrialOutcome], method: str) -> tuple[str, str]:
    """Paper Table 2 layout: one row, top-5 mAP (x100, 1 decimal) per domain and the average."""
    domains = order_domains(best)
    values = [best[d].best_top5_map for d in domains]
    avg = sum(values) / len(values) if values else float("nan")
    header = ["method", *domains, "Avg."]
    rows = [[method, *(f"{v:.1f}" for v in values), f"{avg:.1f}"]]
    return _markdown(header, rows), _csv(header, rows)


def average(best: dict[str, TrialOutcome]) -> float:
    values = [t.best_top5_map for t in best.values()]
    return sum(values) / len(values) if values else float("nan")


def nearest_grid_value(value: float, grid: Sequence[float]) -> float:
    """The grid value closest to `value` in log space (the grid is roughly geometric)."""
    return min(grid, key=lambda g: abs(math.log(value) - math.log(g)))


def heatmap_cells(
    outcomes: Sequence[TrialOutcome],
) -> tuple[list[float], list[float], list[list[float]], list[list[int]]]:
    """(hl values, scsl values, best top-5 mAP per cell, trials per cell) over the paper's hl x
    scsl grid. A sampled trial falls in the cell of its nearest grid values; a cell keeps the
    maximum over its trials (and over al). Empty cells are NaN."""
    hls, scsls = list(PAPER_GRID["hl"]), list(PAPER_GRID["scsl"])
    values = [[math.nan] * len(scsls) for _ in hls]
    counts = [[0] * len(scsls) for _ in hls]
    for t in outcomes:
        if not math.isfinite(t.best_top5_map):
            continue
        i = hls.index(nearest_grid_value(t.hl, hls))
        j = scsls.index(nearest_grid_value(t.scsl, scsls))
        counts[i][j] += 1
        if not values[i][j] >= t.best_top5_map:  # NaN-aware max
            values[i][j] = t.best_top5_map
    return hls, scsls, values, counts


def heatmap(domain: str, outcomes: Sequence[TrialOutcome]):
    """A matplotlib Figure (not registered with pyplot): top-5 mAP over hl (rows) x scsl."""
    hls, scsls, values, counts = heatmap_cells(outcomes)
    fig = figure(4.6, 3.8)
    ax = fig.subplots()
    grid = np.ma.masked_invalid(np.array(values, dtype=float))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="top-5 mAP")
    ax.set_xticks(range(len(scsls)), [_fmt_coef(s) for s in scsls])
    ax.set_yticks(range(len(hls)), [_fmt_coef(h) for h in hls])
    ax.set_xlabel("scsl")
    ax.set_ylabel("hl")
    ax.set_title(f"TVSum {domain}: best top-5 mAP (max over al)", fontsize=9)
    for i in range(len(hls)):
        for j in range(len(scsls)):
            text = "-" if counts[i][j] == 0 else f"{values[i][j]:.1f}\n(n={counts[i][j]})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white")
    return fig
