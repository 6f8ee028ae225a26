"""Streaming dataset over Parquet feature shards: per-rank file split, seeded buffer shuffle,
local shard cache, and collation into the padded `Batch` the model and criterion consume.

Why an IterableDataset and not a map-style one: a shard row group is the unit of I/O (one ranged
read, one decompression), so samples are produced in row-group order and mixed with a shuffle
buffer; random access per sample would re-read a row group per sample.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vl.config import TEF_DIMS
from vl.data.annotations import (
    DEFAULT_CLIP_LEN,
    MAX_WINDOWS,
    Annotation,
    Targets,
    build_targets,
    parse_annotation,
)
from vl.data.batch import Batch, pad_batch
from vl.data.shards import (
    ShardCorruptError,
    ShardManifest,
    decode_features,
    fetch_shard,
    read_annotations,
    read_manifest,
    text_column,
    video_column,
)
from vl.storage import is_remote, join_uri

WHERE = "__shard_row_group__"  # a streamed row's (shard, row group, row): errors, parse memo

__all__ = ["Sample", "ShardDataset", "collate", "make_loader", "read_annotations", "sample_rng"]


@dataclass
class Sample:
    """One decoded sample before collation.

    Feature sets stay separate and may be float16 views into the shard's bytes: collate writes
    them straight into the float32 batch tensor, so a sample is converted exactly once.
    """

    qid: int | str
    vid: str
    query: str
    duration: float
    clip_len: float
    has_spans: bool
    video: list[np.ndarray]  # per set (ctx_l, d), L2-normalised; TEF is added by collate
    text: list[np.ndarray]  # per set (n_tokens, d), L2-normalised
    targets: Targets


def sample_rng(seed: int, epoch: int, qid: int | str) -> np.random.Generator:
    """The generator for one sample's random targets (easy pairs, window subsampling).

    Keyed by (seed, epoch, qid) rather than by position, so the targets of a query in an epoch do
    not depend on the rank / worker layout or on the shuffle order.
    """
    return np.random.default_rng([seed, epoch, zlib.crc32(str(qid).encode())])


def make_sample(
    ann: Annotation,
    video: list[np.ndarray],
    text: list[np.ndarray],
    *,
    seed: int,
    epoch: int,
    clip_len: float,
    max_v_l: int | None,
    max_q_l: int | None,
    max_windows: int = MAX_WINDOWS,
) -> Sample:
    """Truncate features (each set to max length and to the shortest set) and build targets."""
    n_v = min(len(v) for v in video)
    n_t = min(len(t) for t in text)
    if max_v_l is not None:
        n_v = min(n_v, max_v_l)
    if max_q_l is not None:
        n_t = min(n_t, max_q_l)
    targets = build_targets(
        ann, n_v, sample_rng(seed, epoch, ann.qid), clip_len=clip_len, max_windows=max_windows
    )
    return Sample(
        qid=ann.qid,
        vid=ann.vid,
        query=ann.query,
        duration=ann.duration,
        clip_len=clip_len,
        has_spans=ann.has_spans,
        video=[v[:n_v] for v in video],
        text=[t[:n_t] for t in text],
        targets=targets,
    )


# --- collation ----------------------------------------------------------------------------------


def collate(samples: Sequence[Sample], half: bool = False) -> Batch:
    """Pad a list of Samples into a Batch (`vl.data.batch.pad_batch`: feature sets
    concatenated, 2 TEF dims appended, targets padded); `half` keeps the float16 shard features
    in float16 (a half batch, widened to float32 by `Batch.to`)."""
    if not samples:
        raise ValueError("collate got an empty list")
    has_spans = {s.has_spans for s in samples}
    if len(has_spans) != 1:
        raise ValueError("a batch mixes samples with and without spans")
    with warnings.catch_warnings():
        # Shard features are read-only views of the Parquet buffer; they are only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return pad_batch(
            [s.video for s in samples], [s.text for s in samples], [s.targets for s in samples],
            has_spans=has_spans.pop(), qids=[s.qid for s in samples],
            vids=[s.vid for s in samples], queries=[s.query for s in samples],
            durations=[s.duration for s in samples], clip_len=samples[0].clip_len, half=half,
        )  # fmt: skip


# --- the streaming dataset ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """A row group of a shard and how many of its eligible rows to take this epoch."""

    shard: int
    row_group: int
    take: int


class ShardDataset(IterableDataset):
    """Samples of a shard set for one rank, streamed and shuffled per epoch.

    Splitting: shard files are dealt to ranks once (a seeded permutation, fixed across epochs so
    each node only ever downloads and caches its own files); if there are fewer files than ranks,
    row groups are dealt instead. With `equal_per_rank` every rank yields the same number of
    samples (the smallest rank's count), because DDP ranks that run different numbers of steps
    deadlock in the gradient all-reduce. Within a rank, DataLoader workers split the rank's files
    (or row groups when there are fewer files than workers).

    Shuffling: per epoch the rank's row-group order is permuted and samples pass through a buffer
    of `buffer_size` raw rows (~0.6 MB each at full QVHighlights dims), both seeded by
    (seed, epoch, rank, worker). Per-sample random targets are seeded by (seed, epoch, qid).
    """

    def __init__(
        self,
        uri: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 256,
        cache_dir: str | Path | None = None,
        max_v_l: int | None = 75,
        max_q_l: int | None = 32,
        max_windows: int = MAX_WINDOWS,
        video_features: Sequence[str] | None = None,
        text_features: Sequence[str] | None = None,
        domain: str | None = None,
        equal_per_rank: bool = True,
        epoch: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.uri = uri
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = max(1, buffer_size)
        self.cache_dir = cache_dir
        self.max_v_l = max_v_l
        self.max_q_l = max_q_l
        self.max_windows = max_windows
        self.domain = domain
        self.equal_per_rank = equal_per_rank
        # One int64 in shared memory: persistent DataLoader workers read the epoch set in the
        # main process (a plain attribute would stay frozen in each worker's copy).
        self._epoch = torch.tensor(epoch, dtype=torch.int64).share_memory_()
        self._annotations: dict[tuple[int, int, int], Annotation] = {}  # per-process parse memo
        self.manifest: ShardManifest = read_manifest(uri)
        if uri.startswith("s3://"):
            import s3fs  # noqa: F401 - imported once here so forked workers do not each pay it
        self.dataset = self.manifest.dataset
        self.clip_len = self.manifest.clip_len or DEFAULT_CLIP_LEN[self.dataset]
        self.video_sets = self._pick(video_features, self.manifest.video_features, "video")
        self.text_sets = self._pick(text_features, self.manifest.text_features, "text")
        self._eligible = self._eligible_rows()  # per shard, per row group: eligible row count
        self._rank_units, self._rank_len = self._split_units()

    # -- configuration

    def _pick(self, wanted: Sequence[str] | None, stored: list, modality: str) -> list[str]:
        names = [f.name for f in stored]
        if wanted is None:
            return names
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ValueError(
                f"{self.uri}: {modality} feature sets {missing} not in the shards (have {names})"
            )
        return list(wanted)

    @property
    def video_dim(self) -> int:
        """Width of a batch's video tensor: chosen sets + 2 TEF dims."""
        return self.manifest.input_widths(self.video_sets, self.text_sets)[0] + TEF_DIMS

    @property
    def text_dim(self) -> int:
        return self.manifest.input_widths(self.video_sets, self.text_sets)[1]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and random targets the next iteration uses (also in
        persistent DataLoader workers, which read it from shared memory)."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (identical on every rank with equal_per_rank)."""
        return self._rank_len

    # -- splitting

    def _eligible_rows(self) -> list[list[int]]:
        counts: list[list[int]] = []
        for i, info in enumerate(self.manifest.shards):
            if self.domain is None:
                rg = self.manifest.row_group_rows
                full, rest = divmod(info.num_rows, rg)
                groups = [rg] * full + ([rest] if rest else [])
                if len(groups) != info.num_row_groups:  # writer flushed differently: ask the file
                    md = pq.ParquetFile(str(self._local(i))).metadata
                    groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                counts.append(groups)
            else:
                pf = pq.ParquetFile(str(self._local(i)))
                counts.append(
                    [
                        int(
                            pc.sum(
                                pc.equal(pf.read_row_group(g, ["domain"])["domain"], self.domain)
                            ).as_py()
                            or 0
                        )
                        for g in range(pf.num_row_groups)
                    ]
                )
        return counts

    def _local(self, shard: int) -> Path:
        return fetch_shard(self.uri, self.manifest.shards[shard], self.cache_dir)

    def _split_units(self) -> tuple[list[_Unit], int]:
        """This rank's units (in assignment order) and how many samples it yields per epoch."""
        n_shards = len(self.manifest.shards)
        order = np.random.default_rng([self.seed, 7919]).permutation(n_shards).tolist()
        all_units = [[(s, g, n) for g, n in enumerate(self._eligible[s]) if n > 0] for s in order]
        if n_shards >= self.world_size:
            per_rank = [
                [u for shard_units in all_units[r :: self.world_size] for u in shard_units]
                for r in range(self.world_size)
            ]
        else:
            flat = [u for shard_units in all_units for u in shard_units]
            per_rank = [flat[r :: self.world_size] for r in range(self.world_size)]
        totals = [sum(n for _, _, n in units) for units in per_rank]
        if self.equal_per_rank and self.world_size > 1 and min(totals) == 0:
            raise ValueError(
                f"{self.uri}: a rank would get no samples ({totals} per rank); write more, "
                "smaller shards (jobs.shard --rows-per-shard) or use fewer ranks"
            )
        cap = min(totals) if self.equal_per_rank else totals[self.rank]
        return [_Unit(s, g, n) for s, g, n in per_rank[self.rank]], cap

    def _epoch_units(self, epoch: int) -> list[_Unit]:
        """This epoch's unit order for the rank, capped to the common per-rank count."""
        units, cap = self._rank_units, self._rank_len
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, self.rank, 104729]).permutation(
                len(units)
            )
            units = [units[i] for i in perm]
        out, left = [], cap
        for u in units:
            if left <= 0:
                break
            out.append(_Unit(u.shard, u.row_group, min(u.take, left)))
            left -= out[-1].take
        return out

    # -- iteration

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        units = self._epoch_units(epoch)
        shards = sorted({u.shard for u in units})
        if len(shards) >= nw:  # whole files per worker: each file is downloaded by one worker
            mine = set(shards[wid::nw])
            units = [u for u in units if u.shard in mine]
        else:
            units = units[wid::nw]
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid, 15485863])
        buffer: list[dict[str, Any]] = []
        for row in self._iter_rows(units):
            if not self.shuffle:
                yield self._decode(row, epoch)
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(row)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], row = row, buffer[j]
            yield self._decode(row, epoch)
        if self.shuffle:
            for j in rng.permutation(len(buffer)):
                yield self._decode(buffer[j], epoch)

    def _columns(self) -> list[str]:
        cols = ["annotation", "n_clips", "n_tokens", "domain"]
        cols += [video_column(n) for n in self.video_sets]
        cols += [text_column(n) for n in self.text_sets]
        return cols

    def _iter_rows(self, units: list[_Unit]) -> Iterator[dict[str, Any]]:
        cols = self._columns()
        files: dict[int, pq.ParquetFile] = {}
        order = [u.shard for u in units]
        with _ShardPrefetcher(self._local, order, remote=is_remote(self.uri)) as shards:
            for u in units:
                if u.shard not in files:
                    files.clear()  # keep one file open per worker
                    # memory-mapped: row groups are read straight from the page cache
                    # (uncompressed feature pages then need no copy; 0.78 vs 0.93 ms/row zstd).
                    files[u.shard] = pq.ParquetFile(str(shards.get(u.shard)), memory_map=True)
                table = self._read_group(files[u.shard], u.shard, u.row_group, cols)
                data = {c: _column_values(table.column(c)) for c in cols}
                taken = 0
                for k in range(table.num_rows):
                    if taken >= u.take:
                        break
                    if self.domain is not None and data["domain"][k] != self.domain:
                        continue
                    taken += 1
                    yield {**{c: data[c][k] for c in cols}, WHERE: (u.shard, u.row_group, k)}

    def _read_group(self, pf: pq.ParquetFile, shard: int, group: int, cols: list[str]) -> pa.Table:
        """One row group; a file that does not decode fails naming the shard and row group."""
        try:
            return pf.read_row_group(group, columns=cols)
        except (OSError, pa.ArrowException) as err:
            raise ShardCorruptError(
                f"shard {join_uri(self.uri, self.manifest.shards[shard].path)}: row group {group} "
                f"does not decode ({type(err).__name__}: {err})") from None

    def _annotation(self, row: dict[str, Any]) -> Annotation:
        """The row's parsed annotation, parsed once per process (a persistent worker's later
        epochs reuse it: the JSON parse is a third of a warm epoch's per-sample Python work)."""
        key = row[WHERE]
        ann = self._annotations.get(key)
        if ann is None:
            ann = parse_annotation(
                json.loads(row["annotation"]), self.dataset, clip_len=self.clip_len,
                validate=False)  # fmt: skip
            self._annotations[key] = ann
        return ann

    def _decode(self, row: dict[str, Any], epoch: int) -> Sample:
        """Annotation JSON -> record, feature blobs -> float16 views, then targets."""
        ann = self._annotation(row)
        dims_v = {f.name: f.dim for f in self.manifest.video_features}
        dims_t = {f.name: f.dim for f in self.manifest.text_features}
        n_v, n_t = row["n_clips"], row["n_tokens"]
        try:
            video = [decode_features(row[video_column(n)], n_v, dims_v[n])
                     for n in self.video_sets]  # fmt: skip
            text = [decode_features(row[text_column(n)], n_t, dims_t[n]) for n in self.text_sets]
        except ValueError as err:  # a blob of the wrong length: the shard is corrupt
            shard, group, _ = row.get(WHERE, (-1, -1, -1))
            where = self.manifest.shards[shard].path if shard >= 0 else "?"
            raise ShardCorruptError(
                f"shard {join_uri(self.uri, where)}: row group {group}, qid {ann.qid}: feature "
                f"blob does not decode ({err})") from None
        return make_sample(
            ann,
            video,
            text,
            seed=self.seed,
            epoch=epoch,
            clip_len=self.clip_len,
            max_v_l=self.max_v_l,
            max_q_l=self.max_q_l,
            max_windows=self.max_windows,
        )


