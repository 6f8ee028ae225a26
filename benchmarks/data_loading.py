"""Data-loading throughput: Parquet shards vs the per-sample npz layout, each on the loopback S3
server and on local disk.

`python -m benchmarks.data_loading` prints one JSON line. Every loader runs on the same synthetic
QVHighlights-shaped data (75 clips of SlowFast+CLIP+BLIP = 3584 dims, up to 32 tokens of
CLIP+BLIP = 1280 dims), through a torch DataLoader with the same workers and batch size,
so the difference is the storage format and the per-sample work it implies:
- shard_s3_cold: ShardDataset from s3:// with a cold local cache (includes the download);
- shard_s3_warm: the next epoch, from the local cache;
- shard_local: the same shard files in a local directory (page-cached), its second epoch;
  shard_local_first its first (worker start-up and the once-per-process sha256 included);
- the shard loaders collate half batches (`make_loader(half_batches=True)`, as training does);
  shard_s3_warm_fp32 is the same steady-state warm epoch collated to float32;
- npz_local: a map-style dataset doing the reference loader's per-sample work (one .npz per
  feature set, float32 cast, L2 normalisation, concatenation, TEF via torch.cat) and the
  reference's pad-per-key collate, files on local disk warm in the page cache (the most
  favourable case for npz);
- npz_s3: the same per-sample work with the official layout uploaded to the S3 server (one GET
  per sample per feature set);
- s3_download_only: the ceiling of a cold epoch, the shard files copied from the S3 server with
  nothing else done to them.
`samples_per_s` holds each figure; `ratios` holds every pair as `a/b` (a's samples/s over b's).
All loaders run in one process, one after another, so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl.data.annotations import Annotation, build_targets, load_annotations
from vl.data.batch import Batch
from vl.data.dataset import make_loader, sample_rng
from vl.data.features import (
    FeatureDir,
    l2_normalize,
    load_text_set,
    load_video_set,
    parse_feature_dirs,
)
from vl.data.shards import ShardManifest, write_manifest
from vl.data.synthetic import SyntheticConfig, generate, parse_dims
from vl.storage import filesystem, join_uri


class NpzDataset(Dataset):
    """The reference loader's work per sample: one np.load per feature set, float32 cast, L2
    normalisation, truncation to the shortest set, np.concatenate, torch.cat with the TEF."""

    def __init__(
        self,
        anns: list[Annotation],
        *,
        video: list[FeatureDir],
        text: list[FeatureDir],
        max_v_l: int = 75,
        max_q_l: int = 32,
    ) -> None:
        self.anns, self.video, self.text = anns, video, text
        self.max_v_l, self.max_q_l = max_v_l, max_q_l

    def __len__(self) -> int:
        return len(self.anns)

    def __getitem__(self, i: int) -> dict:
        a = self.anns[i]
        v = [l2_normalize(load_video_set(d, a.vid, self.max_v_l)) for d in self.video]
        n = min(len(x) for x in v)
        video = torch.from_numpy(np.concatenate([x[:n] for x in v], axis=1))
        tef_st = torch.arange(0, n, 1.0) / n
        video = torch.cat([video, torch.stack([tef_st, tef_st + 1.0 / n], dim=1)], dim=1)
        t = [l2_normalize(load_text_set(d, a.qid, a.dataset, self.max_q_l)) for d in self.text]
        m = min(len(x) for x in t)
        text = torch.from_numpy(np.concatenate([x[:m] for x in t], axis=1))
        targets = build_targets(a, n, sample_rng(0, 0, a.qid), clip_len=2.0)
        return {"ann": a, "video": video, "text": text, "targets": targets}


class NpzS3Dataset(NpzDataset):
    """NpzDataset over the official layout uploaded to S3: the same per-sample work, each
    feature file fetched with one GET (`base` is the s3:// URI the raw directory went to)."""

    def __init__(self, anns: list[Annotation], local_root: Path, base: str, **kw) -> None:
        self.local_root, self.base = local_root, base
        super().__init__(anns, **kw)

    def _get(self, d: FeatureDir, name: str, key: str, limit: int) -> np.ndarray:
        rel = d.path.relative_to(self.local_root).as_posix()
        fs, path = filesystem(join_uri(self.base, f"{rel}/{name}"))
        with np.load(io.BytesIO(fs.cat_file(path))) as z:
            return np.asarray(z[key][:limit], dtype=np.float32)

    def __getitem__(self, i: int) -> dict:
        a = self.anns[i]
        v = [l2_normalize(self._get(d, f"{a.vid}.npz", "features", self.max_v_l))
             for d in self.video]  # fmt: skip
        n = min(len(x) for x in v)
        video = torch.from_numpy(np.concatenate([x[:n] for x in v], axis=1))
        tef_st = torch.arange(0, n, 1.0) / n
        video = torch.cat([video, torch.stack([tef_st, tef_st + 1.0 / n], dim=1)], dim=1)
        t = [l2_normalize(self._get(d, f"qid{a.qid}.npz", "last_hidden_state", self.max_q_l))
             for d in self.text]  # fmt: skip
        m = min(len(x) for x in t)
        text = torch.from_numpy(np.concatenate([x[:m] for x in t], axis=1))
        targets = build_targets(a, n, sample_rng(0, 0, a.qid), clip_len=2.0)
        return {"ann": a, "video": video, "text": text, "targets": targets}


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's pad_sequences_1d: zeros + copy, float mask."""
    lengths = [len(s) for s in seqs]
    out = torch.zeros(len(seqs), max(lengths), seqs[0].shape[1])
    mask = torch.zeros(len(seqs), max(lengths))
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        out[i, :n] = s
        mask[i, :n] = 1.0
    return out, mask


def reference_collate(items: list[dict]) -> Batch:
    """start_end_collate's work (padding per key), packed into the same Batch."""
    video, video_mask = _pad([x["video"] for x in items])
    text, text_mask = _pad([x["text"] for x in items])
    W = max(1, max(len(x["targets"].spans) for x in items))
    spans = torch.zeros(len(items), W, 2)
    span_mask = torch.zeros(len(items), W, dtype=torch.bool)
    for i, x in enumerate(items):
        w = len(x["targets"].spans)
        spans[i, :w] = torch.from_numpy(x["targets"].spans)
        span_mask[i, :w] = True
    saliency, _ = _pad([torch.from_numpy(x["targets"].saliency_labels)[:, None] for x in items])
    anns = [x["ann"] for x in items]
    return Batch(
        video=video,
        video_mask=video_mask,
        text=text,
        text_mask=text_mask,
        span_targets=spans,
        span_mask=span_mask,
        saliency_labels=saliency[..., 0],
        saliency_pos_idx=torch.stack([torch.from_numpy(x["targets"].pos_idx) for x in items]),
        saliency_neg_idx=torch.stack([torch.from_numpy(x["targets"].neg_idx) for x in items]),
        qids=[a.qid for a in anns],
        vids=[a.vid for a in anns],
        queries=[a.query for a in anns],
        durations=[a.duration for a in anns],
    )


def _time_loader(loader) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch)
    return time.perf_counter() - t0, n


