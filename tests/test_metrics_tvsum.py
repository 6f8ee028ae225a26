"""TVSum top-5 mAP: hand-computed trapezoid APs, the "> median" rule, a torch transcription of
the reference loop on random data, and the real val annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vl.metrics import EvalInputError, evaluate_tvsum, selection_score, tvsum_top5_map
from vl.metrics.tvsum import tvsum_annotator_aps

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def column(values):
    return np.array(values, dtype=float)[:, None]


def test_hand_computed_trapezoid():
    # label 1..6: median (lower middle) 3 -> positives are clips 3,4,5 (values 4,5,6).
    # pred ranks clips 0..5 in order; top 5 labels 0,0,0,1,1 -> num_gt 2.
    # terms: ranks 1-3 add 0; rank 4: rec .5, prc 1/4 -> .5 * (0 + .25) / 2 = .0625;
    # rank 5: rec 1, prc 2/5 -> .5 * (.25 + .4) / 2 = .1625. AP = .225.
    label = column([1, 2, 3, 4, 5, 6])
    pred = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert tvsum_annotator_aps(pred, label)[0] == pytest.approx(0.225)
    # reversed ranking: top 5 labels 1,1,1,0,0 -> num_gt 3, recall steps of 1/3 at precision 1
    # -> 3 * (1/3) * (1 + 1) / 2 = 1.
    assert tvsum_annotator_aps(pred[::-1], label)[0] == pytest.approx(1.0)


def test_median_ties_are_negative_and_no_positive_gives_zero():
    # values 1,1,1,1,2: median 1 -> only the clip with 2 is positive (strictly greater).
    label = column([1, 1, 1, 1, 2, 1, 1])
    # top 5 ranks clips 0..4: labels 0,0,0,0,1 -> num_gt 1: rank 5 rec 1 prc 1/5 ->
    # (1 - 0) * (0 + .2) / 2 = .1
    pred = [7, 6, 5, 4, 3, 2, 1]
    assert tvsum_annotator_aps(pred, label)[0] == pytest.approx(0.1)
    # the positive clip ranked 6th: no positive in the top 5 -> AP 0
    pred = [7, 6, 5, 4, 1, 3, 2]
    assert tvsum_annotator_aps(pred, label)[0] == 0.0


def test_prediction_truncated_to_label_length_and_short_prediction():
    label = column([5, 1, 1, 1, 1, 1])
    # extra scores beyond 6 clips are ignored even though they are the largest
    assert tvsum_annotator_aps([1, 0, 0, 0, 0, 0, 9, 9], label)[0] == pytest.approx(1.0)
    # a 2-score prediction ranks only those 2 clips: labels 1,0 -> AP = 1 * (1 + 1) / 2
    assert tvsum_annotator_aps([0.9, 0.1], label)[0] == pytest.approx(1.0)


def test_ties_in_prediction_rank_in_index_order():
    # all scores tied: the stable order keeps clips 0..4 -> labels 0,1,0,0,0 -> num_gt 1,
    # rank 2: rec 1, prc 1/2 -> (1)(0 + .5)/2 = .25 (rank 1 adds 0 with prc 0)
    label = column([1, 3, 1, 1, 1, 3])
    assert tvsum_annotator_aps([0.5] * 6, label)[0] == pytest.approx(0.25)


def test_mean_over_annotators():
    label = np.hstack([column([1, 2, 3, 4, 5, 6]), column([6, 5, 4, 3, 2, 1])])
    pred = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert tvsum_top5_map(pred, label) == pytest.approx((0.225 + 1.0) / 2)


def torch_reference(pred, label):
    """The spec's per-annotator loop, literally, with torch ops as the reference code uses."""
    torch.set_num_threads(1)
    pred = torch.tensor(pred, dtype=torch.float32)
    aps = []
    for i in range(label.shape[1]):
        cur = pred[: len(label)]
        inds = torch.argsort(cur, descending=True, dim=-1)
        col = torch.tensor(label[:, i], dtype=torch.float32)
        col = torch.where(col > col.median(), 1.0, 0.0)
        top = col[inds].tolist()[:5]
        num_gt = sum(top)
        if num_gt == 0:
            aps.append(0)
            continue
        hits = ap = rec = 0
        prc = 1
        for j, g in enumerate(top):
            hits += g
            r, p = hits / num_gt, hits / (j + 1)
            ap += (r - rec) * (prc + p) / 2
            rec, prc = r, p
        aps.append(ap)
    return aps


