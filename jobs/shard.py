"""Convert the official feature layout (npz per video / per query per feature set) into Parquet
shards on S3 or local disk: `python -m jobs.shard --dataset ... --annotations A.jsonl
--video-features DIR[,DIR...] --text-features DIR[,DIR...] --out s3://bucket/prefix/split`.

Runs shards as Ray tasks when a Ray cluster is reachable (RAY_ADDRESS set, e.g. under
`ray job submit`) and in-process otherwise. Every query's feature files are checked before
anything is written, so a run with missing features fails without leaving a partial shard set
(or, with --skip-missing, records the skipped queries in the manifest). Shard contents are a
pure function of (annotation rows, feature file bytes, settings); a shard's file name carries
that digest, so a re-run skips the shards whose completion record matches, writes the rest
under new names, writes the manifest last and only then removes the files it no longer lists:
a reader of the old manifest never sees new bytes under old checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.preflight import PreflightError, driver_address, use_driver_address
from vl.config import DATASETS
from vl.data.annotations import DEFAULT_CLIP_LEN, Annotation, load_annotations
from vl.data.features import (
    FeatureDir,
    l2_normalize,
    load_text_set,
    load_video_set,
    parse_feature_dirs,
    text_feature_file,
    video_feature_files,
)
from vl.data.shards import (
    DEFAULT_ROW_GROUP_ROWS,
    DEFAULT_ROWS_PER_SHARD,
    PARTS_DIR,
    FeatureSpec,
    ShardInfo,
    ShardManifest,
    ShardRow,
    write_manifest,
    write_shard,
)
from vl.storage import filesystem, join_uri, read_bytes, sha256_file, write_bytes


@dataclass(frozen=True)
class MissingFeature:
    """One query whose features are absent: which query, which set, where it was looked for."""

    qid: int | str
    vid: str
    modality: str
    feature_set: str
    directory: str

    def __str__(self) -> str:
        key = f"vid {self.vid!r}" if self.modality == "video" else f"qid {self.qid!r}"
        return (
            f"qid {self.qid!r} (vid {self.vid!r}): {self.modality} features {self.feature_set!r} "
            f"missing for {key} in {self.directory}"
        )


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines shard bytes besides the annotations (part of the fingerprint)."""

    dataset: str
    video: tuple[FeatureDir, ...]
    text: tuple[FeatureDir, ...]
    video_dims: tuple[int, ...]
    text_dims: tuple[int, ...]
    clip_len: float
    max_v_l: int | None
    max_q_l: int | None
    row_group_rows: int
    compression: str

    def fingerprint(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "video": [(d.name, dim) for d, dim in zip(self.video, self.video_dims, strict=True)],
            "text": [(d.name, dim) for d, dim in zip(self.text, self.text_dims, strict=True)],
            "clip_len": self.clip_len,
            "max_v_l": self.max_v_l,
            "max_q_l": self.max_q_l,
            "row_group_rows": self.row_group_rows,
            "compression": self.compression,
        }

    @property
    def video_specs(self) -> list[FeatureSpec]:
        return [FeatureSpec(d.name, n) for d, n in zip(self.video, self.video_dims, strict=True)]

    @property
    def text_specs(self) -> list[FeatureSpec]:
        return [FeatureSpec(d.name, n) for d, n in zip(self.text, self.text_dims, strict=True)]


def find_missing(
    anns: list[Annotation], video: list[FeatureDir], text: list[FeatureDir], dataset: str
) -> list[MissingFeature]:
    """Every (query, feature set) whose file is absent (file-existence checks only)."""
    missing = []
    for a in anns:
        for d in video:
            if video_feature_files(d, a.vid) is None:
                missing.append(MissingFeature(a.qid, a.vid, "video", d.name, str(d.path)))
        for d in text:
            if text_feature_file(d, a.qid, dataset) is None:
                missing.append(MissingFeature(a.qid, a.vid, "text", d.name, str(d.path)))
    return missing


