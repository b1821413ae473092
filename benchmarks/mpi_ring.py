"""Sequence-parallel attention on P ranks: time per step and the share spent waiting on
communication, ring (both layouts) and Ulysses. Run it under MPI::

    NUMBA_NUM_THREADS=1 mpiexec -n 2 python benchmarks/mpi_ring.py            # N=8192, ~1 min
    NUMBA_NUM_THREADS=1 mpiexec -n 2 python benchmarks/mpi_ring.py --n 2048 --repeats 3

float32, B=1, H=8, D=64 (issue 16's call), numba kernels, forward + backward. Each rank
runs one numba thread (``NUMBA_NUM_THREADS=1``): P ranks on P cores. Printed by rank 0:
medians over ``--repeats`` of the slowest rank's step, each rank's share of its step spent
in ``Waitall`` (``Ring.seconds``), and the balance figure the issue asks for: the zigzag
causal step over the contiguous full-attention step (<= 1.2 asked; a causal step has half
the work, so perfect balance gives ~0.5, and the contiguous causal step is held back by
its last rank, which has all the long rows).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

import microattn as ma
from microattn import distributed as dist
from microattn.distributed import ring as ring_module

comm = MPI.COMM_WORLD


def step(attention, q, k, v, dout, **kw):
    """One forward + backward; returns (seconds of the slowest rank, this rank's wait)."""
    captured = {}
    original = ring_module.Ring.__init__

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["ring"] = self

    ring_module.Ring.__init__ = capture
    try:
        tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
        comm.Barrier()
        start = time.perf_counter()
        out = attention(tq, tk, tv, comm=comm, backend="numba", **kw)
        out.backward(dout)
        seconds = time.perf_counter() - start
    finally:
        ring_module.Ring.__init__ = original
    wait = captured["ring"].seconds["wait"] if "ring" in captured else float("nan")
    return comm.allreduce(seconds, op=MPI.MAX), wait / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    P, N, H, D = comm.size, args.n, 8, 64
    rng = np.random.default_rng(0)
    whole = [rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(4)]
    rows = {layout: dist.positions(N, P, comm.rank, layout) for layout in dist.LAYOUTS}
    cases = [("ring", "contiguous", False), ("ring", "contiguous", True), ("ring", "zigzag", True),
             ("ring", "zigzag", False), ("ulysses", "contiguous", True)]
    medians = {}
    if comm.rank == 0:
        print(f"{P} ranks, N={N}, H={H}, D={D}, float32, forward + backward, numba\n")
        print("| attention | layout | mask | step (s) | waiting (share of the step, per rank) |")
        print("|---|---|---|---|---|")
    for name, layout, causal in cases:
        attention = dist.ring_attention if name == "ring" else dist.ulysses_attention
        q, k, v, dout = (x[:, :, rows[layout]] for x in whole)
        step(attention, q, k, v, dout, layout=layout, is_causal=causal)  # compile, warm
        results = [step(attention, q, k, v, dout, layout=layout, is_causal=causal)
                   for _ in range(args.repeats)]
        seconds = np.median([r[0] for r in results])
        waits = comm.gather(float(np.median([r[1] for r in results])), root=0)
        medians[(name, layout, causal)] = seconds
        if comm.rank == 0:
            share = ", ".join(f"{w:.0%}" for w in waits) if name == "ring" else "(all-to-all)"
            print(f"| {name} | {layout} | {'causal' if causal else 'full'} | {seconds:.3g} | {share} |",
                  flush=True)
    if comm.rank == 0:
        balance = medians[("ring", "zigzag", True)] / medians[("ring", "contiguous", False)]
        skew = medians[("ring", "contiguous", True)] / medians[("ring", "zigzag", True)]
        print(f"\nzigzag causal step / contiguous full step: {balance:.2f} (<= 1.2 asked)")
        print(f"contiguous causal step / zigzag causal step: {skew:.2f}")


if __name__ == "__main__":
    main()
