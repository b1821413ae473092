"""The basic layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, GELU, SiLU.

Each layer runs one fused Function of ``microattn/fused.py`` (a hand-written backward, one
pass over memory). Beside each stands its teaching twin, the same maths built from Tensor
ops so that autograd derives the backward (``linear_composed``, ``layer_norm_composed``,
...): the tests check the fused layers against them. Every layer takes ``dtype``
(float32 by default) and ``rng`` (a ``np.random.Generator`` used only for initialisation;
None draws a fresh one). Inside ``with skip_init():`` the random draws are skipped
(weights start at zero), for loaders that overwrite every weight next.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .. import fused
from ..tensor import Tensor
from .module import Module, Parameter


def _generator(rng) -> np.random.Generator:
    return np.random.default_rng() if rng is None else rng


_SKIPPING = threading.local()


@contextlib.contextmanager
def skip_init():
    """Layers built inside the block skip their random initialisation: ``Linear`` and
    ``Embedding`` weights start at zero (``np.zeros``: pages the system hands over lazily)
    instead of being drawn, which for a model of 100M parameters saves seconds. Meant for
    loaders that overwrite every weight next (``models.from_pretrained``); a model built
    this way and not loaded is all zeros. Per thread; nests."""
    previous = getattr(_SKIPPING, "on", False)
    _SKIPPING.on = True
    try:
        yield
    finally:
        _SKIPPING.on = previous


def _initial(draw, shape, dtype) -> np.ndarray:
    """``draw()`` cast to ``dtype``, or zeros of ``shape`` inside ``skip_init``."""
    if getattr(_SKIPPING, "on", False):
        return np.zeros(shape, dtype=dtype)
    return draw().astype(dtype, copy=False)


def _float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"layers support float32 and float64, got dtype {dtype}")
    return dtype


class Linear(Module):
    """y = x @ weight.T + bias, weight (out_features, in_features) as in PyTorch.

    Initialisation (PyTorch's effective one): weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)).
    x (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype=np.float32, rng: np.random.Generator | None = None):
        super().__init__()
        dtype, rng = _float_dtype(dtype), _generator(rng)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        shape = (out_features, in_features)
        self.weight = Parameter(_initial(lambda: rng.uniform(-bound, bound, shape), shape, dtype))
        self.bias = (Parameter(_initial(lambda: rng.uniform(-bound, bound, out_features), out_features, dtype))
                     if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        return fused.Linear.apply(x, self.weight, self.bias)  # (..., out)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: integer tokens (...) -> weight[tokens] (..., dim).

    Initialisation: N(0, std^2) with ``std=1.0`` as in PyTorch; ``DecoderLM`` passes
    ``std=0.02`` (GPT-2's choice, which trains better for small models).
    """

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 1.0,
                 dtype=np.float32, rng: np.random.Generator | None = None):
        super().__init__()
        dtype, rng = _float_dtype(dtype), _generator(rng)
        self.num_embeddings, self.dim = num_embeddings, dim
        shape = (num_embeddings, dim)
        self.weight = Parameter(_initial(lambda: std * rng.standard_normal(shape), shape, dtype))

    def forward(self, tokens) -> Tensor:
        return fused.Embedding.apply(self.weight, tokens=self.check_tokens(tokens))  # (..., dim)

    def check_tokens(self, tokens) -> np.ndarray:
        """tokens as an integer array; TypeError or ValueError for ids this table lacks."""
        tokens = np.asarray(getattr(tokens, "data", tokens))
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"Embedding needs integer tokens, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.num_embeddings):
            raise ValueError(
                f"token ids must be in [0, {self.num_embeddings}), got values in "
                f"[{tokens.min()}, {tokens.max()}]"
            )
        return tokens

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.dim}"


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance,
    as PyTorch). weight starts at ones, bias at zeros."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=np.float32, rng=None):
        super().__init__()
        dtype = _float_dtype(dtype)
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return fused.LayerNorm.apply(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last axis.

    ``offset`` 0 (the default) is the usual RMSNorm; Gemma stores its scale as
    ``1 + weight`` (``offset=1.0``). Either way the scale starts at ones.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0, dtype=np.float32, rng=None):
        super().__init__()
        dtype = _float_dtype(dtype)
        self.dim, self.eps, self.offset = dim, eps, float(offset)
        self.weight = Parameter(np.full(dim, 1.0 - self.offset, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight if self.offset == 0.0 else self.weight + self.offset  # (dim,)
        return fused.RMSNorm.apply(x, scale, eps=self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


class Dropout(Module):
    """In training, zero each element with probability ``p`` and scale the rest by 1/(1-p);
    in eval mode, the identity.

    Reproducible and resumable: the mask of the k-th training-mode call is drawn from
    ``np.random.default_rng([seed, k])``. ``seed`` and the call counter ``step`` are
    buffers, so they are in ``state_dict``: a run restored from a checkpoint draws exactly
    the masks the uninterrupted run would have drawn. ``seed=None`` draws one from ``rng``
    (or from a fresh generator).
    """

    def __init__(self, p: float = 0.5, seed: int | None = None, *,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        if seed is None:
            seed = int(_generator(rng).integers(2**63 - 1))
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
        self.p = float(p)
        self.register_buffer("seed", np.int64(seed))
        self.register_buffer("step", np.int64(0))

    def next_generator(self) -> np.random.Generator:
        """The generator of this call (``default_rng([seed, step])``); advances ``step``."""
        generator = np.random.default_rng([int(self.seed), int(self.step)])
        self.step = self.step + 1
        return generator

    def next_seed(self) -> int:
        """A 63-bit seed for this call (for kernels with their own counter-based dropout)."""
        return int(self.next_generator().integers(2**63 - 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        kept = self.next_generator().random(x.shape) >= self.p
        return x * (kept / (1.0 - self.p)).astype(x.dtype)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    """GELU with the tanh approximation (PyTorch's ``GELU(approximate="tanh")``)."""

    def forward(self, x: Tensor) -> Tensor:
        return fused.gelu(x)


class SiLU(Module):
    """x * sigmoid(x) (also called swish)."""

    def forward(self, x: Tensor) -> Tensor:
        return fused.silu(x)


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


gelu = fused.gelu
silu = fused.silu


# ----------------------------------------------------------------------------- teaching twins
# The layers' maths from Tensor ops: autograd derives each backward. Slow (one graph node
# and one NumPy temporary per op) and plain; the oracles of tests/test_fused.py.


def linear_composed(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # One 2-D product: NumPy's batched matmul of (B, N, in) against a transposed
    # (in, out) view does not reach BLAS and is ~100x slower.
    leading = x.shape[:-1]
    y = x.reshape(-1, weight.shape[1]) @ weight.T  # (M, in) @ (in, out) -> (M, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*leading, weight.shape[0])  # (..., out)


def embedding_composed(weight: Tensor, tokens) -> Tensor:
    return weight[tokens]  # (..., dim); repeated ids add up in backward


def layer_norm_composed(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    centred = x - x.mean(axis=-1, keepdims=True)  # (..., dim)
    variance = (centred * centred).mean(axis=-1, keepdims=True)  # (..., 1)
    return centred / (variance + eps).sqrt() * weight + bias


def rms_norm_composed(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    mean_square = (x * x).mean(axis=-1, keepdims=True)  # (..., 1)
    return x / (mean_square + eps).sqrt() * weight


def gelu_composed(x: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)).tanh())


def silu_composed(x: Tensor) -> Tensor:
    return x * x.sigmoid()


def swiglu_composed(gate: Tensor, up: Tensor) -> Tensor:
    return silu_composed(gate) * up


def geglu_composed(gate: Tensor, up: Tensor) -> Tensor:
    return gelu_composed(gate) * up
