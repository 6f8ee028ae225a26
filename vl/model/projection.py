"""Convolutional input projection of video clips and text tokens into the model width."""

from __future__ import annotations

import torch
from torch import nn

from vl.model.layers import Dropout


class ProjectionBlock(nn.Module):
    """LayerNorm -> Dropout -> Conv1d(kernel k) [-> ReLU].

    Kernel 1 (what produced the published numbers) is a per-position linear map, so it runs as
    `nn.Linear` (same parameters, faster on CPU). Wider kernels see temporal neighbours; padded
    positions are zeroed first so they never leak into valid ones.
    """

    def __init__(
        self, in_dim: int, out_dim: int, dropout: float, kernel_size: int, relu: bool
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = Dropout(dropout)
        self.kernel_size = kernel_size
        if kernel_size == 1:
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        self.relu = relu

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.norm(x))
        if self.kernel_size == 1:
            x = self.proj(x)
        else:
            x = x * mask[..., None]
            x = self.proj(x.transpose(1, 2)).transpose(1, 2)
        return torch.relu(x) if self.relu else x


class InputProjection(nn.Module):
    """`n_blocks` projection blocks; ReLU after the first only (spec 2.1 / 6c.2)."""

    def __init__(
        self, in_dim: int, out_dim: int, n_blocks: int, dropout: float, kernel_size: int
    ) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * n_blocks
        self.blocks = nn.ModuleList(
            ProjectionBlock(dims[i], dims[i + 1], dropout, kernel_size, relu=(i == 0))
            for i in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, in_dim), mask (B, L) bool -> (B, L, out_dim)."""
        for block in self.blocks:
            x = block(x, mask)
        return x
