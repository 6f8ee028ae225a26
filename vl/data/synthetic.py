"""Synthetic data in the OFFICIAL layout (npz feature dirs + annotation JSONL) with a planted,
learnable signal, for demos and tests while the real feature archives are unreachable.

The signal: a global bank of "concepts" (random unit directions in a small latent space). Every
feature set has its own fixed random linear map from the latent space to its dimension, for
video and text alike, so the spaces differ but are linked. A video is background + per-clip
noise; a query picks one concept, and the clips inside the query's windows carry that concept
with a strength that follows a planted saliency profile (the annotator scores are derived from
the same strength, so saliency is proportional to it). Other windows of the same video carry
other concepts (other queries' and an unqueried distractor), so only a model that reads the
query can localise it: a correct model reaches R1@0.5 near 100 on held-out videos, one that
ignores the text cannot. The query's text tokens carry the concept through the text maps.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vl.config import FEATURE_DIMS, TEXT_FEATURE_DIMS
from vl.data.annotations import (
    DEFAULT_CLIP_LEN,
    TVSUM_ANNOTATORS,
    TVSUM_DOMAINS,
    Annotation,
    load_annotations,
)
from vl.data.features import OFFICIAL_DIR

SPLIT_FILES = {
    "qvhighlights": ("highlight_train_release.jsonl", "highlight_val_release.jsonl"),
    "charades": ("charades_sta_train_tvr_format.jsonl", "charades_sta_test_tvr_format.jsonl"),
    "tvsum": ("tvsum_train.jsonl", "tvsum_val.jsonl"),
}
DEFAULT_VIDEO_SETS = {
    "qvhighlights": ("slowfast", "clip", "blip"),
    "charades": ("slowfast", "clip", "blip"),
    "tvsum": ("i3d", "slowfast", "clip", "blip"),
}
DEFAULT_TEXT_SETS = ("clip", "blip")
TINY_DIMS = {"slowfast": 48, "clip": 32, "blip": 24, "i3d": 32}
META_FILE = "synthetic.json"


@dataclass
class SyntheticConfig:
    """What to generate. `dims` overrides per-set dims (video and text sets share names)."""

    dataset: str
    videos: int
    seed: int = 0
    video_sets: tuple[str, ...] = ()
    text_sets: tuple[str, ...] = DEFAULT_TEXT_SETS
    dims: dict[str, int] = field(default_factory=dict)
    queries_per_video: int | None = None
    val_fraction: float = 0.2
    n_concepts: int = 32
    latent_dim: int = 16
    signal: float = 2.0  # concept amplitude at full strength, relative to a unit background
    feature_noise: float = 0.5  # norm of the isotropic noise added in each feature space
    # TVSum: every video of a domain is about the domain's concept (as real TVSum domains share a
    # topic), so a per-domain model can generalise from 4 training videos to the val video.
    tvsum_domain_concepts: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in SPLIT_FILES:
            raise ValueError(f"dataset must be one of {sorted(SPLIT_FILES)}, got {self.dataset!r}")
        if not self.video_sets:
            self.video_sets = DEFAULT_VIDEO_SETS[self.dataset]
        if self.queries_per_video is None:
            self.queries_per_video = 1 if self.dataset == "tvsum" else 2

    def video_dim(self, name: str) -> int:
        return self.dims.get(name, FEATURE_DIMS[name])

    def text_dim(self, name: str) -> int:
        return self.dims.get(name, TEXT_FEATURE_DIMS[name])


@dataclass
class SyntheticLayout:
    """Where the generator put things (also written to OUT/synthetic.json)."""

    root: Path
    dataset: str
    train_jsonl: Path
    val_jsonl: Path | None
    video_dirs: list[Path]
    text_dirs: list[Path]
    num_train: int = 0
    num_val: int = 0

    def video_arg(self) -> str:
        """The `--video-features` argument of jobs.shard for this layout."""
        return ",".join(str(p) for p in self.video_dirs)

    def text_arg(self) -> str:
        return ",".join(str(p) for p in self.text_dirs)


class _World:
    """The fixed random structure shared by train and val: concepts, maps, filler words."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 1])
        k = cfg.latent_dim
        c = rng.standard_normal((cfg.n_concepts, k))
        self.concepts = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.filler = rng.standard_normal((40, k)) / math.sqrt(k)
        self.video_maps = {
            n: rng.standard_normal((k, cfg.video_dim(n))) / math.sqrt(k) for n in cfg.video_sets
        }
        self.text_maps = {
            n: rng.standard_normal((k, cfg.text_dim(n))) / math.sqrt(k) for n in cfg.text_sets
        }


