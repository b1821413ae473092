"""AttentionSpec: everything an attention kernel needs besides q, k, v, validated once.

Shape legend (used by every kernel module)::

    B    batch
    Hq   query heads          Hkv  key/value heads (Hq % Hkv == 0; group = Hq // Hkv)
    Nq   query length         Nk   key length
    D    query/key head dim   Dv   value head dim

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)
    out (B, Hq, Nq, Dv)   lse (B, Hq, Nq)

Every rule of who may attend to whom is folded into three things here:

* the **band** ``[lo, hi]`` of allowed diagonals: query ``i`` may see key ``j`` only if
  ``lo <= j - (i + offset) <= hi`` where ``offset = Nk - Nq`` (bottom-right alignment, as
  flash-attention does). ``is_causal`` sets ``hi = 0``; ``window=(left, right)`` sets
  ``lo = -left`` and ``hi = right``; ``-1`` means unbounded (stored as ``NO_BOUND``).
* an optional additive **bias** of shape ``(Bm, Hm, Nq, Nk)`` with ``Bm in {1, B}`` and
  ``Hm in {1, Hq}``: a boolean mask becomes ``0`` / ``-inf``, a float mask is used as is.
* **dropout**: ``dropout_p`` and a 64-bit ``seed``, turned into the integer
  ``dropout_threshold`` that :func:`microattn.kernels.masking.keep` compares against.

Two terms change the scores themselves, in this order (docs/semantics.md)::

    s = scale * q . k  ->  softcap * tanh(s / softcap)  ->  + ALiBi + bias  ->  band

* **softcap** ``c > 0`` (0: none): ``masking.cap``, before anything is added (Gemma 2).
* **ALiBi** slopes ``(Ba, Hq)``, ``Ba in {1, B}``: ``-slope[b, h] * |i + offset - j|``
  (``masking.alibi_bias``, flash-attention's convention); constants, no gradient.

``sinks`` (Hq,) (one logit per query head, or None) is not for the kernels: every backend
runs without it and ``sinks.py`` folds it into the result (``functional.Attention``).

User-written **mods** (``mask_mod``, ``score_mod``, ``score_mod_grad``; ``mods.py``,
FlexAttention's): plain Python callables, applied in this order::

    s = scale * q . k  ->  score_mod(s, b, h, i, j)  ->  + bias  ->  band, mask, mask_mod

with i, j the call's indices plus ``origin`` (the packed row's, in a varlen call).

``make_attention_spec`` raises ``ValueError`` / ``TypeError`` before any work is done;
kernels trust the spec and never validate again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import masking

NO_BOUND = -1  # a window side of -1 means "unbounded on that side"


class _Heads:
    """What every spec derives from its head counts and lengths (GQA group, diagonal offset)."""

    @property
    def group(self) -> int:
        """Query heads per key/value head: query head h reads kv head h // group."""
        return self.Hq // self.Hkv

    @property
    def offset(self) -> int:
        """Diagonal shift of bottom-right alignment: query i lines up with key i + offset."""
        return self.Nk - self.Nq