def test_matches_torch_transcription_on_random_data():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(6, 40))
        label = rng.integers(1, 6, size=(n, 20)).astype(float)
        pred = rng.permutation(n * 2)[: n + int(rng.integers(-3, 4))] / 7.0  # distinct scores
        pred = pred.astype(np.float32).astype(np.float64)
        assert tvsum_annotator_aps(pred, label).tolist() == pytest.approx(
            torch_reference(pred, label), abs=1e-12)


def test_evaluate_tvsum_tables_and_rounding():
    gt = [
        {"qid": "a", "domain": "BK", "label": [[1], [2], [3], [4], [5], [6]]},
        {"qid": "b", "domain": "BK", "label": [[6], [5], [4], [3], [2], [1]]},
        {"qid": "c", "domain": "VT", "label": [[1], [2], [3], [4], [5], [6]]},
    ]
    pred = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    sub = [{"qid": q, "pred_saliency_scores": pred} for q in ("c", "a", "b")]
    m = evaluate_tvsum(sub, gt)
    assert m["per_video"]["a"] == {"domain": "BK", "mAP": 0.225}
    assert m["per_video"]["b"]["mAP"] == 1.0
    assert m["per_domain"] == {"BK": {"mAP": 0.6125, "videos": 2},
                               "VT": {"mAP": 0.225, "videos": 1}}
    assert m["brief"] == {"mAP": round((0.6125 + 0.225) / 2, 5), "BK": 0.6125, "VT": 0.225}
    assert selection_score(m, "tvsum") == m["brief"]["mAP"]


def test_evaluate_tvsum_errors():
    gt = [{"qid": "a", "domain": "BK", "label": [[1], [2]]}]
    with pytest.raises(EvalInputError, match="qid 'a': missing field 'pred_saliency_scores'"):
        evaluate_tvsum([{"qid": "a"}], gt)
    with pytest.raises(EvalInputError, match="qid 'a': missing field 'label'"):
        evaluate_tvsum([{"qid": "a", "pred_saliency_scores": [1.0]}], [{"qid": "a"}])
    with pytest.raises(EvalInputError, match="not finite"):
        evaluate_tvsum([{"qid": "a", "pred_saliency_scores": [1.0, float("nan")]}], gt)


@pytest.fixture(scope="module")
def tvsum_val():
    path = DATA / "tvsum_val.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_val_annotator_own_scores_rank_perfectly(tvsum_val):
    # Predicting annotator 0's own scores puts only above-median clips in its top 5 whenever
    # at least 5 clips are above the median -> AP 1 for annotator 0.
    assert len(tvsum_val) == 10 and len({r["domain"] for r in tvsum_val}) == 10
    for row in tvsum_val:
        label = np.array(row["label"])
        col = label[:, 0]
        if (col > np.sort(col)[(len(col) - 1) // 2]).sum() >= 5:
            assert tvsum_annotator_aps(col, label)[0] == 1.0
    sub = [{"qid": r["qid"], "pred_saliency_scores": list(np.mean(r["label"], axis=1))}
           for r in tvsum_val]
    m = evaluate_tvsum(sub, tvsum_val)
    assert set(m["per_domain"]) == {"BK", "BT", "DS", "FM", "GA", "MS", "PK", "PR", "VT", "VU"}
    # the average of annotators is a strong predictor: far above a reversed one
    rev = [{"qid": s["qid"], "pred_saliency_scores": [-x for x in s["pred_saliency_scores"]]}
           for s in sub]
    assert m["brief"]["mAP"] > evaluate_tvsum(rev, tvsum_val)["brief"]["mAP"] + 0.3
