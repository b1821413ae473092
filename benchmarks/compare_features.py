"""What softcap and ALiBi cost on the numba CPU kernels: each against the plain kernel.

Validate, then time, in one process (the harness of ``compare_cpu.py``: calls interleaved
repetition by repetition, each timed call preceded by an untimed one, medians): B=1, H=8,
D=64, float32, N=4096 by default, the full (non-causal) problem and the causal one, forward
and forward+backward, for

* ``plain``: no score terms (the forward takes its kept-shift fast path, the exp fused into
  the score product);
* ``softcap``: ``softcap=30`` (the tanh of every score, forward and backward, and its slope
  in the backward; the forward's fast path is off: the exp cannot sit inside the product);
* ``alibi``: flash-attention's slopes ``2**(-8 (h + 1) / H)`` (a bias per score; no fast
  path either);
* ``softcap+alibi``: both.

The issue's target: softcap and ALiBi each cost <= 10% over ``plain`` at N=4096, forward +
backward. Ratios are ``variant time / plain time`` (> 1: the variant is slower). CPU time
(``cpu``: all threads of the process) is printed beside wall time: on a shared machine it
measures the work even when other processes hold a core.

Usage::

    python benchmarks/compare_features.py            # N=4096, 7 repetitions (~3 minutes)
    python benchmarks/compare_features.py --quick    # 3 repetitions
    python benchmarks/compare_features.py --n 1024 --no-causal
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_cpu import check_against_reference, interleaved_medians, ours  # noqa: E402  (the one timing harness)

from microattn.kernels.cpu import flash  # noqa: E402
from microattn.kernels.spec import make_attention_spec  # noqa: E402

B, H, D = 1, 8, 64
SOFTCAP = 30.0
ALIBI = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)  # flash-attention's / BLOOM's slopes for H heads
VARIANTS = {
    "plain": {},
    "softcap": {"softcap": SOFTCAP},
    "alibi": {"alibi_slopes": ALIBI},
    "softcap+alibi": {"softcap": SOFTCAP, "alibi_slopes": ALIBI},
}


def make_problem(N, causal, terms, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(4))
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=causal,
                               **terms)
    return q, k, v, dout, spec


def validate(causal, terms, N=300):
    """Forward+backward against the reference before any timing (float32 tolerances)."""
    check_against_reference(*make_problem(N, causal, terms, seed=1), f"{terms}, causal={causal}")


def measure(N, causal, reps, warmup) -> dict:
    """{variant: {"f", "fb", "cpu:f", "cpu:fb"}} in seconds, every call interleaved."""
    calls = {}
    for name, terms in VARIANTS.items():
        validate(causal, terms)
        q, k, v, dout, spec = make_problem(N, causal, terms)
        calls[f"{name}|f"] = ours(flash, q, k, v, dout, spec, False)
        calls[f"{name}|fb"] = ours(flash, q, k, v, dout, spec, True)
    t = interleaved_medians(calls, reps, warmup)
    return {name: {kind: t[f"{name}|{kind}"] for kind in ("f", "fb")}
            | {f"cpu:{kind}": t[f"cpu:{name}|{kind}"] for kind in ("f", "fb")}
            for name in VARIANTS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--n", type=int, default=4096, help="sequence length (Nq = Nk)")
    parser.add_argument("--no-causal", action="store_true", help="only the full problem")
    args = parser.parse_args(argv)
    reps, warmup = (3, 2) if args.quick else (7, 3)

    import numba

    print("$ python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]))
    print(f"numba {numba.__version__} ({numba.get_num_threads()} threads, layer "
          f"{numba.config.THREADING_LAYER}), numpy {np.__version__}")
    print(f"float32, B={B}, H={H}, D={D}, N={args.n}; medians of {reps} interleaved runs after "
          f"{warmup} warm-up calls; ms (wall), ratio to plain (wall | CPU time); "
          f"load average at start {os.getloadavg()[0]:.1f}")
    results = {}
    for causal in (False,) if args.no_causal else (False, True):
        t = measure(args.n, causal, reps, warmup)
        results["causal" if causal else "full"] = t
        print()
        print(f"{'causal' if causal else 'full':14s}   fwd ms  ratio wall|cpu  |  f+b ms  ratio wall|cpu")
        base = t["plain"]
        for name, row in t.items():
            print(f"{name:14s} {row['f'] * 1e3:8.1f}  {row['f'] / base['f']:5.3f} "
                  f"{row['cpu:f'] / base['cpu:f']:5.3f}  | {row['fb'] * 1e3:7.1f}  "
                  f"{row['fb'] / base['fb']:5.3f} {row['cpu:fb'] / base['cpu:fb']:5.3f}")
    print()
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return results


if __name__ == "__main__":
    main()
