"""Annotation parsing, validation errors (file, line, field) and the spec 1.4 targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vl.data.annotations import (
    AnnotationError,
    build_targets,
    load_annotations,
    parse_annotation,
    span_targets,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _write(tmp_path: Path, rows: list, name: str = "a.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


QVH_OK = {
    "qid": 1,
    "query": "a dog runs",
    "duration": 20,
    "vid": "abc_0.0_20.0",
    "relevant_clip_ids": [2, 3, 4],
    "saliency_scores": [[1, 1, 1], [4, 4, 4], [2, 2, 2]],
    "relevant_windows": [[4, 10]],
}


@pytest.mark.parametrize(
    ("name", "dataset", "rows"),
    [
        ("highlight_val_release.jsonl", "qvhighlights", 1550),
        ("charades_sta_test_tvr_format.jsonl", "charades", 3720),
        ("tvsum_train.jsonl", "tvsum", 40),
        ("tvsum_val.jsonl", "tvsum", 10),
        ("pre_train_blip.jsonl", "pretrain", 673),
    ],
)
def test_real_files_parse_and_validate(name: str, dataset: str, rows: int) -> None:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    anns = load_annotations(path, dataset)
    assert len(anns) == rows
    assert all(a.raw["qid"] == a.qid for a in anns)
    if dataset == "tvsum":
        assert {a.domain for a in anns} == {
            "BK", "BT", "DS", "FM", "GA", "MS", "PK", "PR", "VT", "VU",
        }  # fmt: skip
        assert all(a.label.shape == (int(a.duration), 20) for a in anns)
        assert len(load_annotations(path, dataset, domain="VU")) == rows // 10


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"relevant_windows": [[4, 30]]}, "relevant_windows", "not inside the video"),
        ({"relevant_windows": [[8, 4]]}, "relevant_windows", "start < end"),
        ({"relevant_clip_ids": [2, 3, 10]}, "relevant_clip_ids", "out of range"),
        ({"saliency_scores": [[1, 1, 1], [4, 4, 4]]}, "saliency_scores", "has 2 entries"),
        ({"saliency_scores": [[1, 1], [4, 4, 4], [2, 2, 2]]}, "saliency_scores", "expected 3"),
        ({"saliency_scores": [[1, 1, 1], [5, 4, 4], [2, 2, 2]]}, "saliency_scores", "0..4"),
        ({"duration": -3}, "duration", "positive"),
        ({"vid": ""}, "vid", "non-empty"),
    ],
)
def test_validation_error_names_file_line_field(
    tmp_path: Path, change: dict, field: str, needle: str
) -> None:
    bad = {**QVH_OK, "qid": 2, **change}
    path = _write(tmp_path, [QVH_OK, bad])
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, "qvhighlights")
    assert err.value.line == 2
    assert err.value.field == field
    assert err.value.path == str(path)
    assert f"{path}:2" in str(err.value) and needle in str(err.value)


def test_invalid_json_and_duplicate_qid(tmp_path: Path) -> None:
    path = _write(tmp_path, [QVH_OK, "{not json"])
    with pytest.raises(AnnotationError, match=r":2: invalid JSON"):
        load_annotations(path, "qvhighlights")
    path = _write(tmp_path, [QVH_OK, "", QVH_OK], "dup.jsonl")
    with pytest.raises(AnnotationError, match="duplicate qid") as err:
        load_annotations(path, "qvhighlights")
    assert err.value.line == 3  # blank lines still count


def test_tvsum_validation(tmp_path: Path) -> None:
    row = {
        "qid": "v1",
        "query": "t",
        "duration": 2,
        "vid": "v1",
        "relevant_clip_ids": None,
        "relevant_windows": None,
        "label": [[1.0] * 20, [5.0] * 20],
        "domain": "BK",
    }
    parse_annotation(row, "tvsum")
    with pytest.raises(AnnotationError, match="domain"):
        parse_annotation({**row, "domain": "XX"}, "tvsum")
    with pytest.raises(AnnotationError, match="label"):
        parse_annotation({**row, "label": [[1.0] * 19, [5.0] * 19]}, "tvsum")
    with pytest.raises(AnnotationError, match="1..5"):
        parse_annotation({**row, "label": [[0.0] * 20, [5.0] * 20]}, "tvsum")
    with pytest.raises(AnnotationError, match="duration says 3"):
        parse_annotation({**row, "duration": 3}, "tvsum")


def test_charades_needs_one_window() -> None:
    row = {"qid": 5, "query": "q", "duration": 30.0, "vid": "X", "relevant_windows": [[1, 2]]}
    parse_annotation(row, "charades")
    with pytest.raises(AnnotationError, match="exactly one window"):
        parse_annotation({**row, "relevant_windows": [[1, 2], [3, 4]]}, "charades")


def test_qvh_targets_hand_computed() -> None:
    ann = parse_annotation(QVH_OK, "qvhighlights")
    t = build_targets(ann, ctx_l=10, rng=np.random.default_rng(0))
    # window [4, 10] s over 10 clips x 2 s = 20 s -> [0.2, 0.5] -> center 0.35, width 0.3
    np.testing.assert_allclose(t.spans, [[0.35, 0.3]], atol=1e-6)
    np.testing.assert_array_equal(t.saliency_labels, [0, 0, 3, 12, 6, 0, 0, 0, 0, 0])
    assert t.pos_idx[0] == 3 and t.neg_idx[0] == 2  # hard pair: highest / lowest sum
    assert t.pos_idx[1] in (2, 3, 4) and t.neg_idx[1] not in (2, 3, 4)
    assert t.pos_idx.dtype == np.int64 and t.pos_idx.shape == (2,)


def test_qvh_all_clips_relevant_reuses_hard_pair() -> None:
    row = {**QVH_OK, "duration": 6, "relevant_clip_ids": [0, 1, 2], "relevant_windows": [[0, 6]]}
    t = build_targets(parse_annotation(row, "qvhighlights"), 3, np.random.default_rng(0))
    np.testing.assert_array_equal(t.pos_idx, [1, 1])
    np.testing.assert_array_equal(t.neg_idx, [0, 0])


def test_window_subsampling_keeps_five_reproducibly() -> None:
    windows = [(2.0 * i, 2.0 * i + 1) for i in range(7)]
    a = span_targets(windows, 75, 2.0, np.random.default_rng(3))
    b = span_targets(windows, 75, 2.0, np.random.default_rng(3))
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, b)
    all_spans = span_targets(windows, 75, 2.0, np.random.default_rng(0), max_windows=10)
    assert {tuple(r) for r in a.tolist()} <= {tuple(r) for r in all_spans.tolist()}


def test_charades_window_labels_and_pairs() -> None:
    row = {"qid": 5, "query": "q", "duration": 30.0, "vid": "X", "relevant_windows": [[4.3, 10.7]]}
    ann = parse_annotation(row, "charades")
    for seed in range(5):
        t = build_targets(ann, ctx_l=30, rng=np.random.default_rng(seed))
        # clip_len' = 1 s: st = 4, ed = min(10, 30) - 1 = 9
        expected = np.zeros(30)
        expected[4:10] = 1
        np.testing.assert_array_equal(t.saliency_labels, expected)
        assert len(set(t.pos_idx.tolist())) == 2 and all(4 <= i <= 9 for i in t.pos_idx)
        assert all(i < 4 or i > 9 for i in t.neg_idx)
    np.testing.assert_allclose(t.spans, [[(4.3 + 10.7) / 60, 6.4 / 30]], atol=1e-6)
    short = parse_annotation({**row, "relevant_windows": [[0.2, 1.5]]}, "charades")
    t = build_targets(short, ctx_l=30, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(t.pos_idx, [0, 0])  # st == ed: the start twice
    assert t.saliency_labels.sum() == 1


def test_tvsum_targets_hand_computed() -> None:
    row = {
        "qid": "v",
        "query": "t",
        "duration": 3,
        "vid": "v",
        "label": [[1.0] * 20, [5.0] * 20, [3.0] * 20],
        "domain": "GA",
    }
    t = build_targets(parse_annotation(row, "tvsum"), ctx_l=4, rng=np.random.default_rng(0))
    # agg = sum(score - 1): 0, 80, 40 -> /80*12 = 0, 12, 6; zero-padded to ctx_l
    np.testing.assert_allclose(t.saliency_labels, [0, 12, 6, 0])
    assert t.spans.shape == (0, 2)
    np.testing.assert_array_equal(t.pos_idx, [1])
    np.testing.assert_array_equal(t.neg_idx, [0])
