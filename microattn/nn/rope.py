"""Rotary position embedding (RoPE, Su et al. 2021) as one autograd Function.

Channel pairs ``(a_i, b_i)`` are rotated by the angle ``position * theta_i``,
``theta_i = base ** (-2i / hd)``::

    out_a = a cos - b sin
    out_b = a sin + b cos

Which channels pair up is ``pairs``: "interleaved" pairs ``(x[2i], x[2i+1])`` (the RoFormer
paper, Meta's LLaMA code, the default here); "halves" pairs ``(x[i], x[i + hd/2])``
(GPT-NeoX and Hugging Face's ``rotate_half``, what their checkpoints expect). Long-context
variants rescale the frequencies ``theta_i`` once (``scaling``, e.g. ``llama3_scaling``).

A rotation's adjoint is the rotation by the negative angle, so that is the backward.
Shape legend: x (B, H, N, hd), positions (N,), cos/sin (N, hd/2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..autograd import Function
from ..tensor import Tensor
from .module import Module

PAIRS = ("interleaved", "halves")


def _pair_slices(hd: int, pairs: str) -> tuple[slice, slice]:
    """The channels a_i and b_i that rotate together, as slices of the last axis."""
    if pairs == "interleaved":
        return slice(0, None, 2), slice(1, None, 2)  # (x[2i], x[2i+1])
    return slice(0, hd // 2), slice(hd // 2, None)  # (x[i], x[i + hd/2])


class Rotary(Function):
    """Rotate channel pairs of x (..., N, hd) by angles with cos/sin (N, hd/2)."""

    @staticmethod
    def forward(ctx, x, *, cos, sin, pairs="interleaved"):
        ctx.cos, ctx.sin, ctx.pairs = cos, sin, pairs
        a, b = _pair_slices(x.shape[-1], pairs)
        x_a, x_b = x[..., a], x[..., b]  # (B, H, N, hd/2) each
        out = np.empty_like(x)
        out[..., a] = x_a * cos - x_b * sin
        out[..., b] = x_a * sin + x_b * cos
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.cos, ctx.sin
        # forward: out_a = x_a cos - x_b sin, out_b = x_a sin + x_b cos
        #   -> dx_a = g_a cos + g_b sin, dx_b = -g_a sin + g_b cos
        #      (the rotation by -angle)
        a, b = _pair_slices(grad.shape[-1], ctx.pairs)
        g_a, g_b = grad[..., a], grad[..., b]
        dx = np.empty_like(grad)
        dx[..., a] = g_a * cos + g_b * sin
        dx[..., b] = g_b * cos - g_a * sin
        return dx


def llama3_scaling(inv_freq: np.ndarray, *, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """Llama 3.1's long-context frequencies (``rope_scaling`` type "llama3").

    With L = original_max_position_embeddings and wavelength 2 pi / theta_i:
    wavelengths shorter than L / high_freq_factor keep theta_i; longer than
    L / low_freq_factor get theta_i / factor; in between, theta_i is interpolated::

        smooth = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        theta  = (1 - smooth) * theta_i / factor + smooth * theta_i
    """
    if high_freq_factor == low_freq_factor:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor != low_freq_factor, both are {low_freq_factor}")
    wavelength = 2 * math.pi / inv_freq  # (hd/2,)
    low_freq_wavelength = original_max_position_embeddings / low_freq_factor
    high_freq_wavelength = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength < high_freq_wavelength, inv_freq,
                    np.where(wavelength > low_freq_wavelength, inv_freq / factor, interpolated))


# rope_scaling types the models loader understands, by their Hugging Face name
ROPE_SCALINGS = {"llama3": llama3_scaling}


class RotaryEmbedding(Module):
    """``rope(x, positions)``: x (B, H, N, hd) with hd even, positions int (N,).

    No parameters and no state: the frequencies are fixed by ``head_dim`` and ``base``,
    then passed through ``scaling`` when given (a function of the (hd/2,) float64
    frequencies, e.g. ``functools.partial(llama3_scaling, factor=8.0, ...)``). ``pairs``:
    "interleaved" or "halves" (see the module docstring).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, pairs: str = "interleaved",
                 scaling: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
        self.head_dim, self.base, self.pairs = head_dim, float(base), pairs
        self.inv_freq = self.base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
        if scaling is not None:
            self.inv_freq = np.asarray(scaling(self.inv_freq), dtype=np.float64)

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
        return Rotary.apply(x, cos=np.cos(theta).astype(dtype), sin=np.sin(theta).astype(dtype),
                            pairs=self.pairs)

    def extra_repr(self):
        return f"{self.head_dim}, base={self.base}, pairs={self.pairs!r}"
