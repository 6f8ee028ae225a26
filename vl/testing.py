"""Test and benchmark helpers shipped with the package (as `numpy.testing`, `torch.testing`):
random but realistic batches (masks, windows, saliency, pairs).

Shapes and label statistics follow the reference benchmark (VIDEOLIGHTS_SPEC section 7): 20 % of
samples have 60-75 valid clips, 8-32 valid tokens, 1-3 GT windows, saliency 0..12 on the
relevant clips, and the real pair-sampling rules (hard + easy positive / negative). The batch is
padded by `vl.data.batch.pad_batch`, the same function the loader and the served model use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vl.data.annotations import Targets
from vl.data.batch import Batch, pad_batch


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
    """A seeded synthetic batch of `batch_size` samples of at most `clips` clips and
    `query_tokens` tokens, with one L2-normalised feature set per entry of the dims lists."""
    g = torch.Generator().manual_seed(seed)
    B, Lv, Lq = batch_size, clips, query_tokens

    def rand_int(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    v_len = [
        rand_int(max(1, int(0.8 * Lv)), Lv) if torch.rand(1, generator=g) < 0.2 else Lv
        for _ in range(B)
    ]
    t_len = [rand_int(min(8, Lq), Lq) for _ in range(B)]
    video = [F.normalize(torch.randn(B, Lv, d, generator=g), dim=-1) for d in video_dims]
    text = [F.normalize(torch.randn(B, Lq, d, generator=g), dim=-1) for d in text_dims]
    targets = [_random_targets(v_len[b], max_windows, has_spans, g, rand_int) for b in range(B)]
    return pad_batch(
        [[v[b, : v_len[b]] for v in video] for b in range(B)],
        [[t[b, : t_len[b]] for t in text] for b in range(B)],
        targets, has_spans=has_spans, qids=list(range(B)), vids=[f"v{b}" for b in range(B)],
        queries=["q"] * B, durations=[v * clip_len for v in v_len], clip_len=clip_len,
    )  # fmt: skip


def _random_targets(L: int, max_windows: int, has_spans: bool, g: torch.Generator,
                    rand_int: Callable[[int, int], int]) -> Targets:  # fmt: skip
    """1..max_windows windows over L clips, saliency 1..12 on their clips, hard + easy pairs."""
    n_win = rand_int(1, max_windows)
    relevant = torch.zeros(L, dtype=torch.bool)
    spans = np.zeros((n_win, 2), np.float32)
    for w in range(n_win):
        st = rand_int(0, L - 1)
        ed = rand_int(st + 1, min(L, st + max(2, L // 3)))
        relevant[st:ed] = True
        spans[w] = ((st + ed) / 2 / L, (ed - st) / L)
    rel = relevant.nonzero().flatten()
    scores = torch.randint(1, 13, (len(rel),), generator=g).float()
    labels = torch.zeros(L)
    labels[rel] = scores
    non = (~relevant).nonzero().flatten()
    hard_pos, hard_neg = rel[scores.argmax()], rel[scores.argmin()]
    easy_pos = rel[rand_int(0, len(rel) - 1)]
    easy_neg = non[rand_int(0, len(non) - 1)] if len(non) else hard_neg
    return Targets(
        spans=spans if has_spans else spans[:0],
        saliency_labels=labels.numpy(),
        pos_idx=torch.stack((hard_pos, easy_pos)).numpy(),
        neg_idx=torch.stack((hard_neg, easy_neg)).numpy(),
    )
