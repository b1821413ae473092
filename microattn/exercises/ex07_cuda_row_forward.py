"""Exercise 7: a one-row-per-thread CUDA forward (numba.cuda; the simulator without a GPU).

Every thread owns one query row and walks the keys a tile at a time with the online softmax:
the learner writes the thread's step over one tile, ``online_softmax_step(s_row, acc, m_i,
l_i)``, the very function rung 1's forward kernel calls (``kernels/cuda/flash.py``, compiled
with ``cuda.jit(device=True)``). The stub's kernel around it (written out) computes the
scores, adds ``p_j v_j`` and writes out and lse.

Grading: first the step alone, called as plain Python on NumPy arrays (it is plain Python:
a blank stub fails here at once, before numba.cuda is touched), against the library's step
on the same tiles (first tile, larger and smaller maxima, masked tiles, a row with no key yet,
scores of ~1e3); then the stub's kernel around the learner's step, launched in the CUDA
simulator (or on a GPU), against ``kernels/reference.py``: out and lse, causal or not, GQA,
rows that see no key, large logits.

numba.cuda is imported only inside functions: the registry imports this module in processes
that must not start numba.cuda without the simulator. ``ENV`` makes the CLI grade in a child
process with the simulator switched on, unless a GPU is present.
"""

from __future__ import annotations

import math
import os
import types
from pathlib import Path

import numpy as np

from . import STUBS
from .grading import Failure, call, compare, function, load


