"""TVSum top-5 mAP (the UMT / VideoLights `compute_hl_results` code path, EVAL_SPEC §4).

Per video and per annotator i (20): rank clips by predicted saliency (truncated to the label
length), binarise the annotator's column at "> median" (torch.median = lower middle value for
even lengths), keep the top 5 ranked clips, and take the trapezoidal AP over those 5 with
num_gt = positives inside the top 5 (0 positives -> AP 0). Video score = mean over annotators.

Ties in the prediction: the reference uses `torch.argsort(descending=True)` (not stable; its tie
order is an implementation detail of torch's CPU sort). We rank tied clips in index order
(stable), which is what a tie-free model output makes irrelevant.

`tvsum_top5_map(pred, label)` works on arrays for the training loop; `evaluate_tvsum` takes
submission rows {qid, pred_saliency_scores} and GT rows {qid, label, domain} and returns
per-video, per-domain and average tables (fractions rounded to 5 decimals as the reference's
`round(mean_ap, 5)`; tables in the paper show x100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vl.metrics.io import EvalInputError, RowSource, field, number_matrix, number_vector
from vl.metrics.qvhighlights import PRED_SALIENCY, align

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

TOP_K = 5
DEFAULT_DOMAIN = "all"


def tvsum_annotator_aps(pred: ArrayLike, label: ArrayLike, top_k: int = TOP_K) -> np.ndarray:
    """Top-k AP of each annotator column: pred (L,), label (n_clips, A) -> (A,)."""
    label = np.asarray(label, dtype=np.float64)
    if label.ndim != 2 or label.shape[0] == 0:
        raise EvalInputError(f"label must be a non-empty (clips, annotators) matrix, got "
                             f"shape {label.shape}")
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)[: label.shape[0]]
    if pred.size == 0:
        raise EvalInputError("pred must hold at least one clip score")
    if not np.isfinite(pred).all():
        raise EvalInputError("pred has a non-finite saliency score")
    order = np.argsort(-pred, kind="stable")[:top_k]
    n = label.shape[0]
    median = np.sort(label, axis=0)[(n - 1) // 2]  # torch.median: lower middle value
    gt = (label > median[None, :]).astype(np.float64)[order]  # (k, A)
    num_gt = gt.sum(axis=0)
    hits = np.cumsum(gt, axis=0)
    rank = np.arange(1, len(order) + 1, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = hits / num_gt
    prc = hits / rank
    rec_prev = np.vstack([np.zeros((1, gt.shape[1])), rec[:-1]])
    prc_prev = np.vstack([np.ones((1, gt.shape[1])), prc[:-1]])
    terms = (rec - rec_prev) * (prc_prev + prc) / 2
    ap = np.zeros(gt.shape[1])
    for term in terms:  # sequential, in rank order, like the reference's running sum
        ap = ap + term
    return np.where(num_gt == 0, 0.0, ap)


def tvsum_top5_map(pred: ArrayLike, label: ArrayLike) -> float:
    """Top-5 mAP of one video (mean over annotators), unrounded; for the training loop."""
    return float(np.mean(tvsum_annotator_aps(pred, label)))


def _round5(value: float) -> float:
    # The reference rounds a NumPy float: round(np.float64, 5) (NumPy's rounding).
    return float(np.round(np.float64(value), 5))


def evaluate_tvsum(
    submission: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    *,
    match_number: bool = True,
    sub_source: RowSource | None = None,
    gt_source: RowSource | None = None,
) -> dict[str, Any]:
    """{"brief": {"mAP": avg, <domain>: mAP...}, "per_domain": {...}, "per_video": {...}}.

    per_video[qid] = {"domain", "mAP"}; per_domain[d] = {"mAP", "videos"} where mAP is the
    reference's mean over all (video, annotator) APs of the domain; "mAP" in brief is the
    average of the per-domain values (the paper's table average). Fractions, 5 decimals.
    """
    sub_source = sub_source or RowSource("submission")
    gt_source = gt_source or RowSource("ground truth")
    sub_index, gt_index = align(submission, ground_truth, match_number, sub_source, gt_source)
    per_video: dict[str, dict[str, Any]] = {}
    by_domain: dict[str, list[np.ndarray]] = {}
    for si, gi in zip(sub_index, gt_index, strict=True):
        srow, grow = submission[si], ground_truth[gi]
        qid = srow["qid"]
        pred = number_vector(field(srow, PRED_SALIENCY, sub_source, si), sub_source, si, qid,
                             PRED_SALIENCY)
        raw_label = field(grow, "label", gt_source, gi)
        width = len(raw_label[0]) if isinstance(raw_label, list) and raw_label and isinstance(
            raw_label[0], list) else 1
        label = number_matrix(raw_label, width, gt_source, gi, qid, "label", allow_empty=False)
        domain = grow.get("domain", DEFAULT_DOMAIN)
        aps = tvsum_annotator_aps(pred, label)
        per_video[str(qid)] = {"domain": domain, "mAP": _round5(np.mean(aps))}
        by_domain.setdefault(str(domain), []).append(aps)
    per_domain = {
        d: {"mAP": _round5(np.mean(np.stack(v))), "videos": len(v)}
        for d, v in sorted(by_domain.items())
    }
    average = _round5(np.mean([v["mAP"] for v in per_domain.values()]))
    brief = {"mAP": average, **{d: v["mAP"] for d, v in per_domain.items()}}
    return {"brief": brief, "per_domain": per_domain, "per_video": per_video}
