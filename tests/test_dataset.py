"""Streaming shard dataset: collation, rank/worker split, seeded shuffle and targets, S3 cache."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.shard import run as shard_run
from vl.data.annotations import Targets, load_annotations
from vl.data.dataset import (
    Sample,
    ShardDataset,
    _ShardPrefetcher,
    collate,
    make_loader,
    read_annotations,
)
from vl.data.features import l2_normalize, load_text_set, load_video_set, parse_feature_dirs
from vl.data.synthetic import SyntheticConfig, generate
from vl.storage import filesystem

torch.set_num_threads(1)


def _convert(layout, out: str, jsonl: Path, **kw) -> None:
    shard_run(
        dataset=layout.dataset,
        annotations=str(jsonl),
        video_features=layout.video_arg(),
        text_features=layout.text_arg(),
        out=out,
        ray_mode="off",
        log=lambda *_: None,
        **kw,
    )


@pytest.fixture(scope="module")
def qvh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("qvh")
    layout = generate(SyntheticConfig("qvhighlights", videos=20, seed=1, dims={"slowfast": 24,
                      "clip": 16, "blip": 8}), root / "raw")  # fmt: skip
    out = str(root / "shards")
    _convert(layout, out, layout.train_jsonl, rows_per_shard=6, row_group_rows=4)
    return layout, out


def _sample(L: int, Lq: int, n_windows: int, P: int = 2) -> Sample:
    return Sample(
        qid=L, vid="v", query="q", duration=2.0 * L, clip_len=2.0, has_spans=True,
        video=[np.full((L, 3), 0.5, np.float16), np.ones((L, 2), np.float32)],
        text=[np.full((Lq, 4), 2.0, np.float32)],
        targets=Targets(spans=np.full((n_windows, 2), 0.25, np.float32),
                        saliency_labels=np.arange(L, dtype=np.float32),
                        pos_idx=np.zeros(P, np.int64), neg_idx=np.ones(P, np.int64)),
    )  # fmt: skip


def test_collate_pads_masks_and_tef() -> None:
    b = collate([_sample(3, 2, 1), _sample(2, 4, 2)])
    assert b.video.shape == (2, 3, 3 + 2 + 2) and b.text.shape == (2, 4, 4)
    assert b.video.dtype == torch.float32
    torch.testing.assert_close(b.video_mask, torch.tensor([[1.0, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(b.text_mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]]))
    # TEF for L=3: (0, 1/3), (1/3, 2/3), (2/3, 1); for L=2: (0, .5), (.5, 1), then zero padding
    torch.testing.assert_close(b.video[0, :, 5:], torch.tensor([[0, 1 / 3], [1 / 3, 2 / 3],
                                                                [2 / 3, 1.0]]))  # fmt: skip
    torch.testing.assert_close(b.video[1, :, 5:], torch.tensor([[0, 0.5], [0.5, 1.0], [0, 0]]))
    assert torch.all(b.video[1, 2] == 0) and torch.all(b.video[0, :, :3] == 0.5)
    assert b.span_targets.shape == (2, 2, 2)
    assert b.span_mask.tolist() == [[True, False], [True, True]]
    assert torch.all(b.span_targets[0, 1] == 0)
    torch.testing.assert_close(b.saliency_labels, torch.tensor([[0.0, 1, 2], [0, 1, 0]]))
    assert b.saliency_pos_idx.shape == (2, 2) and b.saliency_pos_idx.dtype == torch.int64
    assert b.qids == [3, 2] and b.has_spans and b.clip_len == 2.0 and b.durations == [6.0, 4.0]


def test_rank_split_is_a_partition(qvh) -> None:
    layout, out = qvh
    all_qids = {a.qid for a in load_annotations(layout.train_jsonl, "qvhighlights")}
    seen = []
    for rank in range(2):
        ds = ShardDataset(out, rank=rank, world_size=2, equal_per_rank=False, buffer_size=4)
        got = [s.qid for s in ds]
        assert len(got) == len(ds)
        seen += got
    assert sorted(seen) == sorted(all_qids) and len(seen) == len(set(seen))
    # equal_per_rank: every rank yields the same count, without duplicates
    lens = {len(list(ShardDataset(out, rank=r, world_size=3))) for r in range(3)}
    assert len(lens) == 1 and lens.pop() == len(ShardDataset(out, rank=0, world_size=3))


def test_shuffle_is_seeded_per_epoch(qvh) -> None:
    _, out = qvh
    ds = ShardDataset(out, seed=5, buffer_size=8)
    e0 = [s.qid for s in ds]
    assert e0 == [s.qid for s in ShardDataset(out, seed=5, buffer_size=8)]
    ds.set_epoch(1)
    e1 = [s.qid for s in ds]
    assert sorted(e0) == sorted(e1) and e0 != e1
    plain = [s.qid for s in ShardDataset(out, shuffle=False)]
    assert plain == sorted(plain, key=lambda q: [s.qid for s in ShardDataset(out, shuffle=False)]
                           .index(q))  # fmt: skip
    assert e0 != plain


def test_targets_depend_on_seed_epoch_qid_not_layout(qvh) -> None:
    _, out = qvh

    def pairs(loader_or_ds):
        got = {}
        for item in loader_or_ds:
            items = zip(item.qids, item.saliency_pos_idx.tolist(), item.saliency_neg_idx.tolist(),
                        strict=True) if hasattr(item, "qids") else [
                (item.qid, item.targets.pos_idx.tolist(), item.targets.neg_idx.tolist())]
            for q, p, n in items:
                got[q] = (tuple(p), tuple(n))
        return got

    a = pairs(ShardDataset(out, seed=3, buffer_size=4))
    loader = make_loader(out, 5, seed=3, num_workers=2, buffer_size=2)
    b = pairs(loader)
    assert a == b
    ds = ShardDataset(out, seed=3)
    ds.set_epoch(1)
    c = pairs(ds)
    assert a.keys() == c.keys() and a != c  # the easy pairs are re-drawn per epoch


def test_loader_with_workers_yields_every_sample_once(qvh) -> None:
    layout, out = qvh
    loader = make_loader(out, 4, num_workers=2, seed=0, buffer_size=3)
    counts = Counter(q for b in loader for q in b.qids)
    expected = {a.qid for a in load_annotations(layout.train_jsonl, "qvhighlights")}
    assert set(counts) == expected and set(counts.values()) == {1}


def test_batch_features_match_official_npz(qvh) -> None:
    layout, out = qvh
    ds = ShardDataset(out, shuffle=False)
    b = collate(list(ds)[:4])
    vdirs = parse_feature_dirs(layout.video_arg(), "video")
    tdirs = parse_feature_dirs(layout.text_arg(), "text")
    for i, (qid, vid) in enumerate(zip(b.qids, b.vids, strict=True)):
        v = np.concatenate([l2_normalize(load_video_set(d, vid, 75)) for d in vdirs], axis=1)
        t = np.concatenate([l2_normalize(load_text_set(d, qid, "qvhighlights")) for d in tdirs],
                           axis=1)  # fmt: skip
        L, Lq = int(b.video_mask[i].sum()), int(b.text_mask[i].sum())
        assert (L, Lq) == (len(v), len(t))
        np.testing.assert_allclose(b.video[i, :L, :-2].numpy(), v, atol=2e-3)
        np.testing.assert_allclose(b.text[i, :Lq].numpy(), t, atol=2e-3)
    assert b.video.shape[-1] == ds.video_dim == 24 + 16 + 8 + 2 and ds.text_dim == 16 + 8


def test_feature_subset_and_annotations(qvh) -> None:
    layout, out = qvh
    ds = ShardDataset(out, video_features=["slowfast", "clip"], text_features=["clip"])
    s = next(iter(ds))
    assert [v.shape[1] for v in s.video] == [24, 16] and [t.shape[1] for t in s.text] == [16]
    with pytest.raises(ValueError, match="not in the shards"):
        ShardDataset(out, video_features=["i3d"])
    rows = [json.loads(line) for line in layout.train_jsonl.read_text().splitlines()]
    assert sorted(read_annotations(out), key=lambda r: r["qid"]) == sorted(
        rows, key=lambda r: r["qid"]
    )


def test_tvsum_batches_have_no_spans(tmp_path: Path) -> None:
    layout = generate(SyntheticConfig("tvsum", videos=2, seed=0, dims={"i3d": 8, "slowfast": 8,
                      "clip": 8, "blip": 8}), tmp_path / "raw")  # fmt: skip
    out = str(tmp_path / "shards")
    _convert(layout, out, layout.train_jsonl, rows_per_shard=4)
    ds = ShardDataset(out, domain="GA", max_v_l=1000)
    assert len(ds) == 1
    b = collate(list(ds))
    assert not b.has_spans and not b.span_mask.any() and torch.all(b.span_targets == 0)
    assert b.saliency_pos_idx.shape == (1, 1) and b.saliency_labels.max() <= 12
    assert b.queries[0].startswith("GA ")


@pytest.mark.integration
def test_s3_shards_are_cached_locally(qvh, s3_env, tmp_path: Path) -> None:
    layout, _ = qvh
    out = "s3://vl-data/test_dataset/qvh"
    _convert(layout, out, layout.train_jsonl, rows_per_shard=8)
    cache = tmp_path / "cache"
    first = [s.qid for s in ShardDataset(out, cache_dir=cache, seed=2)]
    assert sorted(first) == sorted(a.qid for a in load_annotations(layout.train_jsonl,
                                                                   "qvhighlights"))  # fmt: skip
    assert len(list(cache.glob("*.parquet"))) == -(-layout.num_train // 8)  # one file per shard
    # With the shard objects gone, a new dataset still streams from the local cache.

    fs, path = filesystem(out)
    for f in fs.ls(path):
        if f.endswith(".parquet"):
            fs.rm(f)
    again = [s.qid for s in ShardDataset(out, cache_dir=cache, seed=2)]
    assert again == first


def test_shard_prefetcher_fetches_ahead_in_first_use_order_and_reraises():

    started: list[int] = []
    release = threading.Event()

    def fetch(shard: int) -> Path:
        started.append(shard)
        if shard == 9:
            raise OSError("checksum mismatch for shard 9")
        release.wait(5)
        return Path(f"/cache/{shard}")

    with _ShardPrefetcher(fetch, [3, 1, 3, 7, 9], remote=True, ahead=2) as shards:
        # two downloads queued ahead of the reader (one thread: the first runs, the second waits)
        assert list(shards.futures) == [3, 1]
        release.set()
        assert shards.get(3) == Path("/cache/3")
        assert list(shards.futures) == [1, 7]  # topped up in first-use order, each shard once
        assert shards.get(1) == Path("/cache/1")
        assert shards.get(3) == Path("/cache/3")  # used again later: fetched directly (cached)
        assert shards.get(7) == Path("/cache/7")
        with pytest.raises(OSError, match="shard 9"):
            shards.get(9)
    assert started[:3] == [3, 1, 7] and started.count(9) == 1
    with _ShardPrefetcher(fetch, [1, 2], remote=False) as local:  # local sets: no thread
        assert local.pool is None and local.get(2) == Path("/cache/2")


def _assert_batches_identical(got, want) -> None:
    for name in ("video", "video_mask", "text", "text_mask", "span_targets", "span_mask",
                 "saliency_labels", "saliency_pos_idx", "saliency_neg_idx"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name  # bit for bit: float16 -> float32 is exact
    assert got.video_tef is None and (got.qids, got.vids) == (want.qids, want.vids)


def test_half_batch_widens_to_the_float32_batch_bit_for_bit(qvh) -> None:
    _, out = qvh
    samples = list(ShardDataset(out, shuffle=False))[:5]  # varying lengths: padding is exercised
    full = collate(samples)
    half = collate(samples, half=True)
    assert half.is_half and half.video.dtype == half.text.dtype == torch.float16
    assert half.video.shape[-1] == full.video.shape[-1] - 2  # the TEF travels in float32 beside
    assert half.video.element_size() * half.video.numel() < full.video.nbytes / 1.9
    _assert_batches_identical(half.to("cpu"), full)


def test_half_batches_from_loader_workers_widen_to_the_float32_batches(qvh) -> None:
    _, out = qvh
    full = list(make_loader(out, 4, num_workers=2, seed=5, buffer_size=3))
    half = list(make_loader(out, 4, num_workers=2, seed=5, buffer_size=3, half_batches=True))
    assert len(half) == len(full) and all(b.is_half for b in half)
    for h, f in zip(half, full, strict=True):
        _assert_batches_identical(h.to("cpu"), f)


def test_persistent_workers_follow_set_epoch(qvh) -> None:
    _, out = qvh

    def epoch_of(batches_or_samples) -> dict:
        got = {}
        for b in batches_or_samples:
            for q, p in zip(b.qids, b.saliency_pos_idx.tolist(), strict=True):
                got[q] = tuple(p)
        return got

    loader = make_loader(out, 4, num_workers=2, seed=2, buffer_size=3)
    assert loader.persistent_workers
    first = epoch_of(loader)
    workers = loader._iterator._workers  # the same processes serve the next epoch
    loader.dataset.set_epoch(1)
    second = epoch_of(loader)
    assert loader._iterator._workers is workers
    in_process = ShardDataset(out, seed=2, buffer_size=3, epoch=1)
    assert second == epoch_of([collate(list(in_process))]) and second != first