def _gpu_present() -> bool:
    """An NVIDIA driver with a GPU on this (Linux) machine, seen without importing numba.cuda."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


ENV = {} if _gpu_present() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" else {"NUMBA_ENABLE_CUDASIM": "1"}

NUMBER = 7
SLUG = "cuda_row_forward"
TITLE = "A CUDA forward with one query row per thread: the online softmax step in a thread"
FILE = "cuda_row_forward.py"
READ = "docs/cuda-flash.md (rung 1, \"Forward\")"
HINTS = [
    "Three loops over s_row and one over acc. First m_new: start from m_i and take the max with "
    "every s_row[jj]. Then alpha = math.exp(m_i - m_new) rescales what came before: l_i and every "
    "acc[d].",
    "Then p_j = math.exp(s_row[jj] - m_new): subtract the *new* max (exp(1000) overflows), write it "
    "back into s_row[jj] (the kernel reads p there) and add it to l. Return (m_new, l_new).",
    "A tile with every key masked while m_i is still -inf gives m_new = -inf, and exp(-inf - -inf) "
    "is NaN: in that case return (m_i, l_i) unchanged and set every s_row[jj] to 0 (math.exp(-inf) "
    "is 0 too).",
    "No NumPy in a CUDA thread: plain for loops, math.exp, scalars. Compare with "
    "online_softmax_step in microattn/kernels/cuda/flash.py once you pass.",
]

# the step alone: (scores of one tile, acc before, m_i, l_i, what the case is)
NEG = -math.inf
STEP_CASES = [
    ([0.3, -1.2, 2.0, NEG], [0.0, 0.0, 0.0], NEG, 0.0, "the first tile"),
    ([1.5, 3.0, NEG, 0.1], [0.2, -0.4, 1.0], 0.5, 1.7, "a tile with a larger max than m_i"),
    ([-0.3, 1.0, 0.2, -2.0], [0.7, 0.1, -0.5], 2.5, 1.2, "a tile with a smaller max than m_i"),
    ([NEG, NEG, NEG, NEG], [0.0, 0.0, 0.0], NEG, 0.0, "a masked tile before any allowed key"),
    ([NEG, NEG, NEG, NEG], [0.3, -0.2, 0.9], 1.0, 2.0, "a masked tile after allowed keys"),
    ([1000.0, 998.0, NEG, 1001.0], [0.0, 0.0, 0.0], NEG, 0.0, "scores of ~1000 (exp overflows)"),
    ([1003.0, 999.0, 1002.5, NEG], [0.4, 0.3, -0.1], 1001.0, 1.4, "scores of ~1000 after a tile"),
]

# the kernel: (B, H, Hkv, Nq, Nk, causal, logit scale)
KERNEL_CASES = [(1, 2, 2, 7, 7, False, 1.0), (1, 2, 2, 9, 9, True, 1.0), (1, 2, 1, 5, 11, True, 1.0),
                (2, 1, 1, 9, 5, True, 1.0), (1, 2, 1, 6, 6, True, 300.0)]
D, DV = 3, 4


def solution():
    from ..kernels.cuda import flash  # numba.cuda: only when a solution is asked for

    return types.SimpleNamespace(online_softmax_step=flash.online_softmax_step)


def check(ns) -> list[str]:
    from ..kernels.cuda import flash

    learner = function(ns, "online_softmax_step")
    done = []
    for scores, acc, m_i, l_i, name in STEP_CASES:
        _check_step(ns, flash.online_softmax_step, scores, acc, m_i, l_i, name)
        done.append(f"online_softmax_step on {name}")
    reason = flash.unavailable_reason()
    if reason is not None:
        raise Failure(f"your step is right; the kernel cannot run here: {reason}")
    from ..kernels import reference
    from ..kernels.protocol import lse_of
    from ..kernels.spec import make_attention_spec

    harness = load(STUBS / FILE).forward  # the harness as the stub has it
    rng = np.random.default_rng(7)
    where = "the CUDA simulator" if flash.simulated() else "the GPU"
    for B, H, Hkv, Nq, Nk, causal, logits in KERNEL_CASES:
        q = rng.standard_normal((B, H, Nq, D)) * logits
        k = rng.standard_normal((B, Hkv, Nk, D))
        v = rng.standard_normal((B, Hkv, Nk, DV))
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=causal)
        want_out, want_stats = reference.forward(q, k, v, spec)
        name = f"B={B}, H={H}, Hkv={Hkv}, Nq={Nq}, Nk={Nk}{', causal' if causal else ''}" + (
            f", logits x{logits:g}" if logits != 1 else "")
        try:
            out, lse = harness(q, k, v, causal, step=learner)
        except Exception as error:  # noqa: BLE001 - a kernel that fails to run is the learner's message
            raise Failure(f"the kernel with your step failed on {where} ({name}): {type(error).__name__}: "
                          f"{error}") from None
        with np.errstate(invalid="ignore"):  # lse -inf on rows that see no key: inf - inf
            compare(f"out ({name})", out, want_out, rtol=1e-9, atol=1e-12)
            compare(f"lse ({name})", lse, lse_of(want_stats), rtol=1e-9, atol=1e-12)
        done.append(f"the kernel on {where}, out and lse: {name}")
    return done


def _check_step(ns, library_step, scores, acc, m_i, l_i, name):
    s_lib, acc_lib = np.array(scores), np.array(acc)
    m_new, l_new = library_step(s_lib, acc_lib, m_i, l_i)
    s_got, acc_got = np.array(scores), np.array(acc)
    with np.errstate(all="ignore"):  # the learner's exp may overflow: that is diagnosed below
        got = call(ns, "online_softmax_step", s_got, acc_got, m_i, l_i)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Failure(f"online_softmax_step on {name} returned {got!r}: return (m_new, l_new)")
    mistakes = _mistakes(np.array(scores), np.array(acc), m_i, l_i, m_new)
    try:
        with np.errstate(invalid="ignore"):  # comparing -inf with -inf computes inf - inf
            compare("m_new", got[0], m_new, rtol=1e-12, atol=0, meaning=mistakes["m"])
            compare("s_row (p after the step)", s_got, s_lib, rtol=1e-12, atol=1e-300, meaning=mistakes["p"])
            compare("l_new", got[1], l_new, rtol=1e-12, atol=1e-300, meaning=mistakes["l"])
            compare("acc", acc_got, acc_lib, rtol=1e-12, atol=1e-300, meaning=mistakes["acc"])
    except Failure as failure:
        raise Failure(f"online_softmax_step on {name} (s_row = {scores}, m_i = {m_i}, l_i = {l_i}): "
                      f"{failure}") from None


def _mistakes(scores, acc, m_i, l_i, m_new):
    """meaning lists for m, p, l and acc: the values the usual mistakes give."""
    with np.errstate(all="ignore"):
        alpha = np.exp(m_i - m_new)
        p_raw, p_old = np.exp(scores), np.exp(scores - m_i)
        p = np.exp(scores - m_new)
        acc_divided = acc / alpha

    def same(other):
        return lambda got, expected: np.allclose(got, other, rtol=1e-9, atol=0) and not np.allclose(
            expected, other, rtol=1e-9, atol=0)

    nan = (lambda got, expected: bool(np.isnan(got).any()) and not np.isnan(expected).any(),
           "NaN: with no key allowed yet (m_i = -inf) and a fully masked tile, m_new = -inf and "
           "exp(-inf - -inf) = NaN; return (m_i, l_i) unchanged and p = 0 in that case")
    overflow = (lambda got, expected: bool(np.isinf(got).any()) and np.isfinite(expected).all(),
                "inf: exp of a score of ~1000 overflows; subtract the running max first: exp(s_j - m_new)")
    return {
        "m": [(same(np.max(scores)), "m_new must include m_i: max(m_i, max_j s_j), not the tile's max alone"),
              nan],
        "p": [(same(scores), "s_row still holds the scores: write p_j = exp(s_j - m_new) back into s_row[jj]"),
              overflow,
              (same(p_raw), "p_j = exp(s_j) without subtracting the max: use exp(s_j - m_new)"),
              (same(p_old), "p_j used the old max m_i: subtract the new one, m_new"), nan],
        "l": [(same(l_i + np.sum(p)), "l_i was not rescaled: l_new = alpha * l_i + sum_j p_j, alpha = exp(m_i - m_new)"),
              overflow, nan],
        "acc": [(same(acc), "acc was not rescaled: multiply every acc[d] by alpha = exp(m_i - m_new)"),
                (same(acc_divided), "acc was divided by alpha: multiply by alpha = exp(m_i - m_new) (<= 1)"), nan],
    }