@dataclass(frozen=True)
class AttentionSpec(_Heads):
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    dtype: np.dtype
    scale: float
    causal: bool
    window_left: int  # -1: unbounded; the band's lower edge is -window_left
    window_right: int  # -1: unbounded; already 0 when causal
    bias: np.ndarray | None  # (Bm, Hm, Nq, Nk) additive, same dtype as q, or None
    dropout_p: float
    seed: int  # 0 <= seed < 2**64
    # A block of a larger attention (sequence parallel): the larger call's index of this
    # call's query head 0, query 0 and key 0 (dropout hashes those), and the diagonal
    # offset in this call's indices (None: Nk - Nq, bottom-right alignment).
    origin: tuple = (0, 0, 0)
    band_offset: int | None = None
    sinks: np.ndarray | None = None  # (Hq,) sink logits in the dtype, or None (sinks.py)
    # packed sequences (varlen.py): (S + 1,) int64 offsets of each sequence's queries and
    # keys in the row, or None. Not for the kernels: varlen.py calls them per sequence.
    cu_seqlens_q: np.ndarray | None = None
    cu_seqlens_k: np.ndarray | None = None
    softcap: float = 0.0  # c of c * tanh(s / c); 0: no cap
    alibi: np.ndarray | None = None  # (Ba, Hq) ALiBi slopes, Ba in {1, B}, same dtype as q, or None
    # user-written mods (mods.py): callables or None. Not in pack(): the numba kernels are
    # compiled for them (cpu/flash.py), the reference evaluates them on arrays.
    mask_mod: object = None  # (b, h, i, j) -> bool
    score_mod: object = None  # (score, b, h, i, j) -> float
    score_mod_grad: object = None  # (score, b, h, i, j) -> d score_mod / d score

    # -- derived quantities -------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Diagonal shift: query i lines up with key i + offset (Nk - Nq unless a block of
        a larger call says otherwise, ``band_offset``)."""
        return self.Nk - self.Nq if self.band_offset is None else self.band_offset

    @property
    def has_band(self) -> bool:
        return self.window_left != NO_BOUND or self.window_right != NO_BOUND

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def has_softcap(self) -> bool:
        return self.softcap > 0.0

    @property
    def has_alibi(self) -> bool:
        return self.alibi is not None

    @property
    def has_mods(self) -> bool:
        """Whether a user-written mask_mod or score_mod applies (mods.py)."""
        return self.mask_mod is not None or self.score_mod is not None

    @property
    def seed_lo(self) -> int:
        return self.seed & 0xFFFFFFFF

    @property
    def seed_hi(self) -> int:
        return (self.seed >> 32) & 0xFFFFFFFF

    @property
    def dropout_threshold(self) -> int:
        """32-bit integer t: element kept iff hash(seed, b, h, i, j) >= t (P(keep) = 1 - p)."""
        return min(int(round(self.dropout_p * 2.0**32)), 2**32 - 1)

    @property
    def dropout_scale(self) -> float:
        return 1.0 / (1.0 - self.dropout_p)

    @property
    def band(self) -> tuple[int, int, int]:
        """The band record ``(offset, window_left, window_right)`` (see masking.in_band)."""
        return (self.offset, self.window_left, self.window_right)

    def key_range(self, i_start: int, i_stop: int) -> tuple[int, int]:
        """Keys [j_start, j_stop) that queries [i_start, i_stop) may see (masking.key_range)."""
        return masking.key_range(self.band, i_start, i_stop, self.Nk)

    def query_range(self, j_start: int, j_stop: int) -> tuple[int, int]:
        """Queries [i_start, i_stop) that may see a key in [j_start, j_stop) (masking.query_range)."""
        return masking.query_range(self.band, j_start, j_stop, self.Nq)

    def pack(self) -> "Packed":
        """The spec as compiled kernels take it: a few records (see ``Packed``).

        Everything that varies between calls is a runtime value, so each kernel compiles
        once per dtype and never again.
        """
        t = self.dtype.type
        bias = self.bias if self.has_bias else np.zeros((1, 1, 0, 0), dtype=self.dtype)
        alibi = self.alibi if self.has_alibi else np.zeros((1, 0), dtype=self.dtype)
        threshold = self.dropout_threshold if self.dropout_p > 0.0 else 0
        return Packed(
            bias=bias,
            band=self.band,
            dropout=(threshold, self.seed_lo, self.seed_hi, *self.origin),
            reals=(t(self.scale), t(self.dropout_scale if threshold > 0 else 1.0), t(self.softcap)),
            alibi=alibi,
        )


class Packed(NamedTuple):
    """An AttentionSpec as a few records, unpacked by the rules in ``masking.py``.

    ``bias``     (Bm, Hm, Nq, Nk) additive, or an empty (1, 1, 0, 0) array: no bias
    ``band``     (offset, window_left, window_right)      ints (masking.in_band)
    ``dropout``  (threshold, seed_lo, seed_hi, h0, i0, j0) ints (masking.keep; 0: off)
    ``reals``    (scale, dropout_scale, softcap)          the spec's dtype (masking.cap; softcap 0: off)
    ``alibi``    (Ba, Hq) slopes, or an empty (1, 0) array: no ALiBi (masking.alibi_bias)

    Kernels take them in this order (``*spec.pack()``).
    """

    bias: np.ndarray
    band: tuple
    dropout: tuple
    reals: tuple
    alibi: np.ndarray


@dataclass(frozen=True)
class LinearSpec(_Heads):
    """Linear attention: phi(x) = elu(x) + 1; shapes, GQA rule and band as AttentionSpec."""

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    dtype: np.dtype
    causal: bool
    eps: float

    @property
    def band(self) -> tuple[int, int, int]:
        """The band record ``(offset, window_left, window_right)`` (see masking.in_band):
        causal is ``(offset, -1, 0)``, query i seeing keys ``j <= i + offset``; otherwise
        ``(offset, -1, -1)``, every key. No left window, so a query sees a prefix of keys."""
        return (self.offset, NO_BOUND, 0 if self.causal else NO_BOUND)


# -- validation ---------------------------------------------------------------------------


def check_qkv(q_shape, k_shape, v_shape, dtypes) -> tuple[int, ...]:
    """Validate q/k/v shapes and dtypes; return (B, Hq, Hkv, Nq, Nk, D, Dv, dtype)."""
    for name, dt in zip(("query", "key", "value"), dtypes):
        if not np.issubdtype(dt, np.floating) or dt not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got dtype {np.dtype(dt)}")
    if len(set(np.dtype(dt) for dt in dtypes)) != 1:
        got = ", ".join(f"{n}={np.dtype(dt)}" for n, dt in zip(("query", "key", "value"), dtypes))
        raise TypeError(f"query, key and value must share one dtype, got {got}")
    for name, shape, legend in (
        ("query", q_shape, "(B, Hq, Nq, D)"),
        ("key", k_shape, "(B, Hkv, Nk, D)"),
        ("value", v_shape, "(B, Hkv, Nk, Dv)"),
    ):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D {legend}, got shape {tuple(shape)}")
        if min(shape) < 1:
            raise ValueError(f"{name} must have no empty dimension, got shape {tuple(shape)}")
    B, Hq, Nq, D = q_shape
    Bk, Hkv, Nk, Dk = k_shape
    Bv, Hv, Nv, Dv = v_shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Hkv != Hv:
        raise ValueError(f"key and value must have the same number of heads, got {Hkv} and {Hv}")
    if Nk != Nv:
        raise ValueError(f"key and value must have the same length, got Nk={Nk} and {Nv}")
    if D != Dk:
        raise ValueError(f"query and key head dims differ: D={D} for query, {Dk} for key")
    if Hq % Hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (grouped-query attention), "
            f"got Hq={Hq}, Hkv={Hkv}"
        )
    return B, Hq, Hkv, Nq, Nk, D, Dv, np.dtype(dtypes[0])


def _check_window(window, is_causal) -> tuple[int, int]:
    if window is None:
        left, right = NO_BOUND, NO_BOUND
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        sides = []
        for name, side in zip(("left", "right"), window):
            if side is None:
                side = NO_BOUND
            if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < -1:
                raise ValueError(
                    f"window {name} must be an integer >= 0, or -1/None for unbounded, got {side!r}"
                )
            sides.append(int(side))
        left, right = sides
    if is_causal:
        right = 0  # causal and a window must both allow a pair: j <= i + offset
    return left, right


def _check_mask(attn_mask, B, Hq, Nq, Nk, dtype) -> np.ndarray | None:
    if attn_mask is None:
        return None
    mask = np.asarray(attn_mask)
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.floating):
        raise TypeError(f"attn_mask must be boolean or floating, got dtype {mask.dtype}")
    target = (B, Hq, Nq, Nk)
    if mask.ndim > 4:
        raise ValueError(f"attn_mask must be broadcastable to (B, Hq, Nq, Nk)={target}, got shape {mask.shape}")
    full = (1,) * (4 - mask.ndim) + mask.shape
    if any(m not in (1, t) for m, t in zip(full, target)):
        raise ValueError(f"attn_mask of shape {mask.shape} is not broadcastable to (B, Hq, Nq, Nk)={target}")
    if mask.dtype == np.bool_:
        bias = np.where(mask, dtype.type(0), dtype.type(-np.inf)).astype(dtype)
    else:
        if np.isnan(mask).any() or np.isposinf(mask).any():
            raise ValueError("a float attn_mask must not contain NaN or +inf (use -inf to forbid a pair)")
        bias = mask.astype(dtype)
    bias = bias.reshape(full)
    # Keep batch/head broadcasting (size 1) but spell out the (Nq, Nk) plane contiguously.
    plane_shape = (full[0], full[1], Nq, Nk)
    return np.ascontiguousarray(np.broadcast_to(bias, plane_shape))


def _check_sinks(sinks, Hq, dtype) -> np.ndarray | None:
    """sinks (Hq,) in q's dtype; finite or -inf (a head without a sink); NaN, +inf refused."""
    if sinks is None:
        return None
    if not isinstance(sinks, np.ndarray):
        raise TypeError(f"sinks must be a Tensor, a NumPy array or None, got {type(sinks).__name__}")
    if sinks.dtype != dtype:
        raise TypeError(f"sinks must have the dtype of query ({dtype}), got {sinks.dtype}")
    if sinks.shape != (Hq,):
        raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, "
                         f"got shape {sinks.shape}")
    if np.isnan(sinks).any() or np.isposinf(sinks).any():
        raise ValueError("sinks must not contain NaN or +inf (-inf means no sink for that head)")
    return np.ascontiguousarray(sinks)


