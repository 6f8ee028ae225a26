"""Synthetic official-layout data: valid annotations, deterministic, and a planted signal that a
text-conditioned model can learn while a text-blind one cannot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vl.config import TVSUM_DOMAINS
from vl.data.annotations import load_annotations
from vl.data.features import (
    l2_normalize,
    load_text_set,
    load_video_set,
    parse_feature_dirs,
)
from vl.data.synthetic import SyntheticConfig, generate, main

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DIMS = {"slowfast": 24, "clip": 16, "blip": 8}


@pytest.fixture(scope="module")
def qvh(tmp_path_factory: pytest.TempPathFactory):
    return generate(SyntheticConfig("qvhighlights", videos=150, seed=0, dims=DIMS),
                    tmp_path_factory.mktemp("qvh"))  # fmt: skip


def _features(layout, anns):
    vdirs = parse_feature_dirs(layout.video_arg(), "video")
    tdirs = parse_feature_dirs(layout.text_arg(), "text")
    out = []
    for a in anns:
        v = np.concatenate([l2_normalize(load_video_set(d, a.vid)) for d in vdirs], axis=1)
        t = np.concatenate([l2_normalize(load_text_set(d, a.qid, a.dataset)) for d in tdirs], 1)
        out.append((v, t))
    return out


def _iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def _r1_at_05(layout, W: np.ndarray, anns, feats, shuffle_text: bool = False) -> float:
    """Predict one window per query: the above-threshold run of clips around the best clip."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(anns)) if shuffle_text else np.arange(len(anns))
    hits = 0
    for a, (v, _), k in zip(anns, feats, order, strict=True):
        t = feats[k][1]
        score = v @ (W @ t.mean(axis=0))
        best = int(np.argmax(score))
        thr = (score.max() + np.median(score)) / 2
        s = best
        while s > 0 and score[s - 1] > thr:
            s -= 1
        e = best + 1
        while e < len(score) and score[e] > thr:
            e += 1
        pred = (2.0 * s, 2.0 * e)
        hits += any(_iou(pred, w) >= 0.5 for w in a.windows)
    return hits / len(anns)


def test_annotations_are_valid_and_held_out(qvh) -> None:
    train = load_annotations(qvh.train_jsonl, "qvhighlights")  # validates every row
    val = load_annotations(qvh.val_jsonl, "qvhighlights")
    assert (len(train), len(val)) == (240, 60)  # 150 videos x 2 queries, 20 % held out
    assert not {a.vid for a in train} & {a.vid for a in val}
    assert all(a.duration == 150 and 1 <= len(a.windows) <= 3 for a in train + val)
    v, t = _features(qvh, val[:1])[0]
    assert v.shape == (75, 48) and 10 <= t.shape[0] <= 32 and t.shape[1] == 24
    assert {p.name for p in qvh.video_dirs} == {
        "slowfast_features", "clip_features", "blip_video_features",
    }  # fmt: skip


def test_planted_signal_is_learnable_only_from_the_text(qvh) -> None:
    train = load_annotations(qvh.train_jsonl, "qvhighlights")
    val = load_annotations(qvh.val_jsonl, "qvhighlights")
    ftrain, fval = _features(qvh, train), _features(qvh, val)
    # A linear text -> video map fitted by ridge regression on train (pooled text -> mean relevant
    # clip minus mean clip) is the simplest "correct model" of the planted signal.
    X = np.stack([t.mean(axis=0) for _, t in ftrain])
    Y = np.stack([v[list(a.clip_ids)].mean(0) - v.mean(0) for a, (v, _) in zip(train, ftrain,
                  strict=True)])  # fmt: skip
    W = np.linalg.solve(X.T @ X + 1e-2 * np.eye(X.shape[1]), X.T @ Y).T  # (Dv, Dt)
    assert _r1_at_05(qvh, W, val, fval) >= 0.85
    assert _r1_at_05(qvh, W, val, fval, shuffle_text=True) <= 0.35


def test_saliency_follows_planted_strength(qvh) -> None:
    """Annotator sums are derived from the planted strength: relevant clips never score 0 sums
    in a majority, and peak clips score higher than window edges on average."""
    anns = load_annotations(qvh.train_jsonl, "qvhighlights")
    sums = np.array([sum(s) for a in anns for s in a.saliency])
    assert sums.mean() > 4 and (sums > 0).mean() > 0.95 and sums.max() <= 12


def test_deterministic_in_seed(tmp_path: Path) -> None:
    cfg = SyntheticConfig("charades", videos=4, seed=7, dims=DIMS)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    assert a.train_jsonl.read_text() == b.train_jsonl.read_text()
    vid = json.loads(a.train_jsonl.read_text().splitlines()[0])["vid"]
    x = np.load(tmp_path / "a" / "clip_features" / f"{vid}.npz")["features"]
    y = np.load(tmp_path / "b" / "clip_features" / f"{vid}.npz")["features"]
    np.testing.assert_array_equal(x, y)
    c = generate(SyntheticConfig("charades", videos=4, seed=8, dims=DIMS), tmp_path / "c")
    assert c.train_jsonl.read_text() != a.train_jsonl.read_text()
    rows = load_annotations(a.train_jsonl, "charades") + load_annotations(a.val_jsonl, "charades")
    assert all(20 <= r.duration <= 40 and len(r.windows) == 1 for r in rows)


def test_tvsum_shape(tmp_path: Path) -> None:
    main(["--dataset", "tvsum", "--out", str(tmp_path), "--dims", "i3d=8,slowfast=8,clip=8,blip=8"])
    train = load_annotations(tmp_path / "tvsum_train.jsonl", "tvsum")
    val = load_annotations(tmp_path / "tvsum_val.jsonl", "tvsum")
    assert len(train) == 40 and len(val) == 10
    for d in TVSUM_DOMAINS:
        assert sum(a.domain == d for a in train) == 4 and sum(a.domain == d for a in val) == 1
    a = train[0]
    assert a.qid == a.vid and a.label.shape == (a.duration, 20)
    rgb = np.load(tmp_path / "video_features" / f"{a.vid}_rgb.npy")
    assert rgb.shape == (a.duration, 4)
    assert np.load(tmp_path / "query_features" / f"{a.qid}.npz")["token"].shape[1] == 8


def test_plants_into_real_annotations(tmp_path: Path) -> None:
    real = SHARED_DATA / "highlight_val_release.jsonl"
    if not real.is_file():
        pytest.skip(f"{real} not available")
    layout = generate(SyntheticConfig("qvhighlights", videos=3, dims=DIMS), tmp_path, real)
    rows = [json.loads(x) for x in layout.train_jsonl.read_text().splitlines()]
    real_rows = [json.loads(x) for x in real.read_text().splitlines()]
    vids = list(dict.fromkeys(r["vid"] for r in real_rows))[:3]
    assert rows == [r for r in real_rows if r["vid"] in vids]
    anns = load_annotations(layout.train_jsonl, "qvhighlights")
    (v, t), *_ = _features(layout, anns)
    assert v.shape[0] == 75 and t.shape[0] == min(32, len(anns[0].query.split()) + 2)
