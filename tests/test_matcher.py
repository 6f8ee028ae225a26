"""Hungarian matching equals a brute-force search over assignments."""

from __future__ import annotations

import itertools

import torch

from vl.losses.matcher import HungarianMatcher


def brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost of assigning each target (column) to a distinct prediction (row)."""
    nq, nt = cost.shape
    return min(
        sum(float(cost[r, c]) for c, r in enumerate(rows))
        for rows in itertools.permutations(range(nq), nt)
    )


def test_matcher_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_span=10, cost_giou=1, cost_class=4)
    for _ in range(20):
        N, Nq, W = 3, 5, 3
        logits = torch.randn(N, Nq, 2, generator=g)
        spans = torch.rand(N, Nq, 2, generator=g) * 0.5 + 0.1
        tgt = torch.rand(N, W, 2, generator=g) * 0.5 + 0.1
        counts = torch.randint(1, W + 1, (N,), generator=g)
        mask = torch.arange(W)[None] < counts[:, None]
        n, q, t = matcher(logits, spans, tgt, mask)
        cost = matcher.cost_matrix(logits, spans, tgt)
        for s in range(N):
            k = int(counts[s])
            sel = n == s
            assert sel.sum() == k
            assert sorted(t[sel].tolist()) == list(range(k))
            assert len(set(q[sel].tolist())) == k  # one prediction per target
            got = float(cost[s, q[sel], t[sel]].sum())
            assert abs(got - brute_force(cost[s, :, :k])) < 1e-5


def test_matcher_skips_samples_without_targets():
    matcher = HungarianMatcher(1, 1, 1)
    logits, spans = torch.randn(2, 4, 2), torch.rand(2, 4, 2)
    tgt = torch.rand(2, 2, 2)
    mask = torch.tensor([[True, False], [False, False]])
    n, q, t = matcher(logits, spans, tgt, mask)
    assert n.tolist() == [0] and t.tolist() == [0]


def test_perfect_prediction_is_matched_to_its_target():
    matcher = HungarianMatcher(10, 1, 4)
    tgt = torch.tensor([[[0.3, 0.2], [0.7, 0.1]]])
    spans = torch.tensor([[[0.9, 0.05], [0.7, 0.1], [0.1, 0.1], [0.3, 0.2]]])
    logits = torch.zeros(1, 4, 2)
    _, q, t = matcher(logits, spans, tgt, torch.ones(1, 2, dtype=torch.bool))
    assert dict(zip(t.tolist(), q.tolist())) == {0: 3, 1: 1}
