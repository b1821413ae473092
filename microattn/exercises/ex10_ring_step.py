"""Exercise 10: one step of ring (sequence-parallel) attention, two ranks simulated.

A rank attends its query chunk to the K/V block it holds, causal by *global* position
(``offset = q_start - k_start``), and merges the partial (out, m, l) into its running state
with the split-KV merge: ``m = max``, each part's ``l`` and ``out`` rescaled by
``exp(m_x - m)``. The grader runs the stub's harness (``run_ring``: P = 2 ranks as lists, the
send a rotation) with every step checked against the library's own
``distributed.ring.ring_step``, then compares the whole result with one-process causal
attention (``kernels.reference``), in both layouts (contiguous and zigzag).
"""

from __future__ import annotations

import types

import numpy as np

from ..distributed import ring
from ..kernels import reference
from ..kernels.protocol import lse_of
from ..kernels.spec import make_attention_spec
from . import STUBS
from .grading import Failure, call, compare, function, load

NUMBER = 10
SLUG = "ring_step"
TITLE = "Ring attention: one step of a rank, causal by global position, merged with rescaling"
FILE = "ring_step.py"
READ = "docs/distributed.md (\"Ring attention\")"
HINTS = [
    "Two things happen: attend (one call: attend(q, k, v, offset)) and merge. If attend returns "
    "None the band allowed no pair: return state unchanged.",
    "The offset is about global rows: local query i is row q_start + i, local key j is row "
    "k_start + j, and causal means k_start + j <= q_start + i, so offset = q_start - k_start. "
    "Passing 0 treats every pair as if both chunks started at row 0.",
    "Merge: m = np.maximum(m_a, m_b); each part's weight is l_x * np.exp(m_x - m); l is the sum of "
    "the weights and out = (w_a * out_a + w_b * out_b) / l (with [..., None] on the weights). "
    "out_a and out_b are normalised by their own l.",
    "Rows that have seen no key yet have m = -inf and l = 0 in both parts: exp(-inf - -inf) is NaN. "
    "Shift by 0 where m is -inf, and divide by 1 where l is 0 (merge.merge_rows does both).",
]

# (B, H, Hkv, N, D, Dv)
SHAPES = [(1, 2, 2, 8, 3, 4), (2, 2, 1, 12, 4, 3)]


def solution():
    return types.SimpleNamespace(ring_step=ring.ring_step)


def check(ns) -> list[str]:
    function(ns, "ring_step")
    harness = load(STUBS / FILE).run_ring  # the harness as the stub has it, whatever the learner's copy says
    rng = np.random.default_rng(10)
    done = []
    for B, H, Hkv, N, D, Dv in SHAPES:
        q = rng.standard_normal((B, H, N, D))
        k = rng.standard_normal((B, Hkv, N, D)) * 2.0  # logits of a few units: rescaling matters
        v = rng.standard_normal((B, Hkv, N, Dv))
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=True)
        want_out, want_stats = reference.forward(q, k, v, spec)
        for layout in ("contiguous", "zigzag"):
            name = f"{layout}, N={N}, B={B}, H={H}, Hkv={Hkv}"
            harness(q, k, v, layout, step=_checked_step(ns, name))  # every step against the library's
            out, lse = harness(q, k, v, layout, step=lambda *a: call(ns, "ring_step", *a))
            compare(f"out of the whole ({name})", out, want_out, rtol=1e-9, atol=1e-12)
            compare(f"lse of the whole ({name})", lse, lse_of(want_stats), rtol=1e-9, atol=1e-12)
            done.append(f"every step and the whole causal attention, {name}")
    return done


def _checked_step(ns, name):
    """A step for the harness: the learner's ring_step, compared with the library's on the
    same inputs; the library's result goes on, so one wrong step is reported alone."""
    def step(state, q, k, v, q_start, k_start, attend):
        expected = ring.ring_step(state, q, k, v, q_start, k_start, attend)
        copy = tuple(np.array(x) for x in state)
        got = call(ns, "ring_step", copy, q.copy(), k.copy(), v.copy(), q_start, k_start, attend)
        where = (f"merging keys {k_start}..{k_start + k.shape[2] - 1} into queries {q_start}.."
                 f"{q_start + q.shape[2] - 1} ({name})")
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise Failure(f"{where}: ring_step returned {type(got).__name__}; return the state (out, m, l)")
        mistakes = _mistakes(state, q, k, v, q_start, k_start, attend)
        for label, g, e in zip(("out", "m", "l"), got, expected):
            try:
                compare(label, g, e, rtol=1e-9, atol=1e-12, meaning=mistakes(label))
            except Failure as failure:
                raise Failure(f"{where}: {failure}") from None
        return expected
    return step


def _mistakes(state, q, k, v, q_start, k_start, attend):
    """meaning lists per part of the state: the wrong states the usual mistakes give."""
    out_a, m_a, l_a = state
    local = ring.ring_step(state, q, k, v, 0, 0, attend)  # offset 0: positions taken as local
    part = attend(q, k, v, q_start - k_start)
    wrong = {}
    if part is not None:
        out_b, (m_b, l_b) = part
        with np.errstate(all="ignore"):
            l_sum = l_a + l_b
            no_rescale = ((l_a[..., None] * out_a + l_b[..., None] * out_b) / np.where(l_sum == 0, 1, l_sum)[..., None],
                          np.maximum(m_a, m_b), l_sum)
            summed = (out_a + out_b, np.maximum(m_a, m_b), l_sum)
        wrong = {"no rescale": no_rescale, "summed": summed}

    def matches(state_index, other):
        return lambda got, expected: np.shape(got) == np.shape(other[state_index]) and np.allclose(got, other[state_index])

    def meaning(label):
        i = ("out", "m", "l").index(label)
        found = [(matches(i, local),
                  "the causal mask used local positions (offset 0): query i of this chunk is global row "
                  "q_start + i and key j global row k_start + j, so pass offset = q_start - k_start")]
        if wrong:
            found += [(matches(i, wrong["no rescale"]),
                       "merged without rescaling: l_a and l_b (and the outs) are sums against different "
                       "maxima; multiply each by exp(m_x - m), m = max(m_a, m_b), before adding"),
                      (matches(i, wrong["summed"]),
                       "the outs were added: they are averages over different keys; weigh each by its "
                       "share l_x exp(m_x - m) / l")]
        found.append((lambda got, expected: bool(np.isnan(got).any()) and not np.isnan(expected).any(),
                      "NaN where a row has seen no key yet in either part (m = -inf): exp(-inf - -inf) is "
                      "NaN; shift by 0 where m = -inf and divide by 1 where l = 0"))
        return found
    return meaning