def _video_features(
    cfg: SyntheticConfig,
    world: _World,
    rng: np.random.Generator,
    n_clips: int,
    planted: list[tuple[int, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Per set (n_clips, D) float32; `planted` = [(concept, per-clip strength (n_clips,))]."""
    k = cfg.latent_dim
    background = rng.standard_normal(k) / math.sqrt(k)
    z = background + 0.5 * rng.standard_normal((n_clips, k)) / math.sqrt(k)
    for concept, strength in planted:
        z = z + cfg.signal * strength[:, None] * world.concepts[concept][None, :]
    return _project(z, world.video_maps, cfg.feature_noise, rng)


def _text_features(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, concept: int, n_tokens: int
) -> dict[str, np.ndarray]:
    """Per set (n_tokens, D): weak filler words, a quarter of the tokens carrying the concept
    (at least two), and an EOT token that summarises the sentence as CLIP's does."""
    k = cfg.latent_dim
    words = 0.5 * world.filler[rng.integers(len(world.filler), size=n_tokens)]
    n_concept = min(max(2, n_tokens // 4), n_tokens - 2)
    slots = rng.choice(np.arange(1, n_tokens - 1), size=n_concept, replace=False)
    jitter = 0.2 * rng.standard_normal((n_concept, k)) / math.sqrt(k)
    words[slots] = world.concepts[concept] + jitter
    words[-1] = words[:-1].mean(axis=0)
    return _project(words, world.text_maps, cfg.feature_noise, rng)


def _project(latent: np.ndarray, maps: dict[str, np.ndarray], feature_noise: float,
             rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """Per feature set (n, D): the (n, k) latent through the set's (k, D) map, plus noise of
    total norm ~feature_noise per row."""
    out = {}
    for name, m in maps.items():
        d = m.shape[1]
        noise = rng.standard_normal((len(latent), d)) * (feature_noise / math.sqrt(d))
        out[name] = (latent @ m + noise).astype(np.float32)
    return out


def _fake_id(rng: np.random.Generator, n: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=n))


def _strength_profile(rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth bump in [0.3, 1] over a window of n clips (a highlight peaks somewhere inside)."""
    peak = rng.uniform(0, n)
    width = max(1.0, n * rng.uniform(0.3, 0.8))
    x = np.arange(n) + 0.5
    return 0.3 + 0.7 * np.exp(-0.5 * ((x - peak) / width) ** 2)


def _disjoint_segments(
    rng: np.random.Generator, n_clips: int, lengths: list[int]
) -> list[tuple[int, int]]:
    """Place segments of the given lengths (in clips) in random order, without overlap and with
    at least one clip between neighbours; returned in the order of `lengths`."""
    slack = n_clips - sum(lengths) - (len(lengths) - 1)
    if slack < 0:
        raise ValueError(f"segments {lengths} do not fit in {n_clips} clips")
    extra_gaps = np.sort(rng.integers(0, slack + 1, size=len(lengths)))
    segs: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    pos, used = 0, 0
    for i, idx in enumerate(rng.permutation(len(lengths))):
        pos += int(extra_gaps[i]) - used
        used = int(extra_gaps[i])
        segs[idx] = (pos, pos + lengths[idx])
        pos += lengths[idx] + 1
    return segs


# --- per-dataset video generators: yield (rows, video features, per-query text features) --------

VideoItem = tuple[list[dict[str, Any]], dict[str, np.ndarray], list[dict[str, np.ndarray]]]


def _qvh_video(cfg: SyntheticConfig, world: _World, rng: np.random.Generator, vi: int, qid0: int):
    n_clips, clip_len = 75, 2.0
    q = cfg.queries_per_video
    concepts = rng.choice(cfg.n_concepts, size=q + 1, replace=False)  # last = distractor
    n_windows = [int(rng.integers(1, 4)) for _ in range(q)] + [1]
    lengths = [int(rng.integers(2, 9)) for _ in range(sum(n_windows))]
    segs = _disjoint_segments(rng, n_clips, lengths)
    ytid = _fake_id(rng, 11)
    start = float(rng.integers(0, 20)) * 150.0
    vid = f"{ytid}_{start}_{start + 150.0}"
    planted, rows, texts = [], [], []
    pos = 0
    for j in range(q + 1):
        strength = np.zeros(n_clips)
        my = sorted(segs[pos : pos + n_windows[j]])
        pos += n_windows[j]
        for s, e in my:
            strength[s:e] = _strength_profile(rng, e - s)
        planted.append((int(concepts[j]), strength))
        if j == q:
            break
        clip_ids = [c for s, e in my for c in range(s, e)]
        scores = [
            [int(np.clip(round(4 * strength[c] + rng.normal(0, 0.4)), 0, 4)) for _ in range(3)]
            for c in clip_ids
        ]
        qid = qid0 + j
        rows.append(
            {
                "qid": qid,
                "query": f"someone shows concept c{int(concepts[j])} on camera",
                "duration": 150,
                "vid": vid,
                "relevant_clip_ids": clip_ids,
                "saliency_scores": scores,
                "relevant_windows": [[s * clip_len, e * clip_len] for s, e in my],
            }
        )
        texts.append(_text_features(cfg, world, rng, int(concepts[j]), int(rng.integers(10, 33))))
    return rows, _video_features(cfg, world, rng, n_clips, planted), texts


def _charades_video(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, vi: int, qid0: int
):
    duration = round(float(rng.uniform(20, 40)), 2)
    n_clips = math.ceil(duration)  # 1-s clips
    q = cfg.queries_per_video
    concepts = rng.choice(cfg.n_concepts, size=q + 1, replace=False)
    lengths = [int(rng.integers(3, 9)) for _ in range(q + 1)]
    segs = _disjoint_segments(rng, n_clips - 1, lengths)
    vid = _fake_id(rng, 5).upper()
    planted, rows, texts = [], [], []
    for j, (s, e) in enumerate(segs):
        strength = np.zeros(n_clips)
        strength[s:e] = 1.0
        planted.append((int(concepts[j]), strength))
        if j == q:
            continue
        st = round(s + float(rng.uniform(0, 0.3)), 1)
        ed = round(min(e - float(rng.uniform(0, 0.3)), duration), 1)
        rows.append(
            {
                "qid": qid0 + j,
                "query": f"person does concept c{int(concepts[j])}.",
                "duration": duration,
                "vid": vid,
                "relevant_windows": [[st, ed]],
            }
        )
        texts.append(_text_features(cfg, world, rng, int(concepts[j]), int(rng.integers(8, 16))))
    return rows, _video_features(cfg, world, rng, n_clips, planted), texts


def _tvsum_video(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, vi: int, domain: str
):
    n_clips = int(rng.integers(55, 160))
    concept = int(rng.integers(cfg.n_concepts))
    if cfg.tvsum_domain_concepts:  # drawn above anyway: the random stream stays the same
        concept = TVSUM_DOMAINS.index(domain) % cfg.n_concepts
    distractor = int((concept + 1 + rng.integers(cfg.n_concepts - 1)) % cfg.n_concepts)
    lengths = [int(rng.integers(6, 20)) for _ in range(3)]
    segs = _disjoint_segments(rng, n_clips, lengths)
    strength = np.zeros(n_clips)
    for s, e in segs[:2]:
        strength[s:e] = _strength_profile(rng, e - s)
    other = np.zeros(n_clips)
    other[segs[2][0] : segs[2][1]] = 1.0
    planted = [(concept, strength), (distractor, other)]
    label = np.clip(
        np.rint(1 + 4 * strength[:, None] + rng.normal(0, 0.6, (n_clips, TVSUM_ANNOTATORS))), 1, 5
    )
    vid = _fake_id(rng, 11)
    row = {
        "qid": vid,
        "query": f"{domain} video about concept c{concept}",
        "duration": n_clips,
        "vid": vid,
        "relevant_clip_ids": None,
        "relevant_windows": None,
        "label": label.tolist(),
        "domain": domain,
    }
    texts = [_text_features(cfg, world, rng, concept, int(rng.integers(6, 16)))]
    return [row], _video_features(cfg, world, rng, n_clips, planted), texts


# --- planting into real annotations -------------------------------------------------------------


def _real_video(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, anns: list[Annotation]
):
    """Features for one real video whose queries keep their real windows and saliency."""
    clip_len = DEFAULT_CLIP_LEN[cfg.dataset]
    n_clips = max(1, math.ceil(anns[0].duration / clip_len - 1e-9))
    concepts = rng.permutation(cfg.n_concepts)
    planted, texts = [], []
    for j, ann in enumerate(anns):
        concept = int(concepts[j % cfg.n_concepts])
        strength = np.zeros(n_clips)
        if ann.dataset == "tvsum" and ann.label is not None:
            agg = (ann.label - 1.0).sum(axis=1)[:n_clips] / 80.0
            strength[: len(agg)] = agg / max(agg.max(), 1e-6)
        elif ann.clip_ids and ann.saliency and ann.dataset == "qvhighlights":
            for c, s in zip(ann.clip_ids, ann.saliency, strict=True):
                if c < n_clips:
                    strength[c] = max(0.25, sum(s) / 12.0)
        else:
            for st, ed in ann.windows:
                a, b = int(st // clip_len), max(int(st // clip_len) + 1, math.ceil(ed / clip_len))
                strength[a : min(b, n_clips)] = 1.0
        planted.append((concept, strength))
        n_tok = min(32, max(4, len(ann.query.split()) + 2))
        texts.append(_text_features(cfg, world, rng, concept, n_tok))
    return _video_features(cfg, world, rng, n_clips, planted), texts


# --- writing ------------------------------------------------------------------------------------


def _dirs(cfg: SyntheticConfig, root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    v = {n: root / OFFICIAL_DIR[(cfg.dataset, "video")][n] for n in cfg.video_sets}
    t = {n: root / OFFICIAL_DIR[(cfg.dataset, "text")][n] for n in cfg.text_sets}
    for p in [*v.values(), *t.values()]:
        p.mkdir(parents=True, exist_ok=True)
    return v, t


def _save_video(vdirs: dict[str, Path], vid: str, feats: dict[str, np.ndarray]) -> None:
    for name, x in feats.items():
        if name == "i3d":  # TVSum's I3D comes as an rgb + optical-flow pair of .npy files
            half = x.shape[1] // 2
            np.save(vdirs[name] / f"{vid}_rgb.npy", x[:, :half])
            np.save(vdirs[name] / f"{vid}_opt.npy", x[:, half:])
        else:
            np.savez(vdirs[name] / f"{vid}.npz", features=x)


def _save_text(
    tdirs: dict[str, Path], dataset: str, qid: int | str, feats: dict[str, np.ndarray]
) -> None:
    for name, x in feats.items():
        if dataset == "tvsum":
            np.savez(tdirs[name] / f"{qid}.npz", token=x)
        else:
            np.savez(
                tdirs[name] / f"qid{qid}.npz", last_hidden_state=x, pooler_output=x[-1:].copy()
            )


def _synthetic_videos(cfg: SyntheticConfig, world: _World) -> Iterator[tuple[bool, VideoItem]]:
    """(is_val, item) per video, deterministic in cfg.seed."""
    if cfg.dataset == "tvsum":
        n_val = max(1, round(cfg.videos * cfg.val_fraction)) if cfg.videos > 1 else 0
        for di, domain in enumerate(TVSUM_DOMAINS):
            for vi in range(cfg.videos):
                rng = np.random.default_rng([cfg.seed, 2, di, vi])
                yield vi >= cfg.videos - n_val, _tvsum_video(cfg, world, rng, vi, domain)
        return
    n_val = round(cfg.videos * cfg.val_fraction)
    make = _qvh_video if cfg.dataset == "qvhighlights" else _charades_video
    qid0 = 1 if cfg.dataset == "qvhighlights" else 10000
    for vi in range(cfg.videos):
        rng = np.random.default_rng([cfg.seed, 2, vi])
        item = make(cfg, world, rng, vi, qid0 + vi * cfg.queries_per_video)
        yield vi >= cfg.videos - n_val, item


def generate(cfg: SyntheticConfig, out: str | Path, annotations: str | Path | None = None):
    """Write the official layout under `out`; returns a SyntheticLayout.

    With `annotations`, the real rows (their first `cfg.videos` videos; all if videos <= 0) are
    kept verbatim and features are planted at their windows / saliency instead.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    world = _World(cfg)
    vdirs, tdirs = _dirs(cfg, root)
    train_name, val_name = SPLIT_FILES[cfg.dataset]
    counts = {"train": 0, "val": 0}
    if annotations is not None:
        anns = load_annotations(annotations, cfg.dataset)
        by_vid: dict[str, list[Annotation]] = {}
        for a in anns:
            by_vid.setdefault(a.vid, []).append(a)
        vids = list(by_vid)[: cfg.videos] if cfg.videos > 0 else list(by_vid)
        train_path = root / Path(annotations).name
        val_path = None
        with open(train_path, "w") as f:
            for vi, vid in enumerate(vids):
                rng = np.random.default_rng([cfg.seed, 3, vi])
                video, texts = _real_video(cfg, world, rng, by_vid[vid])
                _save_video(vdirs, vid, video)
                for ann, text in zip(by_vid[vid], texts, strict=True):
                    _save_text(tdirs, cfg.dataset, ann.qid, text)
                    f.write(json.dumps(ann.raw) + "\n")
                    counts["train"] += 1
    else:
        train_path, val_path = root / train_name, root / val_name
        with open(train_path, "w") as ftrain, open(val_path, "w") as fval:
            for is_val, (rows, video, texts) in _synthetic_videos(cfg, world):
                _save_video(vdirs, rows[0]["vid"], video)
                for row, text in zip(rows, texts, strict=True):
                    _save_text(tdirs, cfg.dataset, row["qid"], text)
                    (fval if is_val else ftrain).write(json.dumps(row) + "\n")
                    counts["val" if is_val else "train"] += 1
    layout = SyntheticLayout(
        root=root,
        dataset=cfg.dataset,
        train_jsonl=train_path,
        val_jsonl=val_path,
        video_dirs=list(vdirs.values()),
        text_dirs=list(tdirs.values()),
        num_train=counts["train"],
        num_val=counts["val"],
    )
    meta = {"config": asdict(cfg), "layout": {k: _jsonable(v) for k, v in asdict(layout).items()}}
    (root / META_FILE).write_text(json.dumps(meta, indent=1))
    return layout


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def parse_dims(spec: str | None) -> dict[str, int]:
    """`slowfast=64,clip=32` -> {"slowfast": 64, "clip": 32}; "tiny" -> small dims for tests."""
    if not spec:
        return {}
    if spec == "tiny":
        return dict(TINY_DIMS)
    out = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name not in FEATURE_DIMS and name not in TEXT_FEATURE_DIMS:
            raise ValueError(f"--dims: unknown feature set {name!r}")
        out[name] = int(value)
        if name == "i3d" and out[name] % 2:
            raise ValueError("--dims: i3d must be even (it is stored as an rgb + flow pair)")
    return out


def _default_videos(args: argparse.Namespace) -> int:
    if args.annotations is not None:
        return 0
    return 5 if args.dataset == "tvsum" else 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vl.data.synthetic",
        description="Write synthetic features + annotations in the official layout.",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(SPLIT_FILES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--videos",
        type=int,
        help="videos (TVSum: per domain, default 5 = 4 train + 1 val; others default 100; "
        "with --annotations: the first N real videos, default all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotations", type=Path, help="plant features at these real rows")
    parser.add_argument("--dims", help="'tiny' or NAME=DIM[,NAME=DIM] (default: real dims)")
    parser.add_argument("--tiny", action="store_true", help="same as --dims tiny")
    parser.add_argument("--queries-per-video", type=int)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--video-sets", help="comma-separated video feature sets")
    parser.add_argument("--text-sets", help="comma-separated text feature sets")
    parser.add_argument("--tvsum-domain-concepts", action="store_true",
                        help="TVSum: all videos of a domain share the domain's concept")
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(
        dataset=args.dataset,
        videos=args.videos if args.videos is not None else _default_videos(args),
        seed=args.seed,
        dims=parse_dims("tiny" if args.tiny else args.dims),
        queries_per_video=args.queries_per_video,
        val_fraction=args.val_fraction,
        video_sets=tuple(args.video_sets.split(",")) if args.video_sets else (),
        text_sets=tuple(args.text_sets.split(",")) if args.text_sets else DEFAULT_TEXT_SETS,
        tvsum_domain_concepts=args.tvsum_domain_concepts,
    )
    layout = generate(cfg, args.out, args.annotations)
    print(
        json.dumps(
            {
                "out": str(layout.root),
                "train": str(layout.train_jsonl),
                "val": str(layout.val_jsonl) if layout.val_jsonl else None,
                "num_train": layout.num_train,
                "num_val": layout.num_val,
                "video_features": layout.video_arg(),
                "text_features": layout.text_arg(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