class _ShardPrefetcher:
    """Downloads the next shards of an iteration in a background thread while the current one
    is decoded, so a cold epoch costs max(download, decode) instead of their sum.

    Downloads run `ahead` shards in front of the reader, in the order the reader will ask for
    them (s3fs and hashlib release the GIL, so the overlap is real). Local shard sets need no
    thread. Leaving the iteration early cancels what has not started.
    """

    def __init__(
        self, fetch: Callable[[int], Path], order: list[int], *, remote: bool, ahead: int = 2
    ) -> None:
        self.fetch = fetch
        self.order = list(dict.fromkeys(order))  # first-use order, each shard once
        self.ahead = ahead
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vl-shard-fetch") if remote else None
        self.futures: dict[int, Future] = {}
        self.next = 0

    def __enter__(self) -> _ShardPrefetcher:
        self._top_up()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _top_up(self) -> None:
        if self.pool is None:
            return
        while self.next < len(self.order) and len(self.futures) < self.ahead:
            shard = self.order[self.next]
            self.futures[shard] = self.pool.submit(self.fetch, shard)
            self.next += 1

    def get(self, shard: int) -> Path:
        """The local path of `shard` (waits for its download; re-raises its error)."""
        future = self.futures.pop(shard, None)
        self._top_up()
        return future.result() if future is not None else self.fetch(shard)


