"""QVHighlights metrics: hand-computed cases, a literal reference on random tied data, real GT.

`reference_*` below is an independent, loop-by-loop transcription of EVAL_SPEC §2-3 (written
from the spec, not from our vectorised code) used to cross-check the vectorised implementation
on randomised inputs full of ties.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from vl.metrics import EvalInputError, evaluate_qvhighlights, selection_score
from vl.metrics.io import RowSource
from vl.metrics.qvhighlights import moment_arrays, saliency_arrays
from vl.metrics.retrieval import bucket_masks
from vl.metrics.saliency import binary_ap

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
QVH_VAL = DATA / "highlight_val_release.jsonl"
MAP_T = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
R1_T = [0.3, 0.35, 0.4, 0.45] + MAP_T


# ---------------------------------------------------------------- literal reference (slow)
def ref_iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union else 0.0


def ref_query_ap(gts, preds, t):
    preds = sorted(preds[:10], key=lambda w: -w[2])  # stable: ties keep list order
    locked = [False] * len(gts)
    tps = []
    for p in preds:
        ious = [ref_iou(p, g) for g in gts]
        # descending IoU; equal IoU -> higher index first (argsort()[::-1] of a stable sort)
        order = sorted(range(len(gts)), key=lambda j: (ious[j], j), reverse=True)
        hit = 0
        for j in order:
            if ious[j] < t:
                break
            if locked[j]:
                continue
            locked[j] = True
            hit = 1
            break
        tps.append(hit)
    prec, rec, tp = [], [], 0
    for k, h in enumerate(tps):
        tp += h
        prec.append(tp / (k + 1))
        rec.append(tp / len(gts))
    mp = [0.0] + prec + [0.0]
    mr = [0.0] + rec + [1.0]
    for i in range(len(mp) - 2, -1, -1):
        mp[i] = max(mp[i], mp[i + 1])
    return sum((mr[i] - mr[i - 1]) * mp[i] for i in range(1, len(mr)) if mr[i] != mr[i - 1])


def ref_r1_iou(gts, first):
    cross = [ref_iou(first, g) for g in gts]
    g = gts[cross.index(max(cross))]
    inter = max(0.0, min(first[1], g[1]) - max(first[0], g[0]))
    union = max(first[1], g[1]) - min(first[0], g[0])
    return inter / union if union else 0.0


def ref_mr(sub, gt, lo=None, hi=None):
    gt_by = {r["qid"]: r for r in gt}
    aps, ious = [], []
    for r in sub:
        wins = gt_by[r["qid"]]["relevant_windows"]
        if lo is not None:
            wins = [w for w in wins if lo < w[1] - w[0] <= hi]
            if not wins:
                continue
        aps.append([ref_query_ap(wins, r["pred_relevant_windows"], t) for t in MAP_T])
        ious.append(ref_r1_iou(wins, r["pred_relevant_windows"][0]))
    per_t = [sum(a[i] for a in aps) / len(aps) for i in range(len(MAP_T))]
    return {
        "MR-mIoU": round(100 * sum(ious) / len(ious), 2),
        "MR-mAP": {**{str(t): round(100 * v, 2) for t, v in zip(MAP_T, per_t, strict=True)},
                   "average": round(100 * sum(per_t) / len(per_t), 2)},
        "MR-R1": {str(t): round(100 * sum(i >= t for i in ious) / len(ious), 2) for t in R1_T},
    }


def ref_sklearn_ap(y, s):
    """precision_recall_curve (thresholds = distinct scores) + get_ap, by explicit loops."""
    if len(set(y)) == 1:
        return float(y[0])
    thresholds = sorted(set(s), reverse=True)
    prec, rec = [], []
    for thr in thresholds:
        sel = [i for i in range(len(s)) if s[i] >= thr]
        tp = sum(y[i] for i in sel)
        prec.append(tp / len(sel))
        rec.append(tp / sum(y))
    prec, rec = prec[::-1] + [1.0], rec[::-1] + [0.0]  # sklearn order: lowest threshold first
    for i in range(1, len(prec)):
        prec[i] = max(prec[i - 1], prec[i])
    picked = [prec[i] for i in range(len(rec) - 1) if rec[i] != rec[i + 1]]
    return sum(picked) / len(picked)


def ref_hd(sub, gt, level):
    gt_by = {r["qid"]: r for r in gt}
    aps, hits = [], []
    for r in sub:
        g = gt_by[r["qid"]]
        n = int(g["duration"] / 2)
        full = [[0, 0, 0] for _ in range(n)]
        for c, sc in zip(g["relevant_clip_ids"], g["saliency_scores"], strict=True):
            full[c] = sc
        pred = list(r["pred_saliency_scores"])
        top = pred.index(max(pred))
        hits.append(max(int(v >= level) for v in full[top]) if top < n else 0)
        pred = (pred + [0.0] * n)[:n]
        for a in range(3):
            aps.append(ref_sklearn_ap([int(row[a] >= level) for row in full], pred))
    return round(100 * sum(aps) / len(aps), 2), round(100 * sum(hits) / len(hits), 2)


# ---------------------------------------------------------------- helpers
def gt_row(qid, windows, duration=20, ids=(), scores=()):
    return {"qid": qid, "duration": duration, "relevant_windows": windows,
            "relevant_clip_ids": list(ids), "saliency_scores": [list(s) for s in scores]}


def sub_row(qid, windows, saliency=None):
    row = {"qid": qid, "query": "q", "vid": "v", "pred_relevant_windows": windows}
    if saliency is not None:
        row["pred_saliency_scores"] = saliency
    return row


def random_case(seed, n_q=40):
    rng = random.Random(seed)
    gt, sub = [], []
    for q in range(n_q):
        duration = rng.choice([20, 30, 40, 150])
        n = duration // 2
        wins = []
        for _ in range(rng.choice([1, 1, 2, 3, 5])):
            st = rng.randrange(0, duration - 2, 2)
            ed = min(duration, st + rng.choice([2, 4, 6, 10, 20, 40]))
            wins.append([st, ed])
        ids = sorted(rng.sample(range(n), rng.randint(1, n)))
        scores = [[rng.choice([0, 1, 2, 3, 4, 4]) for _ in range(3)] for _ in ids]
        gt.append(gt_row(q, wins, duration, ids, scores))
        preds = []
        for _ in range(rng.choice([1, 3, 10, 12])):
            g = rng.choice(wins)
            st = max(0, g[0] + rng.choice([-2, 0, 0, 2]))
            preds.append([st, max(st, g[1] + rng.choice([-2, 0, 2])), rng.choice([0.9, 0.5, 0.5])])
        sal = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n + rng.choice([-3, 0, 4]))]
        sub.append(sub_row(q, preds, sal))
    rng.shuffle(sub)
    return sub, gt


# ---------------------------------------------------------------- hand-computed MR cases
def test_map_ties_keep_list_order():
    # Two predictions with equal score: the FP listed first is ranked first (stable sort).
    gt = [gt_row(1, [[0, 10]])]
    sub = [sub_row(1, [[20, 30, 0.5], [0, 10, 0.5]])]
    full = evaluate_qvhighlights(sub, gt)["full"]
    # ranks: FP, TP -> precision 1/2 at recall 1 -> AP 0.5 at every threshold
    assert full["MR-mAP"]["0.5"] == 50.0 and full["MR-mAP"]["average"] == 50.0
    # ...but R1 takes the first window in list order: IoU 0 -> R1 0, mIoU 0
    assert full["MR-R1"]["0.3"] == 0.0 and full["MR-mIoU"] == 0.0
    sub = [sub_row(1, [[0, 10, 0.5], [20, 30, 0.5]])]
    full = evaluate_qvhighlights(sub, gt)["full"]
    assert full["MR-mAP"]["average"] == 100.0 and full["MR-R1"]["0.95"] == 100.0


def test_map_greedy_lock_and_thresholds():
    # GT A=[0,10], B=[20,30]. Preds by score: p1=[0,8] (IoU .8 with A), p2=[1,9] (IoU .8 with A
    # but A is taken -> FP), p3=[20,30] (TP for B).
    gt = [gt_row(7, [[0, 10], [20, 30]])]
    sub = [sub_row(7, [[1, 9, 0.7], [0, 8, 0.9], [20, 30, 0.1]])]
    m = evaluate_qvhighlights(sub, gt)["full"]["MR-mAP"]
    # t <= 0.8: TP, FP, TP -> precision 1, 1/2, 2/3 at recall .5, .5, 1 -> interpolated
    # area .5 * 1 + .5 * 2/3 = 5/6
    assert m["0.8"] == round(100 * 5 / 6, 2) == 83.33
    # t > 0.8: FP, FP, TP (B only) -> precision 1/3 at recall 1/2 -> area 1/6
    assert m["0.85"] == 16.67 and m["0.95"] == 16.67
    assert m["average"] == round(100 * (7 * 5 / 6 + 3 / 6) / 10, 2)


def test_r1_uses_best_gt_and_first_window():
    # first window [10, 20]; GT windows [0, 12] (IoU 2/20) and [12, 22] (IoU 8/12).
    gt = [gt_row(3, [[0, 12], [12, 22]])]
    sub = [sub_row(3, [[10, 20, 0.1], [0, 12, 0.9]])]
    full = evaluate_qvhighlights(sub, gt)["full"]
    assert full["MR-mIoU"] == round(100 * 8 / 12, 2) == 66.67
    assert full["MR-R1"]["0.65"] == 100.0 and full["MR-R1"]["0.7"] == 0.0


def test_query_in_two_buckets():
    # q1 has a short (5 s) and a long (40 s) window; q2 only a middle one (20 s).
    gt = [gt_row(1, [[0, 5], [50, 90]], duration=150), gt_row(2, [[0, 20]], duration=150)]
    sub = [sub_row(1, [[0, 5, 0.9], [60, 90, 0.8]]), sub_row(2, [[0, 20, 0.9]])]
    m = evaluate_qvhighlights(sub, gt)
    # short: q1 alone, GT {[0,5]}: first pred TP -> AP 1, R1 100
    assert m["short"]["MR-mAP"]["average"] == 100.0 and m["short"]["MR-R1"]["0.95"] == 100.0
    # long: q1 alone, GT {[50,90]}: p1 FP, p2 IoU 30/40 = .75 -> AP 1/2 for t <= .75 else 0;
    # R1 uses the first window [0,5] against [50,90] -> 0
    assert m["long"]["MR-mAP"]["0.75"] == 50.0 and m["long"]["MR-mAP"]["0.8"] == 0.0
    assert m["long"]["MR-mAP"]["average"] == 30.0 and m["long"]["MR-mIoU"] == 0.0
    assert m["middle"]["MR-mAP"]["average"] == 100.0
    # full: q1 AP: p1 TP([0,5]), p2 TP at t <= .75 -> 1 or 1/2; q2 AP 1
    assert m["full"]["MR-mAP"]["0.75"] == 100.0 and m["full"]["MR-mAP"]["0.8"] == 75.0
    assert m["brief"]["MR-long-mAP"] == 30.0 and m["brief"]["MR-short-mAP"] == 100.0


def test_full_bucket_keeps_windows_longer_than_150():
    gt = [gt_row(1, [[0, 200]], duration=200)]
    sub = [sub_row(1, [[0, 200, 1.0]])]
    m = evaluate_qvhighlights(sub, gt)
    assert m["full"]["MR-mAP"]["average"] == 100.0
    assert np.isnan(m["long"]["MR-mAP"]["average"])  # 200 s is outside (30, 150]


def test_only_first_ten_predictions_count_for_map():
    gt = [gt_row(1, [[0, 10]])]
    wins = [[50 + i, 60 + i, 0.9] for i in range(10)] + [[0, 10, 0.95]]
    m = evaluate_qvhighlights([sub_row(1, wins)], gt)["full"]["MR-mAP"]
    assert m["average"] == 0.0  # the 11th window (highest score) is cut before sorting


def test_output_structure_and_keys():
    sub, gt = random_case(0, n_q=10)
    m = evaluate_qvhighlights(sub, gt)
    assert list(m) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood",
                       "full", "long", "middle", "short"]
    assert list(m["brief"]) == [
        "MR-full-R1@0.3", "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mAP@0.5",
        "MR-full-mAP@0.75", "MR-full-mIoU", "MR-long-mAP", "MR-middle-mAP", "MR-short-mAP",
        "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP", "HL-min-Good-Hit1",
        "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]
    assert list(m["full"]["MR-mAP"]) == [str(t) for t in MAP_T] + ["average"]
    assert list(m["full"]["MR-R1"]) == ["0.3", "0.35", "0.4", "0.45", "0.5", "0.55", "0.6",
                                        "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"]
    for v in m["brief"].values():
        assert np.isnan(v) or v == round(v, 2)


def test_mr_only_and_hd_only_submissions():
    sub, gt = random_case(1, n_q=8)
    mr_only = [{k: v for k, v in r.items() if k != "pred_saliency_scores"} for r in sub]
    assert not any(k.startswith("HL") for k in evaluate_qvhighlights(mr_only, gt))
    hd_only = [{k: v for k, v in r.items() if k != "pred_relevant_windows"} for r in sub]
    assert set(evaluate_qvhighlights(hd_only, gt)) == {
        "brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood"}


# ---------------------------------------------------------------- hand-computed HD cases
def test_hd_ap_groups_tied_scores():
    # labels 1,0,1,0 with scores .9,.5,.5,.1: clips 1 and 2 tie -> one threshold.
    # grouped: thr .9 -> P 1 R .5; thr .5 -> P 2/3 R 1; thr .1 -> P 1/2 R 1
    # AP = mean(precision at recall changes) = (1 + 2/3) / 2 = 5/6.
    # Ungrouped (clip 1 before 2) would be (1 + 2/3)/2 too, so put the positive first in list
    # order to make the difference visible: labels 1,1,0,0 scores .9,.5,.5,.1 -> grouped:
    # (1 + 2/3)/2 = 5/6, ungrouped: (1 + 1)/2 = 1.
    ap = binary_ap(np.array([[0.9, 0.5, 0.5, 0.1]]), np.array([[[1, 1, 0, 0]]], bool),
                   np.array([4]))
    assert ap[0, 0] == pytest.approx(5 / 6)
    ap = binary_ap(np.array([[0.9, 0.5, 0.5, 0.1]]), np.array([[[1, 0, 1, 0]]], bool),
                   np.array([4]))
    assert ap[0, 0] == pytest.approx(5 / 6)


def test_hd_ap_cumulative_max_precision():
    # labels by rank: 0,1,0,1 (distinct scores): P at recall changes: 1/2 (R .5), 2/4 (R 1)
    # -> cummax from the low end: both 1/2 -> AP 1/2. labels 0,1,1: P 1/2, 2/3 -> the first
    # becomes max(1/2, 2/3) = 2/3 -> AP 2/3.
    ap = binary_ap(np.array([[4.0, 3, 2, 1]]), np.array([[[0, 1, 0, 1]]], bool),
                   np.array([4]))
    assert ap[0, 0] == pytest.approx(0.5)
    ap = binary_ap(np.array([[3.0, 2, 1]]), np.array([[[0, 1, 1]]], bool), np.array([3]))
    assert ap[0, 0] == pytest.approx(2 / 3)


def test_hd_constant_columns_and_padding():
    # duration 8 -> n = 4 clips. annotator 0 all positive (AP 1), annotator 1 all zero (AP 0),
    # annotator 2 positive on clip 3 only. Prediction has 2 values -> zero-padded to 4:
    # [.2, .9, 0, 0]: clip 3 ties with clip 2 at 0 -> one group of 2 with 1 positive at rank 4
    # -> precision 1/4 -> AP 1/4. Mean over 3 annotators: (1 + 0 + 1/4) / 3.
    gt = [gt_row(1, [[0, 2]], duration=8, ids=[0, 1, 2, 3],
                 scores=[[4, 0, 0], [4, 0, 0], [4, 0, 0], [4, 0, 4]])]
    sub = [{"qid": 1, "pred_saliency_scores": [0.2, 0.9]}]
    hl = evaluate_qvhighlights(sub, gt)["HL-min-VeryGood"]
    assert hl["HL-mAP"] == round(100 * (1 + 0 + 0.25) / 3, 2) == 41.67
    assert hl["HL-Hit1"] == 100.0  # argmax clip 1: annotator 0 says 4


def test_hd_prediction_longer_than_clips():
    # n = 2 clips; prediction argmax at index 3 (>= n) -> HIT@1 miss; AP uses first 2 values.
    gt = [gt_row(1, [[0, 2]], duration=4, ids=[0, 1], scores=[[4, 4, 4], [0, 0, 0]])]
    sub = [{"qid": 1, "pred_saliency_scores": [0.5, 0.1, 0.2, 0.9]}]
    hl = evaluate_qvhighlights(sub, gt)["HL-min-VeryGood"]
    assert hl["HL-Hit1"] == 0.0 and hl["HL-mAP"] == 100.0


def test_hd_levels():
    gt = [gt_row(1, [[0, 2]], duration=6, ids=[0, 1, 2], scores=[[2, 2, 2], [3, 1, 1], [1, 1, 4]])]
    sub = [{"qid": 1, "pred_saliency_scores": [0.1, 0.9, 0.5]}]
    m = evaluate_qvhighlights(sub, gt)
    assert m["HL-min-Fair"]["HL-Hit1"] == 100.0  # clip 1 has a 3 >= 2
    assert m["HL-min-Good"]["HL-Hit1"] == 100.0
    assert m["HL-min-VeryGood"]["HL-Hit1"] == 0.0  # no 4 at clip 1


# ---------------------------------------------------------------- cross-check vs reference
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_literal_reference_on_random_ties(seed):
    sub, gt = random_case(seed)
    m = evaluate_qvhighlights(sub, gt)
    for name, (lo, hi) in {"full": (None, None), "short": (0, 10), "middle": (10, 30),
                           "long": (30, 150)}.items():
        assert m[name] == ref_mr(sub, gt, lo, hi), name
    for name, level in {"Fair": 2, "Good": 3, "VeryGood": 4}.items():
        ap, hit = ref_hd(sub, gt, level)
        assert m[f"HL-min-{name}"] == {"HL-mAP": ap, "HL-Hit1": hit}


# ---------------------------------------------------------------- input errors
def test_errors_name_qid_and_field():
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[0, 10]])]
    with pytest.raises(EvalInputError, match=r"qid 2: missing field 'pred_relevant_windows'"):
        evaluate_qvhighlights([sub_row(1, [[0, 1, 1]]), {"qid": 2}], gt)
    with pytest.raises(EvalInputError, match=r"qid 2: field 'pred_relevant_windows'.*non-finite"):
        evaluate_qvhighlights([sub_row(1, [[0, 1, 1]]), sub_row(2, [[0, float("nan"), 1]])], gt)
    with pytest.raises(EvalInputError, match=r"qid 1: .*window 0 has negative length"):
        evaluate_qvhighlights([sub_row(1, [[5, 1, 1]]), sub_row(2, [[0, 1, 1]])], gt,
                              strict=True)
    with pytest.raises(EvalInputError, match=r"1 qid\(s\) .* missing .*first: 2\)"):
        evaluate_qvhighlights([sub_row(1, [[0, 1, 1]])], gt)
    with pytest.raises(EvalInputError, match=r"appears twice"):
        evaluate_qvhighlights([sub_row(1, [[0, 1, 1]])] * 2, gt)
    bad_gt = [gt_row(1, [[0, 10]], duration=4, ids=[5], scores=[[1, 1, 1]])]
    with pytest.raises(EvalInputError, match=r"relevant_clip_ids.*outside 0..1"):
        evaluate_qvhighlights([{"qid": 1, "pred_saliency_scores": [1.0]}], bad_gt)


def test_intersect_mode():
    gt = [gt_row(1, [[0, 10]]), gt_row(2, [[0, 10]])]
    m = evaluate_qvhighlights([sub_row(1, [[0, 10, 1.0]])], gt, match_number=False)
    assert m["full"]["MR-mAP"]["average"] == 100.0


def test_selection_score_weights():
    brief = {k: 10.0 for k in ["MR-full-R1@0.3", "MR-full-R1@0.5", "MR-full-R1@0.7",
                               "MR-full-mAP@0.5", "MR-full-mAP@0.75", "MR-full-mAP",
                               "MR-long-mAP", "MR-middle-mAP", "MR-short-mAP"]}
    assert selection_score({"brief": brief}, "qvhighlights") == pytest.approx(10.0)
    brief["MR-full-R1@0.7"] = 47.5  # weight .7 of 3.75 -> +37.5 * .7 / 3.75 = +7
    assert selection_score(brief, "hl") == pytest.approx(17.0)
    with pytest.raises(EvalInputError, match="MR-full-mIoU"):
        selection_score(brief, "charades")


# ---------------------------------------------------------------- real annotation file
@pytest.fixture(scope="module")
def val_gt():
    if not QVH_VAL.exists():
        pytest.skip("../shared/data is absent")
    return [json.loads(line) for line in QVH_VAL.read_text().splitlines() if line.strip()]


def test_real_val_bucket_counts_and_perfect_windows(val_gt):
    # Predict every GT window (list order, descending scores), first = first GT window.
    sub = [sub_row(r["qid"], [[*w, 1.0 - 0.01 * i] for i, w in enumerate(r["relevant_windows"])])
           for r in val_gt]
    m = evaluate_qvhighlights(sub, val_gt)
    assert set(m["full"]["MR-R1"].values()) == {100.0}
    assert m["full"]["MR-mIoU"] == 100.0
    # in a bucket R1 compares the (unfiltered) first window with in-bucket GT only, so a
    # query whose first window is long scores 0 in `short`: not 100 there.
    assert m["short"]["MR-R1"]["0.95"] < 100.0
    # mAP is 100 exactly when no query has more than 10 GT windows (max_pred_windows = 10)
    over = [r for r in val_gt if len(r["relevant_windows"]) > 10]
    assert len(over) > 0 and m["full"]["MR-mAP"]["average"] < 100.0
    small = [r for r in val_gt if len(r["relevant_windows"]) <= 10]
    small_q = {r["qid"] for r in small}
    m_small = evaluate_qvhighlights([s for s in sub if s["qid"] in small_q], small)
    assert m_small["full"]["MR-mAP"]["average"] == 100.0
    # bucket sizes quoted in EVAL_SPEC: short 429, middle 957, long 574 (of 1550)
    idx = list(range(len(val_gt)))
    arrays = moment_arrays(sub, val_gt, idx, idx, RowSource("s"), RowSource("g"))
    sizes = {k: int(v.any(axis=1).sum()) for k, v in bucket_masks(arrays).items()}
    assert sizes == {"full": 1550, "short": 429, "middle": 957, "long": 574}


def test_real_val_perfect_saliency_per_annotator(val_gt):
    # Predicting annotator 0's own scores: annotator 0's AP is 1 at every level where the
    # column has a positive (tied groups are all-positive or all-negative), 0 where it has
    # none (constant column rule); HIT@1 is 100 where every query has an annotator-0 positive.
    sub = []
    for r in val_gt:
        pred = [0.0] * int(r["duration"] / 2)
        for c, s in zip(r["relevant_clip_ids"], r["saliency_scores"], strict=True):
            pred[c] = float(s[0])
        sub.append({"qid": r["qid"], "pred_saliency_scores": pred})
    idx = list(range(len(val_gt)))
    arrays = saliency_arrays(sub, val_gt, idx, idx, RowSource("s"), RowSource("g"))
    for level in (2, 3, 4):
        labels = (arrays.gt >= level).transpose(0, 2, 1)  # (Q, annotators, clips)
        ap = binary_ap(arrays.pred, labels, arrays.n_clips)
        has_pos = labels[:, 0, :].any(axis=1)
        assert np.all(ap[has_pos, 0] == 1.0) and np.all(ap[~has_pos, 0] == 0.0)
        assert 0 < (~has_pos).sum() < len(val_gt)  # both cases occur in the real file
    m = evaluate_qvhighlights(sub, val_gt)
    top = arrays.pred.argmax(axis=1)
    expect = 100 * np.mean(arrays.gt[np.arange(len(top)), top].max(axis=1) >= 2)
    assert m["HL-min-Fair"]["HL-Hit1"] == round(float(expect), 2)
