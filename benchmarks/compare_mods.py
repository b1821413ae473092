"""User-written mask_mod / score_mod on the numba backend against the built-ins, in one process.

Issue 14's call: B=1, H=8, N=4096, D=64, float32, forward + backward. Target: a mask_mod
runs within 1.3x of the same pattern as a built-in, and time falls with the allowed
fraction (tiles the block mask forbids are skipped). Rows:

* ``causal``: ``is_causal=True`` (built-in) and ``mask_mod = j <= i`` (the same pattern):
  the 1.3x target.
* ``prefix-LM`` (the first N/4 keys for everybody, causal after): as a mask_mod, as the
  same boolean ``attn_mask``, and ``is_causal`` for scale (nearly the same work).
* ``score_mod``: a relative-position bias ``score - 0.01 * |i - j|`` with causal, against
  the same bias as a float ``attn_mask`` with causal.
* documents of L tokens (block-diagonal mask_mod), allowed fraction ~ L / N: the time
  should fall in proportion.

Medians [min-max] over ``--repeats`` of warm calls (each mod is compiled once, seconds,
before timing; the compile and the block mask's first evaluation are reported apart).

Usage::

    python benchmarks/compare_mods.py                 # a few minutes on 2 cores
    python benchmarks/compare_mods.py --n 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import microattn as ma
from microattn import functional as F
from microattn.kernels.cpu import flash
from microattn.kernels.spec import make_attention_spec

H, D = 8, 64


def step(q, k, v, dout, **kw):
    tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    out = F.scaled_dot_product_attention(tq, tk, tv, backend="numba", **kw)
    out.backward(dout)
    return out.data


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.median(times), min(times), max(times)


def report(name, stats, base=None):
    med, lo, hi = stats
    ratio = f"  {med / base:5.2f}x" if base else ""
    print(f"  {name:<44} {med * 1e3:8.1f} ms [{lo * 1e3:.0f}-{hi * 1e3:.0f}]{ratio}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    N, R = args.n, args.repeats
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(4))
    prefix = N // 4

    def causal_mod(b, h, i, j):
        return j <= i

    def prefix_lm(b, h, i, j):
        return (j < prefix) | (j <= i)

    def relative(score, b, h, i, j):
        return score - 0.01 * abs(i - j)

    def relative_grad(score, b, h, i, j):
        return 1.0

    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    prefix_mask = prefix_lm(0, 0, i, j)
    relative_bias = (-0.01 * np.abs(i - j)).astype(np.float32)

    cases = {
        "causal": dict(is_causal=True),
        "causal as mask_mod": dict(mask_mod=causal_mod),
        "prefix-LM as mask_mod": dict(mask_mod=prefix_lm),
        "prefix-LM as a boolean attn_mask": dict(attn_mask=prefix_mask),
        "relative score_mod, causal": dict(score_mod=relative, score_mod_grad=relative_grad,
                                           is_causal=True),
        "relative as a float attn_mask, causal": dict(attn_mask=relative_bias, is_causal=True),
    }
    print(f"B=1, H={H}, N={N}, D={D}, float32, forward+backward, numba backend, "
          f"median [min-max] of {R}")
    print("compile + first call (block mask evaluated once, then cached):")
    for name, kw in cases.items():
        t = time.perf_counter()
        step(q, k, v, dout, **kw)
        print(f"  {name:<44} {time.perf_counter() - t:8.1f} s", flush=True)
    ref = step(q, k, v, dout, is_causal=True)
    got = step(q, k, v, dout, mask_mod=causal_mod)
    print(f"causal mask_mod vs is_causal, max |out difference|: {np.abs(got - ref).max():.2e}")
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3,
                               mask_mod=prefix_lm)
    flash._BLOCK_MASKS.clear()
    t = time.perf_counter()
    flash.block_mask(spec, flash.specialised(spec))
    print(f"prefix-LM block mask alone (H*N*N = {H * N * N / 1e6:.0f}M mask_mod calls): "
          f"{(time.perf_counter() - t) * 1e3:.1f} ms")

    print("warm:")
    results = {name: timed(lambda kw=kw: step(q, k, v, dout, **kw), R) for name, kw in cases.items()}
    base = results["causal"][0]
    report("causal (is_causal)", results["causal"])
    report("causal as mask_mod, vs is_causal", results["causal as mask_mod"], base)
    report("prefix-LM as mask_mod, vs is_causal", results["prefix-LM as mask_mod"], base)
    report("prefix-LM as bool attn_mask, vs is_causal", results["prefix-LM as a boolean attn_mask"], base)
    report("relative score_mod causal, vs is_causal", results["relative score_mod, causal"], base)
    report("relative float attn_mask causal, vs is_causal",
           results["relative as a float attn_mask, causal"], base)

    print("documents of L tokens as mask_mod (allowed fraction ~ L/N), vs the full call:")
    full = timed(lambda: step(q, k, v, dout), R)
    report("full (no mask)", full)
    for L in (N // 8, N // 4, N // 2, N):
        def document(b, h, i, j, L=L):
            return i // L == j // L

        step(q, k, v, dout, mask_mod=document)  # compile
        report(f"documents of {L} (fraction {L / N:.3f})",
               timed(lambda document=document: step(q, k, v, dout, mask_mod=document), R), full[0])


if __name__ == "__main__":
    main()
