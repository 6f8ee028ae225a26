"""Parquet feature shards: schema, writer, reader and the manifest that describes a shard set.

Why this format: the official release is one small .npz per video and per query per feature set
(hundreds of thousands of files), which object stores and network file systems serve slowly.
A shard holds one row per query sample with *all* the features that sample needs (its video's
clips and its query's tokens), so any shard can be read alone and a rank only downloads its own
files. Features are L2-normalised per clip / per token *before* the float16 cast (the cast then
keeps ~3 significant digits of unit-norm vectors) and stored as raw little-endian float16 blobs,
one column per feature set, so a reader picks the sets it needs column by column and decodes a
row with one `np.frombuffer`. Row groups of a few dozen rows bound a streaming reader's memory.

Layout of a shard set at URI (a local directory or s3://bucket/prefix):
  URI/manifest.json          written last; its presence means the set is complete
  URI/shard-00000-<digest>.parquet  content-addressed (jobs.shard): new bytes, new name
  URI/_parts/shard-00000.json  per-shard completion record (lets a re-run skip finished shards)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vl.private import private_dir
from vl.storage import filesystem, is_remote, join_uri, read_bytes, sha256_file, write_bytes

SCHEMA_VERSION = 1
FORMAT_NAME = "videolights-feature-shards"
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
DEFAULT_ROW_GROUP_ROWS = 32
DEFAULT_ROWS_PER_SHARD = 256
NORMALIZATION = "l2 per clip / per token, x / (||x|| + 1e-5), applied before the float16 cast"


# --- manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """A stored feature set: name (e.g. "slowfast") and per-clip / per-token dimension."""

    name: str
    dim: int


@dataclass
class ShardInfo:
    """One shard file as the manifest records it."""

    path: str  # relative to the shard-set URI
    num_rows: int
    num_row_groups: int
    bytes: int
    sha256: str
    qids_sha256: str  # digest of the shard's inputs (rows, feature bytes, settings): a re-run
    # only skips a shard whose inputs are identical

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ShardInfo:
        return ShardInfo(**{k: d[k] for k in ShardInfo.__dataclass_fields__})


@dataclass
class ShardManifest:
    """Everything a reader needs to know before opening a shard."""

    dataset: str
    clip_len: float
    video_features: list[FeatureSpec]
    text_features: list[FeatureSpec]
    shards: list[ShardInfo] = field(default_factory=list)
    dtype: str = "float16"
    normalized: str = NORMALIZATION
    compression: str = "zstd"
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    max_v_l: int | None = None
    max_q_l: int | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    created_unix: float = field(default_factory=time.time)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def input_widths(self, video_sets: Sequence[str], text_sets: Sequence[str]) -> tuple[int, int]:
        """(model.video_dim, model.text_dim) of the chosen feature sets: their stored widths
        summed, without the TEF dims the loader appends. The one place a model's input widths
        come from the data; ValueError names any set the shards do not hold."""
        widths = []
        for modality, wanted, stored in (("video", video_sets, self.video_features),
                                         ("text", text_sets, self.text_features)):  # fmt: skip
            dims = {f.name: f.dim for f in stored}
            missing = [w for w in wanted if w not in dims]
            if missing:
                raise ValueError(f"{modality} feature sets {missing} are not in the shards (they "
                                 f"hold {sorted(dims)}); fix data.{modality}_features")
            widths.append(sum(dims[w] for w in wanted))
        return widths[0], widths[1]

    def to_json(self) -> str:
        d = asdict(self)
        d["num_rows"] = self.num_rows
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str, where: str = "manifest") -> ShardManifest:
        d = json.loads(text)
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"{where}: not a {FORMAT_NAME} manifest (format={d.get('format')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{where}: schema_version {d.get('schema_version')} is not supported "
                f"(this code reads {SCHEMA_VERSION}); re-run jobs.shard"
            )
        return ShardManifest(
            dataset=d["dataset"],
            clip_len=float(d["clip_len"]),
            video_features=[FeatureSpec(**f) for f in d["video_features"]],
            text_features=[FeatureSpec(**f) for f in d["text_features"]],
            shards=[ShardInfo.from_dict(s) for s in d["shards"]],
            dtype=d["dtype"],
            normalized=d["normalized"],
            compression=d["compression"],
            row_group_rows=d["row_group_rows"],
            max_v_l=d.get("max_v_l"),
            max_q_l=d.get("max_q_l"),
            skipped=d.get("skipped", []),
            created_unix=d.get("created_unix", 0.0),
        )


def read_manifest(uri: str) -> ShardManifest:
    """The manifest of the shard set at `uri` (a directory / prefix, or the manifest itself)."""
    manifest_uri = uri if uri.endswith(".json") else join_uri(uri, MANIFEST_NAME)
    try:
        text = read_bytes(manifest_uri).decode()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no shard manifest at {manifest_uri}: the shard set is missing or its conversion "
            "did not finish (run python -m jobs.shard)"
        ) from None
    return ShardManifest.from_json(text, where=manifest_uri)


def write_manifest(uri: str, manifest: ShardManifest) -> None:
    write_bytes(join_uri(uri, MANIFEST_NAME), manifest.to_json().encode())


# --- schema and rows ----------------------------------------------------------------------------


def video_column(name: str) -> str:
    return f"video_{name}"


def text_column(name: str) -> str:
    return f"text_{name}"


META_COLUMNS = ("qid", "vid", "query", "duration", "domain", "annotation", "n_clips", "n_tokens")


def shard_schema(video: list[FeatureSpec], text: list[FeatureSpec]) -> pa.Schema:
    """One row per query sample. Feature columns hold float16 (n_clips|n_tokens, dim) blobs."""
    fields = [
        pa.field("qid", pa.string()),  # str(qid); the typed qid is in `annotation`
        pa.field("vid", pa.string()),
        pa.field("query", pa.string()),
        pa.field("duration", pa.float64()),
        pa.field("domain", pa.string()),
        pa.field("annotation", pa.string()),  # the original JSONL row, verbatim JSON
        pa.field("n_clips", pa.int32()),
        pa.field("n_tokens", pa.int32()),
    ]
    for f in video:
        fields.append(pa.field(video_column(f.name), pa.binary(), metadata={"dim": str(f.dim)}))
    for f in text:
        fields.append(pa.field(text_column(f.name), pa.binary(), metadata={"dim": str(f.dim)}))
    return pa.schema(
        fields, metadata={"format": FORMAT_NAME, "schema_version": str(SCHEMA_VERSION)}
    )


@dataclass
class ShardRow:
    """One sample to write: normalised float32/float16 features per set plus its annotation."""

    qid: int | str
    vid: str
    query: str
    duration: float
    annotation: dict[str, Any]
    video: dict[str, np.ndarray]  # set name -> (n_clips, dim), all sets the same n_clips
    text: dict[str, np.ndarray]  # set name -> (n_tokens, dim)
    domain: str | None = None


class ShardWriter:
    """Streams ShardRows into one local Parquet file, one row group per `row_group_rows` rows.

    Only one row group is ever held in memory, which is what keeps a whole-dataset conversion
    at a bounded RSS.
    """

    def __init__(
        self,
        path: str | Path,
        video: list[FeatureSpec],
        text: list[FeatureSpec],
        *,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        compression: str = "zstd",
        compression_level: int | None = 1,
    ) -> None:
        self.path = Path(path)
        self.video = list(video)
        self.text = list(text)
        self.row_group_rows = row_group_rows
        self.schema = shard_schema(self.video, self.text)
        self._writer = pq.ParquetWriter(
            str(self.path),
            self.schema,
            compression=compression,
            compression_level=compression_level if compression == "zstd" else None,
            use_dictionary=["vid", "domain"],
            write_statistics=["qid", "vid", "n_clips", "n_tokens"],
        )
        self._buffer: list[ShardRow] = []
        self.num_rows = 0
        self.num_row_groups = 0

    def add(self, row: ShardRow) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def _encode(self, rows: list[ShardRow]) -> pa.Table:
        cols: dict[str, list[Any]] = {c: [] for c in self.schema.names}
        for r in rows:
            n_clips = _common_length(r.video, "video", r.qid)
            n_tokens = _common_length(r.text, "text", r.qid)
            cols["qid"].append(str(r.qid))
            cols["vid"].append(r.vid)
            cols["query"].append(r.query)
            cols["duration"].append(float(r.duration))
            cols["domain"].append(r.domain)
            cols["annotation"].append(json.dumps(r.annotation, separators=(",", ":")))
            cols["n_clips"].append(n_clips)
            cols["n_tokens"].append(n_tokens)
            for f in self.video:
                cols[video_column(f.name)].append(_blob(r.video, f, r.qid, "video"))
            for f in self.text:
                cols[text_column(f.name)].append(_blob(r.text, f, r.qid, "text"))
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = self._encode(self._buffer)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self.num_rows += len(self._buffer)
        self.num_row_groups += 1
        self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _common_length(arrays: dict[str, np.ndarray], modality: str, qid: int | str) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"qid {qid!r}: {modality} sets differ in length {lengths}; truncate first")
    n = next(iter(lengths.values()))
    if n < 1:
        raise ValueError(f"qid {qid!r}: empty {modality} features")
    return n


def _blob(arrays: dict[str, np.ndarray], spec: FeatureSpec, qid: int | str, modality: str) -> bytes:
    if spec.name not in arrays:
        raise KeyError(f"qid {qid!r}: {modality} feature set {spec.name!r} missing from the row")
    a = arrays[spec.name]
    if a.ndim != 2 or a.shape[1] != spec.dim:
        raise ValueError(
            f"qid {qid!r}: {modality} set {spec.name!r} has shape {a.shape}, "
            f"expected (n, {spec.dim})"
        )
    return np.ascontiguousarray(a, dtype="<f2").tobytes()


def write_shard(
    rows: Iterable[ShardRow],
    base_uri: str,
    name: str,
    video: list[FeatureSpec],
    text: list[FeatureSpec],
    *,
    qids_sha256: str = "",
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    compression: str = "zstd",
    tmp_dir: str | None = None,
) -> ShardInfo:
    """Write `rows` to `base_uri/name` (local or S3) and return its manifest entry.

    The file is built in a local temp dir, hashed, then copied in one upload: an object appears
    on S3 only complete, and the checksum describes exactly the bytes uploaded.
    """
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="vl-shard-") as td:
        local = Path(td) / name
        with ShardWriter(
            local, video, text, row_group_rows=row_group_rows, compression=compression
        ) as w:
            for r in rows:
                w.add(r)
        info = ShardInfo(
            path=name,
            num_rows=w.num_rows,
            num_row_groups=w.num_row_groups,
            bytes=local.stat().st_size,
            sha256=sha256_file(local),
            qids_sha256=qids_sha256,
        )
        dest = join_uri(base_uri, name)
        fs, path = filesystem(dest)
        if is_remote(dest):
            fs.put_file(str(local), path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(str(local), path)
    return info


# --- reading ------------------------------------------------------------------------------------


class ShardCorruptError(OSError):
    """A shard's bytes do not match its manifest checksum, or do not decode."""


