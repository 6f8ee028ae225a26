"""The padded batch every model, loss and engine function consumes, and the one function that
pads per-sample arrays into it.

Every producer of a `Batch` (the shard loader's collate, the served model's input handling, the
synthetic batches of tests and benchmarks) goes through `pad_batch`, so the padding, mask and
TEF conventions are written once; the model reads the features and masks, the criterion reads
the targets. A typed dataclass means a field travels by name, never as a loose dict key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from vl.config import TEF_DIMS
from vl.data.annotations import Targets


@dataclass
class Batch:
    """A collated batch. Masks are float, 1 = valid.

    Shapes: B samples, Lv clips (batch max), Lq text tokens (batch max), W max windows, P pairs.
    """

    video: torch.Tensor  # (B, Lv, Dv) float32, L2-normalised feature sets + 2 TEF dims
    # (a half-precision batch: (B, Lv, Dv - 2) float16 feature sets, TEF in `video_tef`)
    video_mask: torch.Tensor  # (B, Lv) float32
    text: torch.Tensor  # (B, Lq, Dt) float32 (float16 in a half-precision batch), L2-normalised
    text_mask: torch.Tensor  # (B, Lq) float32
    span_targets: torch.Tensor  # (B, W, 2) float32 (center, width) in [0, 1]; zeros where padded
    span_mask: torch.Tensor  # (B, W) bool, True = a real GT window
    saliency_labels: torch.Tensor  # (B, Lv) float32 in 0..12, 0 on padding
    saliency_pos_idx: torch.Tensor  # (B, P) int64 clip indices of positive clips
    saliency_neg_idx: torch.Tensor  # (B, P) int64 clip indices of negative clips
    has_spans: bool = True  # False for HD-only data (TVSum): no matcher, no MR losses
    qids: list = field(default_factory=list)
    vids: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds (TVSum: number of clips)
    clip_len: float = 2.0  # seconds per clip
    video_tef: torch.Tensor | None = None  # (B, Lv, 2) float32, set only in a half batch

    @property
    def is_half(self) -> bool:
        """True for a half-precision transport batch (`pad_batch(..., half=True)`)."""
        return self.video_tef is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor field to `device` (metadata is left as is).

        A half batch crosses to the device in float16 (half the bytes to pin and copy) and is
        widened there: the float32 video gets its feature sets (float16 -> float32 is exact)
        and the float32 TEF dims, the text is cast, so the model sees exactly the float32 batch
        `pad_batch(..., half=False)` builds from the same float16 shard features.
        """
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        if self.video_tef is not None:
            half_video, tef = moved["video"], moved.pop("video_tef")  # (B, Lv, D) f16, (B, Lv, 2)
            D = half_video.shape[-1]
            video = torch.empty(*half_video.shape[:-1], D + TEF_DIMS, device=half_video.device)
            video[..., :D] = half_video  # (B, Lv, D) float16 -> float32
            video[..., D:] = tef
            moved["video"], moved["video_tef"] = video, None  # (B, Lv, D + 2) float32
            moved["text"] = moved["text"].float()  # (B, Lq, Dt)
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """The batch with every tensor in page-locked memory (DataLoader(pin_memory=True) calls
        this), so a following `to(cuda, non_blocking=True)` is an asynchronous copy."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def __len__(self) -> int:
        return self.video.shape[0]

    def padded_to(self, max_v_l: int, max_q_l: int) -> Batch:
        """The same batch with clips padded to `max_v_l` and tokens to `max_q_l` (zeros, mask 0).

        Static shapes let a compiled model (torch.compile, CUDA graphs) build its graph once
        instead of once per batch maximum; every model output and loss term on the valid clips
        equals the batch-maximum path's (masks carry the lengths, the losses normalise by them).
        """
        Lv, Lq = self.video.shape[1], self.text.shape[1]
        if Lv > max_v_l or Lq > max_q_l:
            raise ValueError(f"batch of {Lv} clips / {Lq} tokens exceeds the static shape "
                             f"{max_v_l} / {max_q_l} (data.max_v_l / data.max_q_l)")
        dv, dq = max_v_l - Lv, max_q_l - Lq
        if dv == 0 and dq == 0:
            return self
        clip_pad = (0, 0, 0, dv)  # F.pad order: last dim first
        return replace(
            self,
            video=F.pad(self.video, clip_pad),  # (B, max_v_l, Dv)
            video_mask=F.pad(self.video_mask, (0, dv)),  # (B, max_v_l)
            saliency_labels=F.pad(self.saliency_labels, (0, dv)),  # (B, max_v_l)
            text=F.pad(self.text, (0, 0, 0, dq)),  # (B, max_q_l, Dt)
            text_mask=F.pad(self.text_mask, (0, dq)),  # (B, max_q_l)
            video_tef=None if self.video_tef is None else F.pad(self.video_tef, clip_pad),
        )


_NO_TARGETS_PAIRS = 2  # pairs per sample of the dummy targets an inference batch carries


def pad_batch(
    video: Sequence[Sequence[np.ndarray | torch.Tensor]],
    text: Sequence[Sequence[np.ndarray | torch.Tensor]],
    targets: Sequence[Targets] | None = None,
    *,
    add_tef: bool = True,
    has_spans: bool = True,
    qids: Sequence | None = None,
    vids: Sequence[str] = (),
    queries: Sequence[str] = (),
    durations: Sequence[float] = (),
    clip_len: float = 2.0,
    half: bool = False,
) -> Batch:
    """Pad per-sample arrays to the batch maxima -> Batch (float masks, 1 = valid).

    `video[i]` / `text[i]` are sample i's feature sets, each (L_i, d_k) with one L_i per sample;
    they are concatenated along the feature axis and written straight into the float32 batch
    tensor (a float16 shard view is converted exactly once). With `add_tef` the 2 TEF dims
    (i/L, (i+1)/L) follow the video sets. Padding is zero everywhere. Span targets are padded to
    the batch's max window count (at least 1); `targets=None` (inference) gives empty spans,
    zero saliency and zero pair indices.

    With `half` (needs `add_tef`) the features are written to float16 tensors instead and the
    TEF dims to a separate float32 `video_tef`: a half batch is the loader's transport form
    (float16 shard features are copied, not converted) and `Batch.to` widens it on the device.
    """
    if not video:
        raise ValueError("pad_batch got no samples")
    if len(text) != len(video) or (targets is not None and len(targets) != len(video)):
        raise ValueError("pad_batch: video, text and targets differ in sample count")
    B = len(video)
    n_v = [len(sets[0]) for sets in video]
    n_t = [len(sets[0]) for sets in text]
    Lv, Lq = max(n_v), max(n_t)
    dv = [v.shape[1] for v in video[0]]
    dt = [t.shape[1] for t in text[0]]
    if half and not add_tef:
        raise ValueError("pad_batch: a half batch carries its TEF separately (add_tef=True)")
    dtype = torch.float16 if half else torch.float32
    tef = TEF_DIMS if add_tef and not half else 0
    out_video = _batch_tensor(B, Lv, sum(dv) + tef, dtype=dtype)  # every element written below
    out_tef = _batch_tensor(B, Lv, TEF_DIMS) if half else out_video  # (B, Lv, 2) | the video
    tef_off = 0 if half else sum(dv)
    video_mask = torch.zeros(B, Lv)
    out_text = _batch_tensor(B, Lq, sum(dt), dtype=dtype)
    text_mask = torch.zeros(B, Lq)
    for i in range(B):
        if [v.shape[1] for v in video[i]] != dv or [t.shape[1] for t in text[i]] != dt:
            raise ValueError(f"sample {i} (qid {_qid(qids, i)!r}): feature dims differ from "
                             "the batch's first sample")
        L, Lt = n_v[i], n_t[i]
        _write_sets(out_video[i], video[i], L)
        if add_tef:
            start = torch.arange(L, dtype=torch.float32) / L
            out_tef[i, :L, tef_off] = start
            out_tef[i, :L, tef_off + 1] = start + 1.0 / L
        if half:
            out_tef[i, L:] = 0.0
        out_video[i, L:] = 0.0
        video_mask[i, :L] = 1.0
        _write_sets(out_text[i], text[i], Lt)
        out_text[i, Lt:] = 0.0
        text_mask[i, :Lt] = 1.0
    spans, span_mask, saliency, pos, neg = _pad_targets(targets, B, Lv, n_v, qids)
    return Batch(
        video=out_video, video_mask=video_mask, text=out_text, text_mask=text_mask,
        span_targets=spans, span_mask=span_mask, saliency_labels=saliency,
        saliency_pos_idx=pos, saliency_neg_idx=neg, has_spans=has_spans,
        qids=list(qids) if qids is not None else list(range(B)), vids=list(vids),
        queries=list(queries), durations=list(durations), clip_len=clip_len,
        video_tef=out_tef if half else None,
    )  # fmt: skip


def _write_sets(row: torch.Tensor, sets: Sequence[np.ndarray | torch.Tensor], n: int) -> int:
    """Copy feature sets side by side into row[:n] ((L, D) view); returns the next free column."""
    off = 0
    for a in sets:
        row[:n, off : off + a.shape[1]] = torch.as_tensor(a)
        off += a.shape[1]
    return off


def _pad_targets(
    targets: Sequence[Targets] | None, B: int, Lv: int, n_v: list[int], qids: Sequence | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(span_targets (B, W, 2), span_mask (B, W), saliency (B, Lv), pos (B, P), neg (B, P))."""
    saliency = torch.zeros(B, Lv)
    if targets is None:
        P = _NO_TARGETS_PAIRS
        return (torch.zeros(B, 1, 2), torch.zeros(B, 1, dtype=torch.bool), saliency,
                torch.zeros(B, P, dtype=torch.int64), torch.zeros(B, P, dtype=torch.int64))
    W = max(1, max(len(t.spans) for t in targets))
    span_targets = torch.zeros(B, W, 2)
    span_mask = torch.zeros(B, W, dtype=torch.bool)
    P = len(targets[0].pos_idx)
    pos = torch.empty(B, P, dtype=torch.int64)
    neg = torch.empty(B, P, dtype=torch.int64)
    for i, t in enumerate(targets):
        if len(t.pos_idx) != P:
            raise ValueError(f"qid {_qid(qids, i)!r}: {len(t.pos_idx)} pairs, batch has {P}")
        w = len(t.spans)
        if w:
            span_targets[i, :w] = torch.as_tensor(t.spans)
            span_mask[i, :w] = True
        L = n_v[i]
        saliency[i, :L] = torch.as_tensor(t.saliency_labels[:L])
        pos[i] = torch.as_tensor(t.pos_idx)
        neg[i] = torch.as_tensor(t.neg_idx)
    return span_targets, span_mask, saliency, pos, neg


def _qid(qids: Sequence | None, i: int) -> object:
    return qids[i] if qids is not None else i


def _batch_tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised float32 (or `dtype`) tensor for a batch (~35 MB at QVHighlights dims).

    Inside a DataLoader worker it is allocated in shared memory directly (as torch's
    default_collate does), which saves copying the batch into shared memory when the worker
    hands it to the main process. In-process it comes from NumPy, which asks the kernel for
    transparent huge pages on large allocations: a fresh 35 MB torch.empty takes ~8,600 page
    faults on first write and glibc unmaps it again on free (it is above the 32 MB mmap
    threshold), so every batch paid them; on this project's VMs that was 1.5 ms per sample, more
    than all the other collation work together (huge pages: 0.2 ms).
    """
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))
    numel = 1
    for n in shape:
        numel *= n
    like = torch.empty(0, dtype=dtype)
    storage = like._typed_storage()._new_shared(numel)
    return like.new(storage).view(*shape)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
