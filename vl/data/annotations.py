"""Annotation JSONL (QVHighlights, Charades-STA, TVSum, synthetic pretraining) -> typed records,
validation, and the per-sample training targets of VIDEOLIGHTS_SPEC.md section 1.4.

The raw JSON row is kept on every record: it is the official ground truth the evaluator reads, and
the shard writer stores it verbatim so a shard set can be evaluated without the original file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vl.config import DATASETS, TVSUM_DOMAINS

DEFAULT_CLIP_LEN = {"qvhighlights": 2.0, "charades": 1.0, "tvsum": 2.0, "pretrain": 2.0}
# Saliency pairs per sample (spec 1.4): [hard, easy] for QVH, two random for window-derived
# data, one hard pair for TVSum. Fixed within a dataset so batches stack.
PAIRS_PER_SAMPLE = {"qvhighlights": 2, "charades": 2, "tvsum": 1, "pretrain": 2}
QVH_ANNOTATORS = 3
TVSUM_ANNOTATORS = 20
MAX_WINDOWS = 5


class AnnotationError(ValueError):
    """An invalid annotation row; says which file, which line and which field."""

    def __init__(self, path: str, line: int, field_name: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field_name
        where = f"{path}:{line}"
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {message}")


@dataclass(frozen=True)
class Annotation:
    """One query (QVH/Charades/pretrain) or one video (TVSum: qid == vid), typed.

    `saliency` holds per relevant clip the annotator scores (QVH: 3 values 0..4; pretrain: one
    BLIP value, unused for labels). `label` is TVSum's (#clips, 20) matrix of 1..5 scores.
    """

    dataset: str
    qid: int | str
    vid: str
    query: str
    duration: float
    windows: tuple[tuple[float, float], ...] = ()
    clip_ids: tuple[int, ...] = ()
    saliency: tuple[tuple[float, ...], ...] = ()
    label: np.ndarray | None = field(default=None, compare=False)
    domain: str | None = None
    source: str = "<memory>:0"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def has_spans(self) -> bool:
        """TVSum is highlight-detection only: no moment windows, no MR losses."""
        return self.dataset != "tvsum"


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return dataset


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_annotation(
    row: dict[str, Any],
    dataset: str,
    *,
    path: str = "<memory>",
    line: int = 0,
    clip_len: float | None = None,
    validate: bool = True,
    window_tolerance_s: float = 1e-6,
) -> Annotation:
    """Turn one JSON object into an Annotation, raising AnnotationError(path, line, field)."""
    _check_dataset(dataset)
    clip_len = DEFAULT_CLIP_LEN[dataset] if clip_len is None else clip_len

    def fail(field_name: str | None, message: str) -> AnnotationError:
        return AnnotationError(path, line, field_name, message)

    qid, vid, query, duration = _parse_identity(row, fail)
    windows = _parse_windows(row, duration, validate, window_tolerance_s, fail)
    clip_ids = _parse_clip_ids(row, duration, clip_len, validate, fail)
    saliency = _parse_saliency(row, dataset, len(clip_ids), validate, fail)
    domain = row.get("domain")
    label = None
    if dataset == "tvsum":
        label = _parse_tvsum_label(row, duration, domain, validate, fail)
    if validate and dataset in ("charades", "pretrain") and len(windows) != 1:
        raise fail("relevant_windows", f"expected exactly one window, got {len(windows)}")
    if validate and dataset == "qvhighlights" and row.get("relevant_windows") is not None \
            and not windows:
        raise fail("relevant_windows", "is empty")
    return Annotation(
        dataset=dataset,
        qid=qid,
        vid=vid,
        query=query,
        duration=duration,
        windows=tuple(windows),
        clip_ids=tuple(clip_ids),
        saliency=tuple(saliency),
        label=label,
        domain=domain if isinstance(domain, str) else None,
        source=f"{path}:{line}",
        raw=row,
    )


_Fail = Callable[[str | None, str], AnnotationError]


def _parse_identity(row: Any, fail: _Fail) -> tuple[int | str, str, str, float]:
    """(qid, vid, query, duration) of a row: the fields every dataset has."""
    if not isinstance(row, dict):
        raise fail(None, f"expected a JSON object, got {type(row).__name__}")
    for key in ("qid", "vid", "duration"):
        if key not in row:
            raise fail(key, "missing")
    qid = row["qid"]
    if not (isinstance(qid, str) or (isinstance(qid, int) and not isinstance(qid, bool))):
        raise fail("qid", f"must be an int or a string, got {qid!r}")
    vid = row["vid"]
    if not isinstance(vid, str) or not vid:
        raise fail("vid", f"must be a non-empty string, got {vid!r}")
    query = row.get("query", "")
    if not isinstance(query, str):
        raise fail("query", f"must be a string, got {type(query).__name__}")
    duration = row["duration"]
    if not _is_number(duration) or duration <= 0:
        raise fail("duration", f"must be a positive number, got {duration!r}")
    return qid, vid, query, float(duration)


def _parse_windows(row: dict[str, Any], duration: float, validate: bool, tolerance_s: float,
                   fail: _Fail) -> list[tuple[float, float]]:  # fmt: skip
    """`relevant_windows` as (start, end) seconds, inside the video when validating."""
    windows: list[tuple[float, float]] = []
    raw_windows = row.get("relevant_windows")
    if raw_windows is None:
        return windows
    if not isinstance(raw_windows, list):
        raise fail("relevant_windows", "must be a list of [start, end] pairs")
    for i, w in enumerate(raw_windows):
        if not (isinstance(w, list | tuple) and len(w) == 2 and all(map(_is_number, w))):
            raise fail("relevant_windows", f"window {i} must be [start, end], got {w!r}")
        st, ed = float(w[0]), float(w[1])
        if validate and not (-tolerance_s <= st < ed <= duration + tolerance_s):
            raise fail(
                "relevant_windows",
                f"window {i} [{st}, {ed}] is not inside the video [0, {duration}] "
                "with start < end",
            )
        windows.append((st, ed))
    return windows


def _parse_clip_ids(row: dict[str, Any], duration: float, clip_len: float, validate: bool,
                    fail: _Fail) -> list[int]:  # fmt: skip
    """`relevant_clip_ids`: distinct clip indices inside the video when validating."""
    clip_ids: list[int] = []
    raw_clip_ids = row.get("relevant_clip_ids")
    if raw_clip_ids is None:
        return clip_ids
    if not isinstance(raw_clip_ids, list):
        raise fail("relevant_clip_ids", "must be a list of ints")
    n_clips = math.ceil(duration / clip_len - 1e-9)
    for c in raw_clip_ids:
        if not isinstance(c, int) or isinstance(c, bool):
            raise fail("relevant_clip_ids", f"must hold ints, got {c!r}")
        if validate and not 0 <= c < n_clips:
            raise fail(
                "relevant_clip_ids",
                f"clip id {c} out of range [0, {n_clips}) for duration {duration} s "
                f"and {clip_len} s clips",
            )
        clip_ids.append(c)
    if validate and len(set(clip_ids)) != len(clip_ids):
        raise fail("relevant_clip_ids", "contains duplicates")
    return clip_ids


def _parse_saliency(row: dict[str, Any], dataset: str, n_clip_ids: int, validate: bool,
                    fail: _Fail) -> list[tuple[float, ...]]:  # fmt: skip
    """`saliency_scores`: per relevant clip, the annotators' scores (QVH: 3 values 0..4)."""
    saliency: list[tuple[float, ...]] = []
    raw_saliency = row.get("saliency_scores")
    if raw_saliency is None:
        return saliency
    if not isinstance(raw_saliency, list):
        raise fail("saliency_scores", "must be a list (one entry per relevant clip)")
    if validate and len(raw_saliency) != n_clip_ids:
        raise fail(
            "saliency_scores",
            f"has {len(raw_saliency)} entries but relevant_clip_ids has {n_clip_ids}",
        )
    width = QVH_ANNOTATORS if dataset == "qvhighlights" else 1
    for i, s in enumerate(raw_saliency):
        if not (isinstance(s, list) and all(map(_is_number, s))):
            raise fail("saliency_scores", f"entry {i} must be a list of numbers, got {s!r}")
        if validate and dataset in ("qvhighlights", "pretrain") and len(s) != width:
            raise fail("saliency_scores", f"entry {i} has {len(s)} scores, expected {width}")
        if validate and dataset == "qvhighlights" and not all(0 <= v <= 4 for v in s):
            raise fail("saliency_scores", f"entry {i} {s} has a score outside 0..4")
        saliency.append(tuple(float(v) for v in s))
    return saliency


