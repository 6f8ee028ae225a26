"""Small building blocks shared by the VideoLights modules: attention, MLP, dropout, positions.

Attention is batch-first and runs on `scaled_dot_product_attention` (PyTorch's fused CPU/GPU
kernel) whenever no attention-weight dropout is needed; masks are additive float tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the DETR box-head shape)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def split_heads(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """(B, L, H*hd) -> (B, H, L, hd)."""
    B, L, D = x.shape
    return x.unflatten(-1, (nheads, D // nheads)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) -> (B, L, H*hd)."""
    B, H, L, hd = x.shape
    return x.transpose(1, 2).reshape(B, L, H * hd)


def additive_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lk) bool, True = valid -> (B, 1, 1, Lk) additive mask (0 or a large negative).

    SDPA's CPU kernel is about 3x slower with a boolean mask than with an additive float one,
    so masks are converted once per forward and shared by every attention layer.
    """
    neg = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    neg.masked_fill_(~key_mask, -1e9 if dtype == torch.float32 else -1e4)
    return neg[:, None, None, :]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """Multi-head attention on (B, H, L, hd) tensors (q/k may be wider than v).

    key_mask: None, a (B, Lk) bool mask (True = valid), or an additive mask from
    `additive_mask` (preferred: cheaper). Without dropout this is SDPA's fused kernel. With
    attention-weight dropout on a CPU, SDPA falls back to an unfused path that draws its mask
    with `bernoulli_`; the explicit softmax + cheap-mask dropout below is ~2x faster there.
    """
    if key_mask is not None and key_mask.dtype == torch.bool:
        key_mask = additive_mask(key_mask, q.dtype)
    if key_mask is not None and key_mask.dtype != q.dtype:
        key_mask = key_mask.to(q.dtype)
    if dropout == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
    # The 1/sqrt(hd) scale goes on q (Lq x hd) rather than the scores (Lq x Lk), and the mask is
    # added in place: two fewer passes over the largest tensor of the layer.
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    if key_mask is not None:
        scores.add_(key_mask)
    weights = _DropoutFn.apply(scores.softmax(dim=-1), dropout)
    return torch.matmul(weights, v)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v inputs (positions are added by the caller).

    Same parameters as `nn.MultiheadAttention` (a 3d x d input projection and a d x d output),
    but batch-first and always on SDPA. When two inputs are the same tensor (self-attention's
    q = k, cross-attention's k = v) their projections run as one GEMM twice as wide.
    """

    def __init__(self, dim: int, nheads: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.nheads = nheads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        d = self.dim
        if query is key:
            q, k = _fused_linear(query, self.q_proj, self.k_proj).split(d, dim=-1)
            v = self.v_proj(value)
        elif key is value:
            q = self.q_proj(query)
            k, v = _fused_linear(key, self.k_proj, self.v_proj).split(d, dim=-1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        H = self.nheads
        drop = self.dropout if self.training else 0.0
        out = attend(split_heads(q, H), split_heads(k, H), split_heads(v, H), key_mask, drop)
        return self.out_proj(merge_heads(out))


def _fused_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """Several Linear layers on the same input as one wider GEMM.

    The weights are concatenated (not sliced out of one parameter): the backward of a `cat` is
    a view per layer, while slicing a shared parameter would zero-fill a full-size gradient per
    slice.
    """
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias)


class FeedForward(nn.Module):
    """d -> F -> d with a learnable PReLU, as the reference transformer (`activation='prelu'`)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.activation = nn.PReLU()
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        if h.device.type == "cpu" and not torch.compiler.is_compiling():
            p = self.dropout.p if self.training else 0.0
            return self.linear2(_PReLUDropoutFn.apply(h, self.activation.weight, p))
        return self.linear2(self.dropout(self.activation(h)))


class _PReLUDropoutFn(torch.autograd.Function):
    """PReLU with one shared slope (FeedForward's), then inverted dropout, as one autograd
    node (CPU).

    ATen's CPU PReLU backward is slow: on a 64x76x1024 FFN activation, one thread, native PReLU
    forward + backward took ~41 ms where the forward plus the closed forms below take ~26 ms,
    and the FFN hidden activation is the largest tensor of every layer. Saves the same tensors
    as the separate modules (the pre-activation and the keep mask) and gives the same values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: torch.Tensor, p: float) -> torch.Tensor:  # noqa: D102
        a = slope.to(x.dtype)
        y = F.prelu(x, a)
        keep = None
        if p > 0.0:
            keep = _keep_mask(x.shape, p, x.device)
            y = _apply_keep(y, keep, p)
        ctx.p, ctx.slope_dtype = p, slope.dtype
        ctx.save_for_backward(x, a, keep)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, a, keep = ctx.saved_tensors
        if keep is not None:
            grad = _apply_keep(grad, keep, ctx.p)
        grad_slope = None
        if ctx.needs_input_grad[1]:  # d/da a*min(x, 0) summed over every element
            neg = x.clamp(max=0.0)
            grad_slope = torch.dot(grad.reshape(-1), neg.reshape(-1)).reshape(1).to(ctx.slope_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:  # slope 1 where x > 0, a elsewhere
            grad_x = (x > 0).to(grad.dtype).mul_(1.0 - a).add_(a).mul_(grad)
        return grad_x, grad_slope, None


def sine_positions(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of the normalised cumulative mask: (B, L) -> (B, L, dim).

    Normalising by the valid length makes a clip's position depend on where it sits in its own
    video, never on how much padding the batch added.
    """
    mask = mask.float()
    cum = mask.cumsum(1)
    pos = cum / (cum[:, -1:] + 1e-6) * (2 * math.pi)  # (B, L)
    return _interleaved_sine(pos, dim, temperature)


def _interleaved_sine(pos: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    idx = torch.arange(dim, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / dim)
    x = pos[..., None] / dim_t  # (..., dim)
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def anchor_sine(anchors: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of 1-D anchors (..., 2) (center, width) in [0,1] -> (..., dim).

    Half of the dimensions encode the center, half the width (the reference hard-codes 128 + 128
    for d = 256; here the split follows d).
    """
    half = dim // 2
    scaled = anchors * (2 * math.pi)
    center = _interleaved_sine(scaled[..., 0], half, temperature)
    width = _interleaved_sine(scaled[..., 1], half, temperature)
    return torch.cat((center, width), dim=-1)


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask with P(keep) = 1 - p, from 15 random bits per element.

    `torch.bernoulli_` draws one generator call per element and dominated the CPU step time
    (about a quarter of it on the paper preset); one 64-bit draw per four elements is ~5x
    cheaper. 15 bits quantise p to 1/32768, far below anything a dropout rate can notice.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = bits.view(torch.int16)[:n].view(shape)
    return (lanes & 0x7FFF) >= round(p * 32768)


def _apply_keep(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep mask: zero the dropped elements, scale by 1/(1-p).
    The same expression is the forward of the values and the backward of their gradients."""
    return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - p))


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # noqa: D102
        keep = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.p = p
        return _apply_keep(x, keep, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (keep,) = ctx.saved_tensors
        return _apply_keep(grad, keep, ctx.p), None


class Dropout(nn.Module):
    """Inverted dropout with a cheap CPU mask (see `_keep_mask`); identity in eval mode.

    Only on the CPU: there `bernoulli_` is the slow part. On a GPU the native fused kernel is
    2.6x faster than the mask's five kernels (H200, 64x150x1024 fp32, fwd+bwd 0.21 vs 0.54 ms).
    Under torch.compile the native op is traced instead (as in `attend` and `FeedForward`): the
    compiler fuses it with its neighbours, which a hand-written autograd node would prevent.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        return _DropoutFn.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
