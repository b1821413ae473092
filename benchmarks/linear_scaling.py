"""Linear attention scales linearly: time(N) / time(N/2) should be about 2.

Times the numba kernels of ``microattn.kernels.cpu.linear`` (forward, and forward +
backward) for float32, B=1, H=8, D=Dv=64, causal and not, at N = 4096, 8192, 16384
(Nq = Nk = N), and prints a Markdown table of medians after a warm-up call (wall time,
and the process CPU time, which other jobs on a shared machine disturb much less), plus
each time divided by the time at the previous (half) length. Run from the repository root::

    python benchmarks/linear_scaling.py                 # the table in docs/linear-attention.md
    python benchmarks/linear_scaling.py --rung loops    # rung 1 of the ladder instead
    python benchmarks/linear_scaling.py --sizes 1024 2048 --repeat 3

The kernels are called directly (no autograd), so the figures are the kernels' own.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np


def time_ms(fn, repeat: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) in ms, after a warm-up call.

    On a shared machine other jobs stretch the wall time; the CPU time our threads were
    actually given is much less disturbed, so the ratios are shown for both.
    """
    fn()  # warm-up: compiles (or loads the cache) and touches the memory once
    wall, cpu = [], []
    for _ in range(repeat):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def ratio(now, before) -> str:
    """'wall ratio / cpu ratio' against the previous (half) length."""
    return "" if before is None else f"{now[0] / before[0]:.2f} / {now[1] / before[1]:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="D = Dv")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--rung", choices=["chunked", "loops"], default="chunked")
    args = parser.parse_args(argv)

    import numba

    from microattn.kernels.cpu import linear
    from microattn.kernels.spec import make_linear_spec

    reason = linear.unavailable_reason()
    if reason is not None:
        sys.exit(f"the numba linear kernels cannot run here: {reason}")
    forward, backward = ((linear.forward, linear.backward) if args.rung == "chunked"
                         else (linear.forward_loops, linear.backward_loops))

    print("command: python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    rng = np.random.default_rng(0)
    B, H, D = 1, args.heads, args.dim
    rows = []
    for causal in (False, True):
        previous = None
        for N in args.sizes:
            q, k, v, dout = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(4))
            spec = make_linear_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, causal=causal)
            fwd = time_ms(lambda: forward(q, k, v, spec), args.repeat)
            both = time_ms(lambda: backward(q, k, v, forward(q, k, v, spec), dout, spec), args.repeat)
            prev_fwd, prev_both = previous if previous else (None, None)
            rows.append(("causal" if causal else "full", N, fwd, ratio(fwd, prev_fwd), both,
                         ratio(both, prev_both)))
            previous = (fwd, both)
    print(f"numba {numba.__version__}, threading layer {numba.threading_layer()}, "
          f"{numba.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} cpus; "
          f"float32, B={B}, H={H}, D=Dv={D}, rung {args.rung}, median of {args.repeat}")
    print()
    print("medians in ms as wall / process CPU time (both threads); "
          "ratio = time(N) / time(N/2), of wall / of CPU")
    print()
    print("| mask   |     N | forward         | ratio       | fwd+bwd         | ratio       |")
    print("|--------|------:|----------------:|------------:|----------------:|------------:|")
    for mask, N, fwd, r_fwd, both, r_both in rows:
        print(f"| {mask:<6} | {N:>5} | {fwd[0]:>6.1f} / {fwd[1]:>6.1f} | {r_fwd:>11} "
              f"| {both[0]:>6.1f} / {both[1]:>6.1f} | {r_both:>11} |")


if __name__ == "__main__":
    main()