def _check_cu_seqlens(cu_q, cu_k, B, Nq, Nk):
    """(cu_q, cu_k) as int64 arrays, or (None, None): (S + 1,) offsets from 0 to the
    length, non-decreasing, the same S for queries and keys, and B = 1."""
    if cu_q is None and cu_k is None:
        return None, None
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together: give both or neither")
    checked = []
    for name, cu, n in (("cu_seqlens_q", cu_q, Nq), ("cu_seqlens_k", cu_k, Nk)):
        cu = np.asarray(getattr(cu, "data", cu))
        if cu.dtype == np.bool_ or not np.issubdtype(cu.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D offsets (S + 1,) with S >= 1 sequences, got shape {cu.shape}")
        if cu[0] != 0 or cu[-1] != n:
            raise ValueError(f"{name} must run from 0 to the packed length {n}, got {cu[0]} .. {cu[-1]}")
        if (np.diff(cu) < 0).any():
            raise ValueError(f"{name} must be non-decreasing (sequence s is [cu[s], cu[s+1])), got {cu.tolist()}")
        checked.append(cu.astype(np.int64))
    if checked[0].shape != checked[1].shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {checked[0].shape[0] - 1} and {checked[1].shape[0] - 1}")
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need B = 1, one packed row; got B = {B}")
    return checked[0], checked[1]
def _check_softcap(softcap, dtype) -> float:
    """softcap as a float, 0.0 meaning no cap (None or 0 given); it must stay a positive
    finite number in ``dtype`` (1e-50 is 0 in float32, 1e300 is inf)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
        raise ValueError(f"softcap must be a finite positive number, or None/0 for no cap, got {softcap!r}")
    if softcap == 0:
        return 0.0
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite positive number, or None/0 for no cap, got {softcap}")
    with np.errstate(over="ignore", under="ignore"):
        rounded = dtype.type(softcap)
    if not (np.isfinite(rounded) and rounded > 0):
        raise ValueError(f"softcap {softcap} is not a positive finite {dtype.name} number")
    return float(softcap)


def _check_alibi(alibi_slopes, B, Hq, dtype) -> np.ndarray | None:
    """The slopes as a C-contiguous (Ba, Hq) array of ``dtype``, Ba = 1 for (Hq,) slopes."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if not np.issubdtype(slopes.dtype, np.floating):
        raise TypeError(f"alibi_slopes must be floating, got dtype {slopes.dtype}")
    if slopes.shape not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,)=({Hq},) or (B, Hq)=({B}, {Hq}), "
                         f"got {slopes.shape}")
    if not np.isfinite(slopes).all():
        raise ValueError("alibi_slopes must be finite (no NaN or inf)")
    return np.ascontiguousarray(slopes.reshape(-1, Hq), dtype=dtype)