# Files whose sha256 this process has checked, keyed by (path, size, mtime_ns): each file is
# hashed on its first use per process, not on every open (a process-lifetime memo, not config).
_VERIFIED: set[tuple[str, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def verify_shard(path: Path, info: ShardInfo, where: str) -> bool:
    """True when `path` holds the manifest's bytes (size and sha256), checked once per process."""
    if not path.is_file():
        return False
    stamp = _stamp(path)
    if stamp in _VERIFIED:
        return True
    if stamp[1] != info.bytes or (info.sha256 and sha256_file(path) != info.sha256):
        return False
    _VERIFIED.add(stamp)
    return True


def fetch_shard(base_uri: str, info: ShardInfo, cache_dir: str | Path | None) -> Path:
    """A local path for the shard, its checksum verified on first use in this process: the file
    itself when local, else a cached download.

    A cached entry whose bytes no longer match (a flipped bit, a truncated file) is evicted and
    fetched again; a local shard set that does not match its manifest raises ShardCorruptError.
    Downloads go to a temp name and are renamed into place after the sha256 check, so several
    DataLoader workers or ranks sharing a cache directory never read a partial file.
    """
    uri = join_uri(base_uri, info.path)
    if not is_remote(uri):
        local = Path(filesystem(uri)[1])
        if not verify_shard(local, info, uri):
            raise ShardCorruptError(f"shard {uri} does not match its manifest (size or sha256): "
                                    "rewrite the shard set with python -m jobs.shard")
        return local
    if cache_dir is None:
        cache_dir = private_dir(default_cache_dir())
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    local = cache_dir / f"{info.sha256[:24]}-{Path(info.path).name}"
    if verify_shard(local, info, uri):
        return local
    if local.exists():
        local.unlink(missing_ok=True)  # a bad cached copy: evict it and fetch again
    fs, path = filesystem(uri)
    tmp = cache_dir / f".{local.name}.{os.getpid()}.{time.monotonic_ns()}.part"
    try:
        fs.get_file(path, str(tmp))
        digest = sha256_file(tmp)
        if digest != info.sha256:
            raise ShardCorruptError(f"checksum mismatch for shard {uri}: got {digest}, manifest "
                                    f"says {info.sha256}")
        os.replace(tmp, local)
        _VERIFIED.add(_stamp(local))
    finally:
        if tmp.exists():
            tmp.unlink()
    return local


def default_cache_dir() -> Path:
    """This user's cache for downloaded shards: $VL_SHARD_CACHE, else
    $XDG_CACHE_HOME/videolights/shards (~/.cache/...), else /tmp/vl-shard-cache-<uid>.

    Never one path shared by all users: fetch_shard makes the default private (0700, owner
    checked), so another user can neither plant entries nor read what was fetched.
    """
    if os.environ.get("VL_SHARD_CACHE"):
        return Path(os.environ["VL_SHARD_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    existing = base if base.is_dir() else base.parent  # a HOME without .cache yet is fine
    if base.is_absolute() and existing.is_dir() and os.access(existing, os.W_OK):
        return base / "videolights" / "shards"
    return Path(tempfile.gettempdir()) / f"vl-shard-cache-{os.geteuid()}"


def decode_features(blob: bytes | np.ndarray, n: int, dim: int) -> np.ndarray:
    """A stored feature blob (bytes or a uint8 array view) -> (n, dim) float16 view, no copy."""
    if isinstance(blob, np.ndarray):
        return blob.view("<f2").reshape(n, dim)
    return np.frombuffer(blob, dtype="<f2").reshape(n, dim)


def read_column(base_uri: str, column: str, cache_dir: str | Path | None = None) -> list[Any]:
    """One column of every shard in manifest order (e.g. "annotation" for evaluation)."""
    manifest = read_manifest(base_uri)
    out: list[Any] = []
    for info in manifest.shards:
        uri = join_uri(base_uri, info.path)
        if is_remote(uri) and cache_dir is None:
            fs, path = filesystem(uri)
            with fs.open(path, "rb") as f:
                out.extend(pq.read_table(f, columns=[column]).column(column).to_pylist())
        else:
            local = fetch_shard(base_uri, info, cache_dir)
            out.extend(pq.read_table(str(local), columns=[column]).column(column).to_pylist())
    return out


def read_annotations(base_uri: str, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The original annotation rows (official GT JSONL objects) stored in a shard set."""
    return [json.loads(s) for s in read_column(base_uri, "annotation", cache_dir)]
