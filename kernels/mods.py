"""User-written mods (FlexAttention's ``mask_mod`` / ``score_mod``) evaluated on NumPy arrays.

Three plain Python functions a user may give ``scaled_dot_product_attention``::

    mask_mod(b, h, i, j) -> bool                   False forbids query i to see key j
    score_mod(score, b, h, i, j) -> float          replaces the scaled score q.k * scale
    score_mod_grad(score, b, h, i, j) -> float     d score_mod / d score (for the backward)

``b`` is the batch row, ``h`` the query head, ``i`` / ``j`` the query and key index *of the
call*: a spec that is a block of a larger call (a packed sequence of ``varlen.py``, a ring
step) adds its ``origin`` (h0, i0, j0), so the mods see the larger call's indices, as
``masking.keep`` does for dropout. The order of the terms is in docs/semantics.md::

    s = scale * q . k  ->  score_mod(s, b, h, i, j)  ->  + bias  ->  -inf outside the band,
    the bool mask and mask_mod

The reference and the composed backend evaluate the mods here, over whole (B, Hq, Nq, Nk)
arrays: first called once with broadcast index arrays (a function of ``+ - * < & |``,
``np.where``, ``np.tanh`` ... works on arrays as written); if that raises or gives the wrong
shape, element by element through ``np.vectorize``. The numba kernels compile them instead
(``cpu/flash.py``).
"""

from __future__ import annotations

import numpy as np

from .spec import AttentionSpec

MISSING_GRAD = (
    "score_mod was given without score_mod_grad, so the backward cannot differentiate "
    "through it; pass score_mod_grad(score, b, h, i, j) = d score_mod / d score, or run "
    "without a graph (inputs that do not require grad, or under no_grad)"
)


def indices(spec: AttentionSpec):
    """(b, h, i, j) int64 index arrays broadcasting to (B, Hq, Nq, Nk), in the indices the
    mods see: the call's own plus its origin (h0, i0, j0)."""
    h0, i0, j0 = spec.origin
    return (np.arange(spec.B, dtype=np.int64)[:, None, None, None],
            np.arange(spec.Hq, dtype=np.int64)[None, :, None, None] + h0,
            np.arange(spec.Nq, dtype=np.int64)[None, None, :, None] + i0,
            np.arange(spec.Nk, dtype=np.int64)[None, None, None, :] + j0)


def evaluate(fn, args, shape, dtype) -> np.ndarray:
    """fn(*args) as an array of ``shape`` and ``dtype``: one vectorised call when fn takes
    arrays, else ``np.vectorize`` (one Python call per element)."""
    try:
        with np.errstate(all="ignore"):
            got = np.broadcast_to(np.asarray(fn(*args)), shape)
    except Exception:  # noqa: BLE001  (any failure on arrays: run it element by element)
        got = np.vectorize(fn, otypes=[dtype])(*args)
    return np.broadcast_to(got, shape).astype(dtype, copy=False)


def mask_array(spec: AttentionSpec) -> np.ndarray | None:
    """(B, Hq, Nq, Nk) bool: what mask_mod allows, or None without one."""
    if spec.mask_mod is None:
        return None
    shape = (spec.B, spec.Hq, spec.Nq, spec.Nk)
    return evaluate(spec.mask_mod, indices(spec), shape, np.bool_)


def score_mod_array(spec: AttentionSpec, s: np.ndarray) -> np.ndarray:
    """score_mod(s, b, h, i, j) over s (B, Hq, Nq, Nk); s itself without a score_mod."""
    if spec.score_mod is None:
        return s
    return evaluate(spec.score_mod, (s, *indices(spec)), s.shape, spec.dtype)


def score_mod_slope(spec: AttentionSpec, s: np.ndarray) -> np.ndarray | None:
    """score_mod_grad(s, b, h, i, j) over s (B, Hq, Nq, Nk): the slope the backward
    multiplies dS by; None without a score_mod. Raises ValueError (``MISSING_GRAD``) when
    there is a score_mod but no score_mod_grad."""
    if spec.score_mod is None:
        return None
    if spec.score_mod_grad is None:
        raise ValueError(MISSING_GRAD)
    return evaluate(spec.score_mod_grad, (s, *indices(spec)), s.shape, spec.dtype)


def block_mask(spec: AttentionSpec, chunk_q: int, chunk_k: int) -> np.ndarray:
    """(B, Hq, nr, nc) int8, nr = ceil(Nq / chunk_q), nc = ceil(Nk / chunk_k): per chunk of
    chunk_q queries x chunk_k keys, 0 if mask_mod allows none of its pairs, 2 if all, else 1
    (``masking.tile_class`` reads it). Evaluated here, once per call, a stripe of chunk_q
    query rows at a time (so memory stays B * Hq * chunk_q * Nk bools). Requires a mask_mod.

    Worked example: Nq = Nk = 8, chunks of 4, causal as a mask_mod: [[1, 0], [2, 1]] in
    every (b, h): the diagonal chunks are partly allowed, the one below wholly, above not.
    """
    b, h, i, j = indices(spec)
    nr, nc = -(-spec.Nq // chunk_q), -(-spec.Nk // chunk_k)
    starts = np.arange(nc) * chunk_k
    widths = np.minimum(starts + chunk_k, spec.Nk) - starts  # (nc,)
    classes = np.empty((spec.B, spec.Hq, nr, nc), dtype=np.int8)
    for r in range(nr):
        rows = slice(r * chunk_q, min((r + 1) * chunk_q, spec.Nq))
        n = rows.stop - rows.start
        allowed = evaluate(spec.mask_mod, (b, h, i[:, :, rows], j), (spec.B, spec.Hq, n, spec.Nk),
                           np.bool_)
        counts = np.add.reduceat(allowed.sum(axis=2, dtype=np.int64), starts, axis=-1)
        classes[:, :, r] = np.where(counts == 0, 0, np.where(counts == n * widths, 2, 1))
    return classes