def _parse_tvsum_label(row: dict[str, Any], duration: float, domain: Any, validate: bool,
                       fail: _Fail) -> np.ndarray:  # fmt: skip
    """TVSum's (#clips, 20) matrix of 1..5 annotator scores, and its domain when validating."""
    raw_label = row.get("label")
    if raw_label is None:
        raise fail("label", "missing (TVSum rows carry a #clips x 20 score matrix)")
    try:
        label = np.asarray(raw_label, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise fail("label", f"not a numeric matrix ({e})") from None
    if not validate:
        return label
    if label.ndim != 2 or label.shape[1] != TVSUM_ANNOTATORS:
        raise fail("label", f"shape {label.shape}, expected (#clips, {TVSUM_ANNOTATORS})")
    if label.shape[0] != int(round(duration)):
        raise fail("label", f"has {label.shape[0]} clips but duration says {duration:g} clips")
    if not np.all((label >= 1) & (label <= 5)):
        raise fail("label", "scores must lie in 1..5")
    if domain not in TVSUM_DOMAINS:
        raise fail("domain", f"{domain!r} is not one of {', '.join(TVSUM_DOMAINS)}")
    return label


def iter_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; JSON errors name the file and line."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise AnnotationError(path, lineno, None, f"invalid JSON: {e.msg}") from None


def load_annotations(
    path: str | Path,
    dataset: str,
    *,
    clip_len: float | None = None,
    domain: str | None = None,
    validate: bool = True,
    window_tolerance_s: float = 1e-6,
) -> list[Annotation]:
    """Parse and validate a whole JSONL file; `domain` keeps only that TVSum domain.

    Duplicate qids are an error: targets, shards and evaluation are all keyed by qid.
    """
    _check_dataset(dataset)
    if domain is not None and domain not in TVSUM_DOMAINS:
        raise ValueError(f"unknown TVSum domain {domain!r}; expected one of {TVSUM_DOMAINS}")
    out: list[Annotation] = []
    seen: dict[str, int] = {}
    for lineno, row in iter_jsonl(path):
        ann = parse_annotation(
            row,
            dataset,
            path=str(path),
            line=lineno,
            clip_len=clip_len,
            validate=validate,
            window_tolerance_s=window_tolerance_s,
        )
        key = str(ann.qid)
        if validate and key in seen:
            raise AnnotationError(
                str(path), lineno, "qid", f"duplicate qid {ann.qid!r} (first on line {seen[key]})"
            )
        seen[key] = lineno
        if domain is None or ann.domain == domain:
            out.append(ann)
    return out


# ---------------------------------------------------------------------------------------------
# Targets (spec 1.4)


@dataclass
class Targets:
    """Training targets of one sample for a video of ctx_l loaded clips.

    spans: (W, 2) float32 (center, width) in [0, 1], W <= max_windows (0 for TVSum);
    saliency_labels: (ctx_l,) float32 on the 0..12 scale; pos_idx / neg_idx: (P,) int64.
    """

    spans: np.ndarray
    saliency_labels: np.ndarray
    pos_idx: np.ndarray
    neg_idx: np.ndarray


def span_targets(
    windows: Iterable[tuple[float, float]],
    ctx_l: int,
    clip_len: float,
    rng: np.random.Generator,
    max_windows: int = MAX_WINDOWS,
) -> np.ndarray:
    """Windows in seconds -> (W, 2) (center, width) normalised by ctx_l * clip_len.

    More than max_windows windows are shuffled with `rng` and the first max_windows kept (as the
    reference does). Values are clipped to [0, 1]: a window may run past the loaded clips when the
    feature file is shorter than the annotated duration.
    """
    w = np.asarray(list(windows), dtype=np.float64).reshape(-1, 2)
    if len(w) > max_windows:
        w = w[rng.permutation(len(w))[:max_windows]]
    se = np.clip(w / (ctx_l * clip_len), 0.0, 1.0)
    return np.stack([(se[:, 0] + se[:, 1]) / 2, se[:, 1] - se[:, 0]], axis=1).astype(np.float32)


def _qvh_saliency(
    ann: Annotation, ctx_l: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed 3-annotator scores; pairs [hard, easy] (hard = highest / lowest summed score among
    the relevant clips, easy = a random relevant clip / a random non-relevant clip)."""
    labels = np.zeros(ctx_l, dtype=np.float32)
    if not ann.clip_ids:
        zero = np.zeros(2, dtype=np.int64)
        return labels, zero, zero
    ids = np.asarray(ann.clip_ids, dtype=np.int64)
    agg = np.asarray([sum(s) for s in ann.saliency], dtype=np.float32)
    inside = ids < ctx_l
    labels[ids[inside]] = agg[inside]
    order = np.argsort(agg, kind="stable")  # increasing
    hard_pos = min(int(ids[order[-1]]), ctx_l - 1)
    hard_neg = min(int(ids[order[0]]), ctx_l - 1)
    relevant = np.zeros(ctx_l, dtype=bool)
    relevant[ids[inside]] = True
    easy_neg_pool = np.flatnonzero(~relevant)
    if len(easy_neg_pool) >= 1:
        easy_pos = min(int(rng.choice(ids)), ctx_l - 1)
        easy_neg = int(rng.choice(easy_neg_pool))
    else:  # every clip is relevant: reuse the hard pair
        easy_pos, easy_neg = hard_pos, hard_neg
    return (
        labels,
        np.array([hard_pos, easy_pos], dtype=np.int64),
        np.array([hard_neg, easy_neg], dtype=np.int64),
    )


def _window_saliency(
    ann: Annotation, ctx_l: int, rng: np.random.Generator, n_pairs: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Charades / pretrain: labels 1 inside the (first) window, 0 outside; random pairs."""
    labels = np.zeros(ctx_l, dtype=np.float32)
    if not ann.windows:
        zero = np.zeros(n_pairs, dtype=np.int64)
        return labels, zero, zero
    s, e = ann.windows[0]
    clip_len = ann.duration / ctx_l
    st = int(s // clip_len)
    ed = max(0, min(int(e // clip_len), ctx_l) - 1)
    st = min(st, ed)
    if st != ed:
        pos = rng.choice(np.arange(st, ed + 1), size=n_pairs, replace=False)
    else:
        pos = np.full(n_pairs, st)
    neg_pool = np.concatenate([np.arange(0, st), np.arange(ed + 1, ctx_l)])
    neg = rng.choice(neg_pool, size=n_pairs, replace=False) if len(neg_pool) >= n_pairs else pos
    labels[st : ed + 1] = 1.0
    return labels, pos.astype(np.int64), np.asarray(neg, dtype=np.int64)


def _tvsum_saliency(ann: Annotation, ctx_l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum over 20 annotators of (score - 1) in [0, 80], rescaled to 0..12; one hard pair."""
    assert ann.label is not None
    agg = (ann.label - 1.0).sum(axis=1)[:ctx_l]
    labels = np.zeros(ctx_l, dtype=np.float32)
    labels[: len(agg)] = agg / 80.0 * 12.0
    order = np.argsort(agg, kind="stable")
    pos = np.array([min(int(order[-1]), ctx_l - 1)], dtype=np.int64)
    neg = np.array([min(int(order[0]), ctx_l - 1)], dtype=np.int64)
    return labels, pos, neg


def build_targets(
    ann: Annotation,
    ctx_l: int,
    rng: np.random.Generator,
    *,
    clip_len: float | None = None,
    max_windows: int = MAX_WINDOWS,
) -> Targets:
    """Targets of spec 1.4 for `ann` given the number of loaded clips ctx_l.

    All randomness (window subsampling, easy pairs) comes from `rng`, so seeding it with
    (seed, epoch, qid) makes an epoch reproducible whatever the worker or rank layout.
    """
    if ctx_l < 1:
        raise ValueError(f"{ann.source}: qid {ann.qid!r} has no clips (ctx_l={ctx_l})")
    clip_len = DEFAULT_CLIP_LEN[ann.dataset] if clip_len is None else clip_len
    if ann.dataset == "tvsum":
        spans = np.zeros((0, 2), dtype=np.float32)
        labels, pos, neg = _tvsum_saliency(ann, ctx_l)
    else:
        spans = span_targets(ann.windows, ctx_l, clip_len, rng, max_windows)
        if ann.dataset == "qvhighlights":
            labels, pos, neg = _qvh_saliency(ann, ctx_l, rng)
        else:
            labels, pos, neg = _window_saliency(ann, ctx_l, rng, PAIRS_PER_SAMPLE[ann.dataset])
    return Targets(spans=spans, saliency_labels=labels, pos_idx=pos, neg_idx=neg)