def load_row(
    ann: Annotation, settings: ShardSettings, video_cache: dict[str, dict[str, np.ndarray]]
) -> ShardRow:
    """Read, truncate (to max length, then to the shortest set), normalise, cast to float16."""
    if ann.vid not in video_cache:
        video_cache.clear()  # annotation files group a video's queries: one entry is enough
        raw = {d.name: load_video_set(d, ann.vid, settings.max_v_l) for d in settings.video}
        n = min(len(x) for x in raw.values())
        video_cache[ann.vid] = {k: l2_normalize(x[:n]).astype(np.float16) for k, x in raw.items()}
    raw_t = {
        d.name: load_text_set(d, ann.qid, settings.dataset, settings.max_q_l) for d in settings.text
    }
    n_t = min(len(x) for x in raw_t.values())
    return ShardRow(
        qid=ann.qid,
        vid=ann.vid,
        query=ann.query,
        duration=ann.duration,
        annotation=ann.raw,
        video=video_cache[ann.vid],
        text={k: l2_normalize(x[:n_t]).astype(np.float16) for k, x in raw_t.items()},
        domain=ann.domain,
    )


def _rows(anns: list[Annotation], settings: ShardSettings) -> Iterator[ShardRow]:
    cache: dict[str, dict[str, np.ndarray]] = {}
    for a in anns:
        yield load_row(a, settings, cache)


def content_digest(anns: list[Annotation], settings: ShardSettings,
                   file_digests: dict[Path, str]) -> str:  # fmt: skip
    """What a shard's bytes are a function of: the settings, each annotation row as given, and
    the bytes of every feature file it reads. A fixed label or re-extracted features change the
    digest, so a re-run rewrites that shard (under a new name) instead of calling it done.
    `file_digests` memoises each file's sha256 across the shards of one run."""
    def digest_of(path: Path) -> str:
        if path not in file_digests:
            file_digests[path] = sha256_file(path)
        return file_digests[path]

    h = hashlib.sha256(json.dumps(settings.fingerprint(), sort_keys=True).encode())
    for a in anns:
        h.update(json.dumps(a.raw, sort_keys=True).encode())
        for d in settings.video:
            h.update(" ".join(digest_of(p) for p in video_feature_files(d, a.vid) or []).encode())
        for d in settings.text:
            path = text_feature_file(d, a.qid, settings.dataset)
            h.update((digest_of(path) if path else "-").encode())
    return h.hexdigest()


def shard_name(index: int, digest: str) -> str:
    """Content-addressed: new content never overwrites the bytes a live manifest points at."""
    return f"shard-{index:05d}-{digest[:16]}.parquet"


def convert_shard(
    out: str, index: int, anns: list[Annotation], settings: ShardSettings, digest: str
) -> ShardInfo:
    """Write one shard and its completion record; safe to run in a Ray task."""
    info = write_shard(
        _rows(anns, settings),
        out,
        shard_name(index, digest),
        settings.video_specs,
        settings.text_specs,
        qids_sha256=digest,
        row_group_rows=settings.row_group_rows,
        compression=settings.compression,
    )
    write_bytes(part_uri(out, index), json.dumps(asdict(info)).encode())
    return info


def part_uri(out: str, index: int) -> str:
    return join_uri(out, PARTS_DIR, f"shard-{index:05d}.json")


def finished(out: str, index: int, digest: str) -> ShardInfo | None:
    """The shard's record if a previous run completed it with the same content plan."""
    try:
        info = ShardInfo.from_dict(json.loads(read_bytes(part_uri(out, index))))
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if info.qids_sha256 != digest:
        return None
    fs, path = filesystem(join_uri(out, info.path))
    try:
        return info if fs.size(path) == info.bytes else None
    except FileNotFoundError:
        return None


def _ray():
    """The ray module, imported on first use so that in-process conversion (`--ray off`, the
    benchmarks) never loads it: in a process that has imported ray, s3fs's exit-time client
    cleanup raises "attached to a different loop" on stderr (seen in benchmarks.data_loading)."""
    import ray

    return ray