def _download_only(uri: str, manifest: ShardManifest, dest: Path) -> float:
    """Seconds to copy every shard from S3 to local disk and nothing else (no sha256, no
    decode): no cold epoch can be faster than this on the same server and client."""
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for shard in manifest.shards:
        fs, path = filesystem(join_uri(uri, shard.path))
        fs.get_file(path, str(dest / Path(shard.path).name))
    return time.perf_counter() - t0


def _ratios(rates: dict[str, float]) -> dict[str, float]:
    """Every pair of loaders as "a/b": a's samples/s over b's."""
    names = list(rates)
    return {f"{a}/{b}": round(rates[a] / rates[b], 2)
            for i, a in enumerate(names) for b in names[i + 1:]}  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loading", description=__doc__)
    parser.add_argument("--queries", type=int, default=1024, help="synthetic queries (2/video)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep data here (default: a temp dir)")
    parser.add_argument("--dims", help="override feature dims, e.g. 'tiny' (default: real dims)")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"],
                        help="shard compression (jobs.shard --compression)")
    parser.add_argument("--rows-per-shard", type=int, default=64,
                        help="jobs.shard --rows-per-shard; the default gives each of 2 workers "
                        "4 shards of the 1024 queries, as a real split gives each many: a cold "
                        "epoch overlaps a shard's download with the decode of the previous one, "
                        "which one shard per worker cannot show")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)


    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vl-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if not os.environ.get("AWS_ENDPOINT_URL"):
            from cluster.local.s3 import start_s3

            server = start_s3(work / "s3", ["vl-data"])
            os.environ.update(server.env())
        t0 = time.perf_counter()
        cfg = SyntheticConfig(
            "qvhighlights",
            videos=max(1, args.queries // 2),
            seed=args.seed,
            val_fraction=0.0,
            dims=parse_dims(args.dims),
        )
        layout = generate(cfg, work / "raw")
        gen_s = time.perf_counter() - t0

        from jobs.shard import run as shard_run

        uri = f"s3://vl-data/bench/{int(time.time())}/train"
        t0 = time.perf_counter()
        manifest = shard_run(
            dataset="qvhighlights",
            annotations=str(layout.train_jsonl),
            video_features=layout.video_arg(),
            text_features=layout.text_arg(),
            out=uri,
            compression=args.compression,
            rows_per_shard=args.rows_per_shard,
            ray_mode="off",
            log=lambda *_: None,
        )
        shard_s = time.perf_counter() - t0

        cache = work / "cache"

        def shard_loader(where: str, half: bool = True):
            return make_loader(where, args.batch_size, num_workers=args.workers, seed=args.seed,
                               cache_dir=cache, half_batches=half)

        rates: dict[str, float] = {}
        loader = shard_loader(uri)
        cold_s, n_shard = _time_loader(loader)
        rates["shard_s3_cold"] = n_shard / cold_s
        loader.dataset.set_epoch(1)
        warm_s, _ = _time_loader(loader)
        rates["shard_s3_warm"] = n_shard / warm_s
        fp32 = shard_loader(uri, half=False)
        for epoch in (1, 2):  # the second epoch is the steady state, as shard_s3_warm's
            fp32.dataset.set_epoch(epoch)
            rates["shard_s3_warm_fp32"] = n_shard / _time_loader(fp32)[0]
        local_set = work / "get"
        get_s = _download_only(uri, manifest, local_set)
        rates["s3_download_only"] = n_shard / get_s
        write_manifest(str(local_set), manifest)  # the downloaded files form a local shard set
        local = shard_loader(str(local_set))
        rates["shard_local_first"] = n_shard / _time_loader(local)[0]
        local.dataset.set_epoch(1)
        rates["shard_local"] = n_shard / _time_loader(local)[0]

        anns = load_annotations(layout.train_jsonl, "qvhighlights")
        dirs = dict(video=parse_feature_dirs(layout.video_arg(), "video"),
                    text=parse_feature_dirs(layout.text_arg(), "text"))  # fmt: skip
        raw_uri = f"{uri.rsplit('/', 1)[0]}/raw"
        fs, raw_path = filesystem(raw_uri)
        t0 = time.perf_counter()
        fs.put(str(work / "raw"), raw_path, recursive=True)
        upload_s = time.perf_counter() - t0

        def npz_loader(ds: Dataset) -> DataLoader:
            return DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, collate_fn=reference_collate,
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip

        npz_s, n_npz = _time_loader(npz_loader(NpzDataset(anns, **dirs)))
        rates["npz_local"] = n_npz / npz_s
        npz_s3_s, _ = _time_loader(npz_loader(NpzS3Dataset(anns, work / "raw", raw_uri, **dirs)))
        rates["npz_s3"] = n_npz / npz_s3_s
        result = {
            "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
            "ratios": _ratios(rates),
            "targets": {"shard_s3_warm/npz_local": 3.0, "shard_s3_cold/npz_s3": 10.0,
                        "s3_download_only/shard_s3_cold": 1.5},
            # the figures under their earlier names
            "shard_samples_per_s": round(rates["shard_s3_cold"], 1),
            "shard_warm_samples_per_s": round(rates["shard_s3_warm"], 1),
            "npz_samples_per_s": round(rates["npz_local"], 1),
            "s3_download_only_samples_per_s": round(rates["s3_download_only"], 1),
            "samples": n_shard,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "compression": args.compression,
            "shards": len(manifest.shards),
            "video_dim": sum(f.dim for f in manifest.video_features) + 2,
            "text_dim": sum(f.dim for f in manifest.text_features),
            "shard_bytes": sum(s.bytes for s in manifest.shards),
            "npz_bytes": _dir_bytes(work / "raw"),
            "generate_s": round(gen_s, 1),
            "convert_s": round(shard_s, 1),
            "npz_upload_s": round(upload_s, 1),
        }
        print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