def _check_mods(mask_mod, score_mod, score_mod_grad):
    """The mods as given: each a callable or None; score_mod_grad only with a score_mod.

    score_mod without score_mod_grad is valid here (a forward needs no gradient);
    ``functional.scaled_dot_product_attention`` refuses it when the call records a graph,
    and every backward refuses it (``mods.MISSING_GRAD``)."""
    for name, fn, legend in (("mask_mod", mask_mod, "(b, h, i, j) -> bool"),
                             ("score_mod", score_mod, "(score, b, h, i, j) -> float"),
                             ("score_mod_grad", score_mod_grad, "(score, b, h, i, j) -> float")):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function {legend} or None, got {type(fn).__name__}")
    if score_mod_grad is not None and score_mod is None:
        raise ValueError("score_mod_grad was given without score_mod: it is the derivative of score_mod")


def make_attention_spec(
    q_shape, k_shape, v_shape, dtypes, *, attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, window=None, seed=None, sinks=None, cu_seqlens_q=None, cu_seqlens_k=None,
    softcap=None, alibi_slopes=None, mask_mod=None, score_mod=None, score_mod_grad=None,
) -> AttentionSpec:
    """Validate every argument of scaled_dot_product_attention; build the spec.

    Raises ValueError (shapes, mask shape, dropout_p, window, scale, softcap, alibi_slopes'
    shape or values, sinks' shape or values, cu_seqlens, score_mod_grad without score_mod)
    or TypeError (dtypes, alibi_slopes' and sinks' dtype or type, a mod that is not
    callable) before any work is done.
    """
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype = check_qkv(q_shape, k_shape, v_shape, dtypes)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating, np.integer)):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    left, right = _check_window(window, bool(is_causal))
    bias = _check_mask(attn_mask, B, Hq, Nq, Nk, dtype)
    softcap = _check_softcap(softcap, dtype)
    alibi = _check_alibi(alibi_slopes, B, Hq, dtype)
    if seed is None:
        seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64)) if dropout_p > 0 else 0
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    sinks = _check_sinks(sinks, Hq, dtype)
    cu_q, cu_k = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, B, Nq, Nk)
    _check_mods(mask_mod, score_mod, score_mod_grad)
    return AttentionSpec(
        B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype, scale=float(scale),
        causal=bool(is_causal), window_left=left, window_right=right, bias=bias,
        dropout_p=float(dropout_p), seed=int(seed), sinks=sinks, cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k, softcap=softcap, alibi=alibi, mask_mod=mask_mod, score_mod=score_mod,
        score_mod_grad=score_mod_grad,
    )


def make_linear_spec(q_shape, k_shape, v_shape, dtypes, *, causal=False, eps=1e-6,
                     feature_map="elu+1") -> LinearSpec:
    """Validate every argument of linear_attention; build the spec."""
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype = check_qkv(q_shape, k_shape, v_shape, dtypes)
    if feature_map != "elu+1":
        raise ValueError(f"feature_map must be 'elu+1' (the only one implemented), got {feature_map!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not (
        math.isfinite(eps) and eps > 0
    ):
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    return LinearSpec(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype,
                      causal=bool(causal), eps=float(eps))
