"""Random but realistic batches (masks, windows, saliency, pairs) for tests and benchmarks.

Shapes and label statistics follow the reference benchmark (VIDEOLIGHTS_SPEC section 7): 20 % of
samples have 60-75 valid clips, 8-32 valid tokens, 1-3 GT windows, saliency 0..12 on the
relevant clips, and the real pair-sampling rules (hard + easy positive / negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vl.data.batch import Batch


def random_batch(
    batch_size: int,
    clips: int,
    query_tokens: int,
    video_dims: list[int],
    text_dims: list[int],
    *,
    seed: int = 0,
    clip_len: float = 2.0,
    has_spans: bool = True,
    max_windows: int = 3,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B, Lv, Lq = batch_size, clips, query_tokens

    def rand_int(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    v_len = [
        rand_int(max(1, int(0.8 * Lv)), Lv) if torch.rand(1, generator=g) < 0.2 else Lv
        for _ in range(B)
    ]
    t_len = [rand_int(min(8, Lq), Lq) for _ in range(B)]
    video_mask = torch.zeros(B, Lv)
    text_mask = torch.zeros(B, Lq)
    for b in range(B):
        video_mask[b, : v_len[b]] = 1
        text_mask[b, : t_len[b]] = 1
    parts = [F.normalize(torch.randn(B, Lv, d, generator=g), dim=-1) for d in video_dims]
    idx = torch.arange(Lv, dtype=torch.float32)
    lens = torch.tensor(v_len, dtype=torch.float32)[:, None]
    tef = torch.stack((idx[None] / lens, (idx[None] + 1) / lens), dim=-1)
    video = torch.cat([*parts, tef], dim=-1) * video_mask[..., None]
    text = (
        torch.cat(
            [F.normalize(torch.randn(B, Lq, d, generator=g), dim=-1) for d in text_dims], dim=-1
        )
        * text_mask[..., None]
    )

    span_targets = torch.zeros(B, max_windows, 2)
    span_mask = torch.zeros(B, max_windows, dtype=torch.bool)
    labels = torch.zeros(B, Lv)
    pos_idx = torch.zeros(B, 2, dtype=torch.long)
    neg_idx = torch.zeros(B, 2, dtype=torch.long)
    for b in range(B):
        L = v_len[b]
        n_win = rand_int(1, max_windows)
        relevant = torch.zeros(L, dtype=torch.bool)
        for w in range(n_win):
            st = rand_int(0, L - 1)
            ed = rand_int(st + 1, min(L, st + max(2, L // 3)))
            relevant[st:ed] = True
            span_targets[b, w] = torch.tensor([(st + ed) / 2 / L, (ed - st) / L])
            span_mask[b, w] = True
        rel = relevant.nonzero().flatten()
        scores = torch.randint(1, 13, (len(rel),), generator=g).float()
        labels[b, rel] = scores
        non = (~relevant).nonzero().flatten()
        hard_pos, hard_neg = rel[scores.argmax()], rel[scores.argmin()]
        easy_pos = rel[rand_int(0, len(rel) - 1)]
        easy_neg = non[rand_int(0, len(non) - 1)] if len(non) else hard_neg
        pos_idx[b] = torch.stack((hard_pos, easy_pos))
        neg_idx[b] = torch.stack((hard_neg, easy_neg))
    if not has_spans:
        span_mask[:] = False
    return Batch(
        video=video,
        video_mask=video_mask,
        text=text,
        text_mask=text_mask,
        span_targets=span_targets,
        span_mask=span_mask,
        saliency_labels=labels,
        saliency_pos_idx=pos_idx,
        saliency_neg_idx=neg_idx,
        has_spans=has_spans,
        qids=list(range(B)),
        vids=[f"v{b}" for b in range(B)],
        queries=["q"] * B,
        durations=[v * clip_len for v in v_len],
        clip_len=clip_len,
    )
