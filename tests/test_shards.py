"""Parquet shard format: round trip, manifest, checksums, local and real-S3 storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vl.data.dataset import ShardDataset
from vl.data.features import l2_normalize
from vl.data.shards import (
    FeatureSpec,
    ShardCorruptError,
    ShardManifest,
    ShardRow,
    decode_features,
    fetch_shard,
    read_annotations,
    read_manifest,
    write_manifest,
    write_shard,
)
from vl.storage import filesystem

VIDEO = [FeatureSpec("slowfast", 12), FeatureSpec("clip", 8)]
TEXT = [FeatureSpec("clip", 8)]


def _rows(n: int, seed: int = 0) -> list[ShardRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        L, Lq = int(rng.integers(3, 9)), int(rng.integers(2, 6))
        ann = {"qid": i, "query": f"q{i}", "duration": 2.0 * L, "vid": f"v{i // 2}",
               "relevant_windows": [[0, 2]]}  # fmt: skip
        rows.append(
            ShardRow(
                qid=i,
                vid=ann["vid"],
                query=ann["query"],
                duration=ann["duration"],
                annotation=ann,
                video={f.name: l2_normalize(rng.standard_normal((L, f.dim))) for f in VIDEO},
                text={f.name: l2_normalize(rng.standard_normal((Lq, f.dim))) for f in TEXT},
            )
        )
    return rows


def _manifest(infos) -> ShardManifest:
    return ShardManifest(
        dataset="qvhighlights", clip_len=2.0, video_features=VIDEO, text_features=TEXT,
        shards=infos, row_group_rows=4,
    )  # fmt: skip


def test_local_round_trip(tmp_path: Path) -> None:
    rows = _rows(10)
    out = str(tmp_path / "set")
    info = write_shard(rows, out, "shard-00000.parquet", VIDEO, TEXT, row_group_rows=4)
    write_manifest(out, _manifest([info]))
    path = tmp_path / "set" / "shard-00000.parquet"
    assert info.num_rows == 10 and info.num_row_groups == 3  # 4 + 4 + 2
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.bytes == path.stat().st_size
    pf = pq.ParquetFile(path)
    assert pf.num_row_groups == 3
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    table = pf.read()
    for k, r in enumerate(rows):
        n = table["n_clips"][k].as_py()
        got = decode_features(table["video_slowfast"][k].as_py(), n, 12)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, r.video["slowfast"], atol=1e-3)
        assert json.loads(table["annotation"][k].as_py()) == r.annotation
    m = read_manifest(out)
    assert m.num_rows == 10 and m.video_features == VIDEO and m.dtype == "float16"
    assert "before the float16 cast" in m.normalized
    assert read_annotations(out) == [r.annotation for r in rows]


def test_mismatched_lengths_and_dims_are_rejected(tmp_path: Path) -> None:
    row = _rows(1)[0]
    row.video["clip"] = row.video["clip"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        write_shard([row], str(tmp_path), "a.parquet", VIDEO, TEXT)
    row = _rows(1)[0]
    row.text["clip"] = np.zeros((3, 7), np.float32)
    with pytest.raises(ValueError, match=r"expected \(n, 8\)"):
        write_shard([row], str(tmp_path), "b.parquet", VIDEO, TEXT)


def test_manifest_rejects_other_schema_versions(tmp_path: Path) -> None:
    write_manifest(str(tmp_path), _manifest([]))
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema_version 99"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(tmp_path / "nothing"))


@pytest.mark.integration
def test_s3_round_trip_cache_and_checksum(s3_env, tmp_path: Path) -> None:
    out = "s3://vl-data/test_shards/set1"
    rows = _rows(6)
    info = write_shard(rows, out, "shard-00000.parquet", VIDEO, TEXT, row_group_rows=4)
    write_manifest(out, _manifest([info]))
    m = read_manifest(out)
    assert m.shards[0].sha256 == info.sha256
    cache = tmp_path / "cache"
    local = fetch_shard(out, m.shards[0], cache)
    assert local.parent == cache and hashlib.sha256(local.read_bytes()).hexdigest() == info.sha256
    assert read_annotations(out) == [r.annotation for r in rows]
    # The cached copy is reused; a corrupted remote object is caught on a fresh download.
    fs, path = filesystem(out + "/shard-00000.parquet")
    fs.pipe_file(path, b"corrupted" * 10)
    assert fetch_shard(out, m.shards[0], cache) == local
    with pytest.raises(OSError, match="checksum mismatch"):
        fetch_shard(out, m.shards[0], tmp_path / "fresh-cache")
    assert not list((tmp_path / "fresh-cache").iterdir())  # no partial file left behind


@pytest.mark.integration
def test_s3_enforces_credentials(s3_env, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises((PermissionError, OSError)):
        write_shard(_rows(1), "s3://vl-data/test_shards/denied", "a.parquet", VIDEO, TEXT)


def _flip_bit(path: Path, offset: int = -200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.integration
def test_a_corrupted_cache_entry_is_evicted_and_fetched_again(s3_env, tmp_path: Path) -> None:
    """A flipped bit in a cached shard is caught on the next process's first use (here: the
    file changed since it was verified) and the shard is downloaded again."""
    out = "s3://vl-data/test_shards/bitflip"
    info = write_shard(_rows(6), out, "shard-00000.parquet", VIDEO, TEXT, row_group_rows=4)
    write_manifest(out, _manifest([info]))
    cache = tmp_path / "cache"
    local = fetch_shard(out, info, cache)
    _flip_bit(local)
    assert hashlib.sha256(local.read_bytes()).hexdigest() != info.sha256
    again = fetch_shard(out, info, cache)
    assert again == local and hashlib.sha256(again.read_bytes()).hexdigest() == info.sha256


def test_a_local_shard_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "set")
    info = write_shard(_rows(6), out, "shard-00000.parquet", VIDEO, TEXT, row_group_rows=4)
    _flip_bit(tmp_path / "set" / "shard-00000.parquet")
    with pytest.raises(ShardCorruptError, match=r"shard .*shard-00000\.parquet does not match"):
        fetch_shard(out, info, None)


def _rewrite(path: Path, edit) -> dict:
    """Rewrite a shard file through `edit(table) -> table`; its new size and sha256, as a
    manifest entry made for bad bytes would record them."""
    table = edit(pq.read_table(path))
    pq.write_table(table, path, row_group_size=4)
    return {"bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_corrupt_row_names_shard_row_group_and_qid(tmp_path: Path) -> None:
    out = str(tmp_path / "set")
    info = write_shard(_rows(6), out, "shard-00000.parquet", VIDEO, TEXT, row_group_rows=4)

    def longer_first_video(table):  # row 0 claims one clip more than its blobs hold
        n = table.column("n_clips").to_pylist()
        n[0] += 1
        i = table.schema.get_field_index("n_clips")
        return table.set_column(i, table.schema.field(i), pa.array(n, table.schema.field(i).type))

    fixed = _rewrite(tmp_path / "set" / "shard-00000.parquet", longer_first_video)
    info.bytes, info.sha256 = fixed["bytes"], fixed["sha256"]
    write_manifest(out, _manifest([info]))
    with pytest.raises(ShardCorruptError,
                       match=r"shard .*shard-00000\.parquet: row group 0, qid 0: feature blob"):
        list(ShardDataset(out, shuffle=False))
