"""Rotary position embedding (RoPE, Su et al. 2021) as one autograd Function.

Channel pairs ``(x[2i], x[2i+1])`` (interleaved, as in the RoFormer paper and Meta's
LLaMA code; GPT-NeoX/Hugging Face pair ``x[i]`` with ``x[i + hd/2]`` instead) are rotated
by the angle ``position * theta_i``, ``theta_i = base ** (-2i / hd)``::

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

A rotation's adjoint is the rotation by the negative angle, so that is the backward.
Shape legend: x (B, H, N, hd), positions (N,), cos/sin (N, hd/2).
"""

from __future__ import annotations

import numpy as np

from ..autograd import Function
from ..tensor import Tensor
from .module import Module


class Rotary(Function):
    """Rotate channel pairs of x (..., N, hd) by angles with cos/sin (N, hd/2)."""

    @staticmethod
    def forward(ctx, x, *, cos, sin):
        ctx.cos, ctx.sin = cos, sin
        x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (B, H, N, hd/2) each
        out = np.empty_like(x)
        out[..., 0::2] = x_even * cos - x_odd * sin
        out[..., 1::2] = x_even * sin + x_odd * cos
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.cos, ctx.sin
        # forward: out_even = x_even cos - x_odd sin, out_odd = x_even sin + x_odd cos
        #   -> dx_even = g_even cos + g_odd sin, dx_odd = -g_even sin + g_odd cos
        #      (the rotation by -angle)
        g_even, g_odd = grad[..., 0::2], grad[..., 1::2]
        dx = np.empty_like(grad)
        dx[..., 0::2] = g_even * cos + g_odd * sin
        dx[..., 1::2] = g_odd * cos - g_even * sin
        return dx


class RotaryEmbedding(Module):
    """``rope(x, positions)``: x (B, H, N, hd) with hd even, positions int (N,).

    No parameters and no state: the frequencies are fixed by ``head_dim`` and ``base``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, float(base)
        self.inv_freq = self.base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)

    def angles(self, positions) -> np.ndarray:
        """(N, hd/2) float64 angles position * theta_i."""
        positions = np.asarray(positions)
        if not np.issubdtype(positions.dtype, np.integer):
            raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
        return positions.astype(np.float64)[..., None] * self.inv_freq

    def forward(self, x: Tensor, positions) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected head dim {self.head_dim} in the last axis, got shape {x.shape}")
        if np.shape(positions)[-1:] != x.shape[-2:-1]:
            raise ValueError(f"positions of shape {np.shape(positions)} do not match N={x.shape[-2]}")
        theta = self.angles(positions)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        return Rotary.apply(x, cos=np.cos(theta).astype(dtype), sin=np.sin(theta).astype(dtype))

    def extra_repr(self):
        return f"{self.head_dim}, base={self.base}"
