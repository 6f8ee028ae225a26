"""Charades-STA: the MR code path on the full bucket (R1@0.3/0.5/0.7, mIoU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vl.metrics import EvalInputError, evaluate_charades, selection_score

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def test_hand_computed_r1_and_miou():
    gt = [{"qid": i, "relevant_windows": [[0.0, 10.0]]} for i in range(4)]
    # IoUs of the first window: 1.0, 0.6 ([0,6]), 0.4 ([6,10]), 0 ([20,30]); the second
    # window (a perfect one) is ignored by R1.
    firsts = [[0, 10], [0, 6], [6, 10], [20, 30]]
    sub = [{"qid": i, "pred_relevant_windows": [[*w, 0.9], [0, 10, 0.1]]}
           for i, w in enumerate(firsts)]
    m = evaluate_charades(sub, gt)
    assert m["brief"] == {"MR-full-R1@0.3": 75.0, "MR-full-R1@0.5": 50.0,
                          "MR-full-R1@0.7": 25.0, "MR-full-mIoU": 50.0}
    assert set(m) == {"brief", "full"}
    assert m["full"]["MR-R1"]["0.6"] == 50.0  # IoU exactly 0.6 counts (>=)
    # selection: (.3 * 75 + .5 * 50 + .7 * 25 + .5 * 50) / 2.0
    assert selection_score(m, "charades") == pytest.approx((22.5 + 25 + 17.5 + 25) / 2.0)


def test_windows_longer_than_150_s_still_count():
    gt = [{"qid": "a", "relevant_windows": [[0, 180]]}]
    m = evaluate_charades([{"qid": "a", "pred_relevant_windows": [[0, 90, 1.0]]}], gt)
    assert m["brief"]["MR-full-mIoU"] == 50.0 and m["brief"]["MR-full-R1@0.5"] == 100.0


def test_errors():
    gt = [{"qid": "a", "relevant_windows": [[0, 10]]}]
    with pytest.raises(EvalInputError, match=r"qid 'a': field 'relevant_windows': is empty"):
        evaluate_charades([{"qid": "a", "pred_relevant_windows": [[0, 1, 1]]}],
                          [{"qid": "a", "relevant_windows": []}])
    with pytest.raises(EvalInputError, match=r"entry 0 must be a list of 3 numbers"):
        evaluate_charades([{"qid": "a", "pred_relevant_windows": [[0, 1]]}], gt)


def test_real_test_file_perfect_predictions():
    path = DATA / "charades_sta_test_tvr_format.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    gt = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(gt) == 3720
    sub = [{"qid": r["qid"], "pred_relevant_windows": [[*r["relevant_windows"][0], 1.0],
                                                       [0.0, r["duration"], 0.5]]}
           for r in gt]
    m = evaluate_charades(sub, gt)
    assert set(m["brief"].values()) == {100.0}
    # the whole-video window ranks second and is a FP (its GT is taken): AP stays 1.
    assert m["full"]["MR-mAP"]["average"] == 100.0


def test_irregular_but_valid_windows_are_accepted():
    # GT windows with an extra entry next to plain ones: only [st, ed] is used (as officially)
    gt = [{"qid": "a", "relevant_windows": [[0, 10], [20, 30, 1]]},
          {"qid": "b", "relevant_windows": [[0, 10]]}]
    sub = [{"qid": "a", "pred_relevant_windows": [[20, 30, 0.9, "extra"]]},
           {"qid": "b", "pred_relevant_windows": [[0, 10, 0.9]]}]
    m = evaluate_charades(sub, gt)
    assert m["brief"]["MR-full-mIoU"] == 100.0
    # query a: one TP of 2 GT windows -> AP 1/2; query b: AP 1
    assert m["full"]["MR-mAP"]["average"] == 75.0