def _column_values(col: pa.ChunkedArray) -> list[Any]:
    """Python values of a column, except binary columns: zero-copy uint8 views per row (a row
    group's feature blobs are ~20 MB; `to_pylist` would copy them into bytes objects)."""
    if not pa.types.is_binary(col.type):
        return col.to_pylist()
    out: list[Any] = []
    for chunk in col.chunks:
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        data = (
            np.frombuffer(data_buf, dtype=np.uint8)
            if data_buf is not None
            else np.empty(0, np.uint8)
        )
        out.extend(data[offsets[k] : offsets[k + 1]] for k in range(len(chunk)))
    return out


def make_loader(
    uri: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    prefetch_factor: int | None = 2,
    half_batches: bool = False,
    pin_memory: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader over ShardDataset(uri, ...) collating to Batch.

    `half_batches` collates half batches (float16 features, float32 TEF; `Batch.to` widens them
    on the device to the float32 batch the model expects): the collate copies the stored
    float16 instead of converting it, and half the bytes travel from workers, into pinned
    memory and to the device. Consumers that read features without `Batch.to` want the default.
    `pin_memory` (CUDA) pins each batch in the loader's pinning thread.

    Call `loader.dataset.set_epoch(e)` before iterating epoch e. Workers persist across epochs
    (no fork and no re-opened shards per epoch; they read the epoch from shared memory).
    """
    ds = ShardDataset(
        uri, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, **dataset_kwargs
    )
    return DataLoader(
        ds,
        batch_size=batch_size,
        collate_fn=partial(collate, half=half_batches),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
