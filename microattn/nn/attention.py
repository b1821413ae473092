"""Multi-head attention (MHA / GQA / MQA, self- or cross-) and the KV cache.

Shape legend::

    B batch, Nq query length, Ns source (context) length, Nk key length (cache included),
    E embed_dim, H query heads (num_heads), Hkv key/value heads (num_kv_heads), hd head dim

    x (B, Nq, E) -> q (B, H, Nq, hd); source (B, Ns, E) -> k, v (B, Hkv, Ns, hd)
    attention -> (B, H, Nq, hd) -> (B, Nq, E)

The attention itself is one call into ``microattn.functional``: ``"flash"`` is exact
``scaled_dot_product_attention``, ``"window"`` the same with a sliding window, ``"linear"``
``linear_attention``. Causality is bottom-right aligned (query i sees key j iff
j <= i + Nk - Nq), which is what makes a KV cache work: the new queries are the last Nq
rows of the full sequence.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backends
from .. import functional as F
from ..autograd import is_grad_enabled
from ..kernels.cpu import decode
from ..kernels.masking import in_band
from ..kernels.spec import AttentionSpec, make_attention_spec
from ..tensor import Tensor, concatenate
from .layers import Dropout, Linear
from .module import Module
from .rope import RotaryEmbedding

ATTENTIONS = ("flash", "window", "linear")
LINEAR_ATTENTION_EPS = 1e-6  # F.linear_attention's default, used by attention_weights too


class KVCache:
    """The keys and values one attention layer has seen, for incremental decoding.

    ``k``, ``v``: (B, Hkv, length, hd) views of the storage (None before the first append);
    ``length``: how many positions are cached (RoPE positions of new tokens start here).
    Storage is (B, Hkv, capacity, hd), the layout the CPU kernels read: ``capacity`` rows
    are allocated on the first append (``DecoderLM.make_caches`` passes ``max_len``), so
    appending writes only the new rows and never copies the past; past the capacity it
    doubles (amortised O(1) copies per token). Cached entries are constants: no gradient
    flows into them.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        self._k = self._v = None  # (B, Hkv, capacity, hd) storage
        self.length = 0

    @property
    def k(self) -> np.ndarray | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> np.ndarray | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, Hkv, n, hd); return all of them so far, (B, Hkv, length, hd).

        Without a graph to record, the results are views of the storage (nothing is
        copied; the decode kernel reads them in place). Otherwise they carry gradient into
        the new ``k``, ``v`` only.
        """
        k_new, v_new = np.asarray(k.data), np.asarray(v.data)
        old_k, old_v = self.k, self.v
        k_store, v_store, start = self.make_room(k_new.shape, v_new.shape, k_new.dtype)
        k_store[:, :, start : start + k_new.shape[2]] = k_new
        v_store[:, :, start : start + v_new.shape[2]] = v_new
        self.length = start + k_new.shape[2]
        if not (is_grad_enabled() and (k.requires_grad or v.requires_grad)):
            return Tensor(self.k), Tensor(self.v)
        if start == 0:
            return k, v
        return concatenate([old_k, k], axis=2), concatenate([old_v, v], axis=2)

    def make_room(self, k_shape, v_shape, dtype) -> tuple[np.ndarray, np.ndarray, int]:
        """Room for new keys and values of shapes (B, Hkv, n, hd) and (B, Hkv, n, hdv):
        the storage (B, Hkv, capacity, hd/hdv), grown if needed, and the position the new
        rows go to (``length``). The caller writes them and then sets ``length``.
        ValueError if the shapes do not match what the cache holds."""
        if self._k is not None and (tuple(k_shape[:2]) != self._k.shape[:2]
                                    or k_shape[3] != self._k.shape[3]
                                    or v_shape[3] != self._v.shape[3]):
            raise ValueError(
                f"KVCache holds keys of shape (B, Hkv, N, hd)={self.k.shape}; cannot append "
                f"{tuple(k_shape)}: reset() the cache for a new batch"
            )
        if self._k is not None and np.dtype(dtype) != self._k.dtype:
            raise ValueError(f"KVCache holds {self._k.dtype} keys; cannot append {np.dtype(dtype)}: "
                             f"reset() the cache for another model")
        needed = self.length + k_shape[2]
        capacity = 0 if self._k is None else self._k.shape[2]
        if needed > capacity:
            capacity = max(needed, 2 * capacity, self.capacity or 0)
            B, Hkv, _, hd = k_shape
            grown_k = np.empty((B, Hkv, capacity, hd), dtype=dtype)
            grown_v = np.empty((B, Hkv, capacity, v_shape[3]), dtype=dtype)
            if self.length:
                grown_k[:, :, : self.length] = self.k
                grown_v[:, :, : self.length] = self.v
            self._k, self._v = grown_k, grown_v
        return self._k, self._v, self.length

    def __repr__(self):
        shape = None if self._k is None else self.k.shape
        return f"KVCache(length={self.length}, k.shape={shape})"


@functools.cache
def _runs_on_cpu_kernels(backend: str) -> bool:
    """Whether ``backend`` resolves to the numba CPU kernels here (checked once per name)."""
    try:
        return backends.resolve(backend)[0] == "numba"
    except (ValueError, RuntimeError):
        return False  # the attention call itself reports the problem


def _elu_plus_one(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


class MultiHeadAttention(Module):
    """Multi-head attention with separate q, k, v and output projections.

    * ``num_kv_heads`` < ``num_heads`` gives grouped-query attention (1: multi-query);
      query head h reads key/value head h // (num_heads // num_kv_heads).
    * ``attention``: "flash" (exact softmax attention), "window" (softmax attention in a
      sliding window: ``window=(w, 0)`` when causal, ``(w, w)`` otherwise; needs
      ``window=w``), "linear" (elu+1 linear attention; no ``attn_mask``).
    * ``rope``: rotary position embedding on q and k (self-attention only; positions
      continue from the KV cache's length).
    * ``dropout``: on the attention probabilities in training (seeded and resumable, see
      ``Dropout``); for "linear" attention, which has no probabilities, on its output.

    Options that pretrained checkpoints need (``microattn.models``), all keyword-only:

    * ``head_dim``: per-head size when it is not embed_dim // num_heads (Gemma 2);
      q_proj is then (E -> H * hd) and out_proj (H * hd -> E).
    * ``scale``: the softmax scale, 1/sqrt(head_dim) by default.
    * ``out_bias``: whether out_proj has a bias, when it differs from ``bias`` (Qwen2 has
      q/k/v biases and none on the output).
    * ``rope``: True, or a ``RotaryEmbedding`` to use (another ``pairs`` layout, scaling).
    * ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before masking and
      softmax (Gemma 2's attn_logit_softcapping); softmax attention only.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True, attention: str = "flash",
                 window: int | None = None, rope: bool | RotaryEmbedding = False, *,
                 backend: str = "auto", rope_base: float = 10000.0, head_dim: int | None = None,
                 scale: float | None = None, out_bias: bool | None = None,
                 softcap: float | None = None, dtype=np.float32,
                 rng: np.random.Generator | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if head_dim is not None and (isinstance(head_dim, bool) or head_dim < 1):
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
        if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite positive number, got {softcap!r}")
        if softcap is not None and attention == "linear":
            raise ValueError('softcap caps softmax scores; attention="linear" has none')
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "window" and (window is None or isinstance(window, bool) or window < 0):
            raise ValueError(f'attention="window" needs window=w, an integer >= 0; got {window!r}')
        if attention != "window" and window is not None:
            raise ValueError(f'window={window!r} is only used with attention="window", not {attention!r}')
        rng = np.random.default_rng() if rng is None else rng
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.attention, self.window, self.backend = attention, window, backend
        hd = self.head_dim
        self.scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
        self.softcap = None if softcap is None else float(softcap)
        out_bias = bias if out_bias is None else out_bias
        self.q_proj = Linear(embed_dim, num_heads * hd, bias, dtype=dtype, rng=rng)
        self.k_proj = Linear(embed_dim, num_kv_heads * hd, bias, dtype=dtype, rng=rng)
        self.v_proj = Linear(embed_dim, num_kv_heads * hd, bias, dtype=dtype, rng=rng)
        self.out_proj = Linear(num_heads * hd, embed_dim, out_bias, dtype=dtype, rng=rng)
        if isinstance(rope, RotaryEmbedding):
            if rope.head_dim != hd:
                raise ValueError(f"rope has head_dim {rope.head_dim}, the attention's is {hd}")
            self.rope = rope
        else:
            self.rope = RotaryEmbedding(hd, base=rope_base) if rope else None
        self.attn_dropout = Dropout(dropout, rng=rng)

    def forward(self, x, context=None, *, is_causal: bool = False, attn_mask=None,
                kv_cache: KVCache | None = None, need_weights: bool = False):
        """x (B, Nq, E), context (B, Ns, E) or None -> (B, Nq, E), or (out, weights)
        with weights (B, H, Nq, Nk) a NumPy array when ``need_weights``."""
        if len(x.shape) != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, {self.embed_dim}), got shape {x.shape}")
        if context is not None and kv_cache is not None:
            raise ValueError("kv_cache is for self-attention; cross-attention recomputes keys from context")
        if attn_mask is not None and self.attention == "linear":
            raise ValueError('attn_mask is not supported with attention="linear"')
        source = x if context is None else context
        if len(source.shape) != 3 or source.shape[0] != x.shape[0] or source.shape[-1] != self.embed_dim:
            raise ValueError(f"context must be (B={x.shape[0]}, Ns, {self.embed_dim}), got {source.shape}")
        B, Nq, _ = x.shape
        Ns = source.shape[1]
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim

        q = self.q_proj(x).reshape(B, Nq, H, hd).transpose(0, 2, 1, 3)  # (B, H, Nq, hd)
        k = self.k_proj(source).reshape(B, Ns, Hkv, hd).transpose(0, 2, 1, 3)  # (B, Hkv, Ns, hd)
        v = self.v_proj(source).reshape(B, Ns, Hkv, hd).transpose(0, 2, 1, 3)  # (B, Hkv, Ns, hd)
        if self.rope is not None and context is None:
            start = 0 if kv_cache is None else kv_cache.length
            positions = np.arange(start, start + Nq)  # (Nq,)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, Nk, hd)

        out = self._attend(q, k, v, is_causal, attn_mask)  # (B, H, Nq, hd)
        out = self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, Nq, H * hd))  # (B, Nq, E)
        if need_weights:
            return out, self.attention_weights(q.data, k.data, is_causal=is_causal, attn_mask=attn_mask)
        return out

    def _window(self, is_causal: bool):
        if self.attention != "window":
            return None
        return (self.window, 0) if is_causal else (self.window, self.window)

    def _attend(self, q, k, v, is_causal, attn_mask):
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if self._decoding(q, k, v, dropout_p):
            spec = self._spec(q, k, v, is_causal, attn_mask, 0.0)
            return F.Attention.apply(q, k, v, spec=spec, kernel=decode)
        if self.attention == "linear":
            out = F.linear_attention(q, k, v, causal=is_causal, eps=LINEAR_ATTENTION_EPS,
                                     backend=self.backend)
            return self.attn_dropout(out)
        seed = self.attn_dropout.next_seed() if dropout_p > 0 else None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=self.scale, window=self._window(is_causal), seed=seed, backend=self.backend,
            softcap=self.softcap,
        )

    def _spec(self, q, k, v, is_causal, attn_mask, dropout_p) -> AttentionSpec:
        seed = self.attn_dropout.next_seed() if dropout_p > 0 else None
        return make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype),
                                   attn_mask=None if attn_mask is None else np.asarray(
                                       getattr(attn_mask, "data", attn_mask)),
                                   dropout_p=dropout_p, is_causal=is_causal, scale=self.scale,
                                   window=self._window(is_causal), seed=seed, softcap=self.softcap)

    def _decoding(self, q, k, v, dropout_p) -> bool:
        """Whether this call is a decoding step for ``kernels/cpu/decode.py``: a few
        queries (Nq <= decode.MAX_QUERIES), softmax attention, no graph to record, no
        dropout, on the CPU kernels' backend. It reads a KVCache's storage in place."""
        return (q.shape[2] <= decode.MAX_QUERIES and self.attention != "linear" and dropout_p == 0
                and not (is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
                and _runs_on_cpu_kernels(self.backend))

    def attention_weights(self, q: np.ndarray, k: np.ndarray, *, is_causal: bool = False,
                          attn_mask=None) -> np.ndarray:
        """(B, H, Nq, Nk) attention probabilities by the reference maths: after masking,
        before dropout. q (B, H, Nq, hd), k (B, Hkv, Nk, hd) as the layer computed them.

        For "linear" attention: phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + eps), the
        weights its output is the weighted sum with (rows sum to just under 1).
        """
        k = np.repeat(k, self.num_heads // self.num_kv_heads, axis=1)  # (B, H, Nk, hd)
        Nq, Nk = q.shape[2], k.shape[2]
        i, j = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
        if self.attention == "linear":
            scores = _elu_plus_one(q) @ np.swapaxes(_elu_plus_one(k), -1, -2)  # (B, H, Nq, Nk)
            if is_causal:
                scores = np.where(in_band((Nk - Nq, -1, 0), i, j), scores, 0.0)
            return scores / (scores.sum(axis=-1, keepdims=True) + LINEAR_ATTENTION_EPS)
        scores = q @ np.swapaxes(k, -1, -2) * self.scale  # (B, H, Nq, Nk)
        if self.softcap is not None:
            scores = self.softcap * np.tanh(scores / self.softcap)
        left, right = self._window(is_causal) or (-1, -1)
        allowed = in_band((Nk - Nq, left, 0 if is_causal else right), i, j)  # (Nq, Nk)
        if attn_mask is not None:
            mask = np.asarray(getattr(attn_mask, "data", attn_mask))
            if mask.dtype == np.bool_:
                allowed = allowed & mask
            else:
                scores = scores + mask
                allowed = allowed & (mask > -np.inf)
        scores = np.where(allowed, scores, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True)
        exp = np.exp(scores - np.where(row_max == -np.inf, 0, row_max))
        total = exp.sum(axis=-1, keepdims=True)
        return exp / np.where(total == 0, 1, total)  # a row with no allowed key is all zeros

    def extra_repr(self):
        return (f"{self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"attention={self.attention!r}, window={self.window}, rope={self.rope is not None}"
                + (f", softcap={self.softcap}" if self.softcap is not None else ""))