def _want_ray(mode: str) -> bool:
    if mode == "off":
        return False
    if mode == "on":
        return True
    return _ray().is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def detect_dims(
    anns: list[Annotation], video: list[FeatureDir], text: list[FeatureDir], dataset: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-set dims from the first query's files (synthetic tiny sets differ from the real dims)."""
    a = anns[0]
    v = tuple(load_video_set(d, a.vid, 1).shape[1] for d in video)
    t = tuple(load_text_set(d, a.qid, dataset, 1).shape[1] for d in text)
    return v, t


def run(
    *,
    dataset: str,
    annotations: str,
    video_features: str | list[str],
    text_features: str | list[str],
    out: str,
    skip_missing: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    max_v_l: int | None = None,
    max_q_l: int | None = None,
    clip_len: float | None = None,
    compression: str = "zstd",
    ray_mode: str = "auto",
    log=print,
) -> ShardManifest:
    """Convert one annotation file + feature dirs into a shard set at `out`; returns the manifest.

    Raises FileNotFoundError listing every missing (query, feature set) unless skip_missing.
    """
    if rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if row_group_rows < 1:
        raise ValueError(f"--row-group-rows must be >= 1, got {row_group_rows}")
    for flag, value in (("--max-v-l", max_v_l), ("--max-q-l", max_q_l)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if clip_len is not None and not clip_len > 0:  # also NaN
        raise ValueError(f"--clip-len must be > 0, got {clip_len}")
    t0 = time.monotonic()
    clip_len = DEFAULT_CLIP_LEN[dataset] if clip_len is None else clip_len
    anns = load_annotations(annotations, dataset, clip_len=clip_len)
    video = parse_feature_dirs(video_features, "video")
    text = parse_feature_dirs(text_features, "text")
    anns, skipped = drop_missing(anns, video, text, dataset, annotations, skip_missing, log)
    video_dims, text_dims = detect_dims(anns, video, text, dataset)
    settings = ShardSettings(
        dataset=dataset,
        video=tuple(video),
        text=tuple(text),
        video_dims=video_dims,
        text_dims=text_dims,
        clip_len=clip_len,
        max_v_l=max_v_l,
        max_q_l=max_q_l,
        row_group_rows=row_group_rows,
        compression=compression,
    )
    chunks = [anns[i : i + rows_per_shard] for i in range(0, len(anns), rows_per_shard)]
    infos, todo = convert_chunks(out, chunks, settings, ray_mode, log)
    manifest = ShardManifest(
        dataset=dataset,
        clip_len=clip_len,
        video_features=settings.video_specs,
        text_features=settings.text_specs,
        shards=infos,
        compression=compression,
        row_group_rows=row_group_rows,
        max_v_l=max_v_l,
        max_q_l=max_q_l,
        skipped=skipped,
    )
    write_manifest(out, manifest)  # the swap: readers move to the new shards only now
    removed = remove_unlisted(out, manifest)
    log(json.dumps({
        "out": out, "rows": manifest.num_rows, "shards": len(manifest.shards),
        "converted": len(todo), "reused": len(chunks) - len(todo),
        "skipped_queries": len({s["qid"] for s in skipped}), "removed_old": removed,
        "bytes": sum(s.bytes for s in manifest.shards),
        "seconds": round(time.monotonic() - t0, 2),
    }))  # fmt: skip
    return manifest


def remove_unlisted(out: str, manifest: ShardManifest) -> int:
    """Delete the shard files and records a previous run left that the new manifest no longer
    lists (called after the manifest is in place, so no complete set ever loses a file)."""
    fs, base = filesystem(out)
    keep = {info.path for info in manifest.shards}
    keep_parts = {f"{PARTS_DIR}/{Path(p).stem.rsplit('-', 1)[0]}.json" for p in keep}
    removed = 0
    for rel, keep_set in ((".", keep), (PARTS_DIR, keep_parts)):
        folder = f"{base.rstrip('/')}/{rel}" if rel != "." else base
        try:
            names = [Path(p).name for p in fs.ls(folder, detail=False)]
        except FileNotFoundError:
            continue
        for name in names:
            relpath = name if rel == "." else f"{rel}/{name}"
            if name.startswith("shard-") and relpath not in keep_set:
                fs.rm_file(f"{folder.rstrip('/')}/{name}")
                removed += rel == "."
    return removed


def drop_missing(anns: list[Annotation], video: list[FeatureDir], text: list[FeatureDir],
                 dataset: str, annotations: str, skip_missing: bool,
                 log) -> tuple[list[Annotation], list[dict[str, Any]]]:  # fmt: skip
    """(the queries whose features all exist, the skipped (query, set) records). Without
    `skip_missing` any missing feature file is a FileNotFoundError that lists them."""
    missing = find_missing(anns, video, text, dataset)
    skipped: list[dict[str, Any]] = []
    if missing:
        report = "\n".join(f"  {m}" for m in missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        n_q = len({str(m.qid) for m in missing})
        if not skip_missing:
            raise FileNotFoundError(
                f"{n_q} of {len(anns)} queries in {annotations} lack features "
                f"(nothing was written; pass --skip-missing to convert the rest):\n{report}{more}"
            )
        log(f"skipping {n_q} queries with missing features:\n{report}{more}")
        bad = {str(m.qid) for m in missing}
        skipped = [asdict(m) for m in missing]
        anns = [a for a in anns if str(a.qid) not in bad]
    if not anns:
        raise ValueError(f"{annotations}: no query left to convert")
    return anns, skipped


def convert_chunks(out: str, chunks: list[list[Annotation]], settings: ShardSettings,
                   ray_mode: str, log) -> tuple[list[ShardInfo], list[int]]:  # fmt: skip
    """Write every shard not already finished (as Ray tasks or in-process); returns every
    shard's manifest entry, in order, and the indices converted now."""
    file_digests: dict[Path, str] = {}
    digests = [content_digest(chunk, settings, file_digests) for chunk in chunks]
    infos: list[ShardInfo | None] = [finished(out, i, digest)
                                     for i, digest in enumerate(digests)]  # fmt: skip
    todo = [i for i, info in enumerate(infos) if info is None]
    use_ray = bool(todo) and _want_ray(ray_mode)
    log(
        f"{sum(len(c) for c in chunks)} queries -> {len(chunks)} shards at {out}; "
        f"{len(chunks) - len(todo)} already done, converting {len(todo)} "
        f"{'with Ray tasks' if use_ray else 'in-process'}"
    )
    if use_ray:
        ray = _ray()
        if not ray.is_initialized():
            address = driver_address()
            use_driver_address(address)
            ray.init(address=address or "auto", log_to_driver=False)
        task = ray.remote(num_cpus=1)(convert_shard)
        refs = {i: task.remote(out, i, chunks[i], settings, digests[i]) for i in todo}
        for i, ref in refs.items():
            infos[i] = ray.get(ref)
    else:
        for i in todo:
            infos[i] = convert_shard(out, i, chunks[i], settings, digests[i])
    return [i for i in infos if i is not None], todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.shard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--video-features", required=True, help="DIR[,DIR...] or NAME=DIR[,...]")
    parser.add_argument("--text-features", required=True, help="DIR[,DIR...] or NAME=DIR[,...]")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix/split or a local dir")
    parser.add_argument("--skip-missing", action="store_true")
    parser.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    parser.add_argument("--row-group-rows", type=int, default=DEFAULT_ROW_GROUP_ROWS)
    parser.add_argument("--max-v-l", type=int, help="keep at most this many clips (default all)")
    parser.add_argument("--max-q-l", type=int, help="keep at most this many tokens (default all)")
    parser.add_argument("--clip-len", type=float, help="seconds per clip (default per dataset)")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "snappy", "none"])
    parser.add_argument("--ray", dest="ray_mode", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args(argv)
    try:
        run(
            dataset=args.dataset,
            annotations=args.annotations,
            video_features=args.video_features,
            text_features=args.text_features,
            out=args.out,
            skip_missing=args.skip_missing,
            rows_per_shard=args.rows_per_shard,
            row_group_rows=args.row_group_rows,
            max_v_l=args.max_v_l,
            max_q_l=args.max_q_l,
            clip_len=args.clip_len,
            compression=args.compression,
            ray_mode=args.ray_mode,
            log=lambda msg: print(msg, flush=True),
        )
    except (FileNotFoundError, ValueError, PreflightError) as e:
        print(f"jobs.shard: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
