"""The 75 matrix products of one training step of issue 12's model, timed alone.

    python benchmarks/step_products.py ours     # fused.Linear's products (split, paired)
    python benchmarks/step_products.py numpy    # NumPy's OpenBLAS, its own threads
    python benchmarks/step_products.py torch    # PyTorch (MKL), the oracle only
    python benchmarks/step_products.py numpy1   # NumPy's OpenBLAS on one thread
    python benchmarks/step_products.py torch1   # PyTorch on one thread: per core, MKL against OpenBLAS

One library per process: OpenBLAS's and PyTorch's worker threads spin for a while after
each call, and in one process the last library's spinning threads slow the next one down
(measured: PyTorch at 34 GF/s right after NumPy's threaded products). Per layer (batch
8 x 256 rows, E = 256, MLP 1024) the q, k, v, o projections, fc_in and fc_out, each
forward (rows @ W.T), dx (g @ W) and dweight (g.T @ rows); four layers and the LM head
(vocab 256). Prints the median of 9 passes and GF/s (docs/performance.md, "Stop 14").
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

ROWS, LAYERS = 8 * 256, 4
SHAPES = [(256, 256)] * 4 + [(256, 1024), (1024, 256)]  # (in, out) of each Linear of a layer


def products(rng):
    """[(kind, a, b)]: the operands, with kind fwd (a @ b.T), dx (a @ b), dw (a.T @ b)."""
    layer = []
    for n_in, n_out in SHAPES:
        layer += [("fwd", (ROWS, n_in), (n_out, n_in)), ("dx", (ROWS, n_out), (n_out, n_in)),
                  ("dw", (ROWS, n_out), (ROWS, n_in))]
    head = [("fwd", (ROWS, 256), (256, 256)), ("dx", (ROWS, 256), (256, 256)),
            ("dw", (ROWS, 256), (ROWS, 256))]
    return [(kind, rng.standard_normal(a).astype(np.float32), rng.standard_normal(b).astype(np.float32))
            for kind, a, b in layer * LAYERS + head]


def operands(kind, a, b):
    return (a, b.T) if kind == "fwd" else (a, b) if kind == "dx" else (a.T, b)


def main(argv=None):
    which = (argv if argv is not None else sys.argv[1:]) or ["ours"]
    if which[0] not in ("ours", "numpy", "torch", "numpy1", "torch1"):
        print("usage: python benchmarks/step_products.py ours|numpy|torch|numpy1|torch1", file=sys.stderr)
        return 2
    work = products(np.random.default_rng(0))
    flops = sum(2 * x.shape[0] * x.shape[1] * y.shape[1] for x, y in (operands(*w) for w in work))
    if which[0] in ("torch", "torch1"):
        import torch  # the oracle, in its own process

        if which[0] == "torch1":
            torch.set_num_threads(1)
        pairs = [operands(kind, torch.from_numpy(a), torch.from_numpy(b)) for kind, a, b in work]

        def run():
            for x, y in pairs:
                torch.mm(x, y)
    elif which[0] == "ours":
        from microattn import fused

        pairs = [operands(*w) for w in work]  # per Linear: fwd, dx, dw

        def run():  # as fused.Linear does them: the forward split, the backward's two paired
            for i in range(0, len(pairs), 3):
                fused._product(*pairs[i])
                fused._two_products(pairs[i + 1], pairs[i + 2])
    else:
        from microattn.kernels import blas

        pairs = [operands(*w) for w in work]
        threads = blas.single_threaded if which[0] == "numpy1" else contextlib.nullcontext

        def run():
            with threads():
                for x, y in pairs:
                    np.matmul(x, y)
    seconds = []
    for _ in range(9):
        run()
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    print(f"{which[0]}: {flops / 1e9:.1f} GFLOP in {median * 1e3:.1f} ms, {flops / median / 1e9:.0f} GF/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
