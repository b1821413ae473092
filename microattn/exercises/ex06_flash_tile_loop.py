"""Exercise 6: the flash forward's tile loop in numba.

Query blocks x key blocks, the online softmax update (exercise 5) per key block, the finish
``out = acc / l`` and the stats (m, l). The library's version is rung 2 of the CPU ladder,
``kernels/cpu/ladder.py::_forward_tiles`` (one task per (batch, head, query block), run in
parallel with ``prange``; it also applies dropout). Graded against ``reference.forward`` on
odd sizes, Nq != Nk, causal (bottom-right, so Nq > Nk leaves rows with no key) and GQA, with
the output arrays filled with NaN first, so an element never written shows.
"""

from __future__ import annotations

import types

import numpy as np

from ..kernels import protocol, reference
from ..kernels.cpu import ladder
from ..kernels.spec import make_attention_spec
from .grading import Failure, call, function
from .grading import compare as _compare

NUMBER = 6
SLUG = "flash_tile_loop"
TITLE = "The flash forward tile loop in numba: query blocks x key blocks, online softmax, out and stats"
FILE = "flash_tile_loop.py"
READ = "docs/flash-cpu.md (\"The ladder\", \"Forward: online softmax\") and kernels/cpu/ladder.py (rung 2)"
HINTS = [
    "Three loops: for b in range(B), for h in range(Hq), for i0 in range(0, Nq, block_m); inside, "
    "i1 = min(i0 + block_m, Nq), kv = h // (Hq // Hkv), and fresh m = np.full(i1 - i0, -np.inf), "
    "l = np.zeros(i1 - i0), acc = np.zeros((i1 - i0, Dv)) for this query block only.",
    "Keys: j_start, j_stop = key_range(band, i0, i1, Nk); for j0 in range(j_start, j_stop, block_n): "
    "j1 = min(j0 + block_n, j_stop), s = block_scores(q, k, bias, band, reals, alibi, b, h, i0, i1, "
    "j0, j1, scratch), then online_softmax_update(m, l, acc, s, v[b, kv, j0:j1]).",
    "Finish per row ii: stats[0, b, h, i0 + ii] = m[ii], stats[1, b, h, i0 + ii] = l[ii], and "
    "out[b, h, i0 + ii] = acc[ii] / l[ii] where l[ii] > 0, else 0 (a causal row with Nq > Nk can "
    "see no key at all).",
]

# (what, B, Hq, Hkv, Nq, Nk, causal, block_m, block_n)
CASES = [
    ("one query, one key", 1, 1, 1, 1, 1, False, 4, 4),
    ("7 x 7, two heads", 1, 2, 2, 7, 7, False, 4, 3),
    ("37 x 37 causal, two batches", 2, 1, 1, 37, 37, True, 8, 16),
    ("Nq 7 < Nk 37, causal (bottom-right)", 1, 1, 1, 7, 37, True, 4, 8),
    ("Nq 37 > Nk 7, causal: the first 30 rows see no key", 1, 1, 1, 37, 7, True, 16, 4),
    ("GQA: 2 query heads share 1 kv head, 7 x 13", 1, 2, 1, 7, 13, False, 4, 4),
]
D, DV = 5, 3


def solution():
    return types.SimpleNamespace(flash_forward_tiles=ladder._forward_tiles)


def compare(*args, **kwargs):
    with np.errstate(invalid="ignore"):  # -inf - (-inf) where m is -inf in both
        _compare(*args, **kwargs)


def check(ns) -> list[str]:
    fn = function(ns, "flash_forward_tiles")
    if not hasattr(fn, "py_func"):
        raise Failure("`flash_forward_tiles` is not compiled by numba: put `@numba.njit` back on the line "
                      "above its `def` (the point of this exercise is a loop numba compiles; "
                      "`hasattr(flash_forward_tiles, 'py_func')` is True once it is)")
    rng = np.random.default_rng(6)
    done = []
    for what, B, Hq, Hkv, Nq, Nk, causal, block_m, block_n in CASES:
        q = rng.standard_normal((B, Hq, Nq, D))
        k = rng.standard_normal((B, Hkv, Nk, D))
        v = rng.standard_normal((B, Hkv, Nk, DV))
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=causal)
        out = np.full((B, Hq, Nq, DV), np.nan)  # NaN: an element the loop never writes shows
        stats = np.full((2, B, Hq, Nq), np.nan)
        call(ns, "flash_forward_tiles", q, k, v, *spec.pack(), block_m, block_n, out, stats)
        ref_out, ref_stats = reference.forward(q, k, v, spec)
        where = f"({what}; block_m {block_m}, block_n {block_n})"
        meaning = _mistakes(ref_out, ref_stats, block_m, Hq, Hkv)
        compare(f"stats[0] = m {where}", stats[0], ref_stats[0], rtol=1e-12, atol=0, meaning=meaning["m"])
        compare(f"stats[1] = l {where}", stats[1], ref_stats[1], rtol=1e-10, atol=1e-300, meaning=meaning["l"])
        compare(f"out {where}", out, ref_out, rtol=1e-10, atol=1e-12, meaning=meaning["out"])
        compare(f"lse {where}", protocol.lse_of(stats), protocol.lse_of(ref_stats), rtol=1e-12, atol=1e-12)
        done.append(f"out and stats (m, l) against reference.forward: {what}, {block_m} x {block_n} tiles")
    done.append("flash_forward_tiles is compiled by numba")
    return done


def _mistakes(out, stats, block_m, Hq, Hkv):
    m, l = stats
    empty = l == 0

    def unwritten(got, expected):
        return bool(np.any(np.isnan(got) & ~np.isnan(expected)))

    def only_first_block_right(got, expected):
        rows_ok = np.isclose(got, expected, rtol=1e-8, atol=1e-10)
        if rows_ok.ndim == 4:  # out: a row is right when all its Dv values are
            rows_ok = rows_ok.all(axis=-1)
        return rows_ok.shape[-1] > block_m and bool(rows_ok[0, 0, :block_m].all()) and not bool(rows_ok.all())

    def other_heads_wrong(got, expected):
        ok = np.isclose(got, expected, rtol=1e-8, atol=1e-10)
        return Hq > Hkv and bool(ok[:, 0].all()) and not bool(ok.all())

    stale = (only_first_block_right,
             "the rows of the first query block are right and later ones are not: start m, l, acc "
             "afresh (-inf, 0, 0) for every query block, inside the i0 loop")
    gqa = (other_heads_wrong,
           "head 0 is right and the others are not: query head h reads kv head h // (Hq // Hkv), "
           "for v as well as for the scores")
    never_written = (unwritten,
                     "some elements were never written (the grader fills out and stats with NaN first): "
                     "does the loop reach the last, short block? i1 = min(i0 + block_m, Nq), "
                     "j1 = min(j0 + block_n, j_stop)")
    return {
        "m": [never_written, stale, gqa],
        "l": [never_written,
              (lambda got, expected: np.allclose(np.asarray(got)[~empty], (m + np.log(l))[~empty]),
               "stats[1] holds lse: the stats are (m, l), l the sum of exp(s - m); lse = m + log(l) "
               "is computed from them (protocol.lse_of)"),
              stale, gqa],
        "out": [(lambda got, expected: bool(np.any(np.isnan(np.asarray(got))[empty])),
                 "NaN on a row that allows no key (l = 0, here a causal row when Nq > Nk): acc / l is "
                 "0 / 0 there; write out = 0 where l is 0"),
                never_written,
                (lambda got, expected: np.allclose(got, expected * l[..., None]),
                 "out is acc, not acc / l: divide by l at the end"),
                stale, gqa],
    }
