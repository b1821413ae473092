"""One decoding step against a long KV cache, side by side: microattn's numba backend,
PyTorch's CPU ``scaled_dot_product_attention``, and a ``np.copyto`` of the cache's bytes
(what reading them costs on this machine), in one process.

The call of issue 14: B=1, Hq=32, Hkv=8, D=128, Nk=32768, one query, float32 (the cache
is 268 MB, far larger than any cache level, so a step is a read of memory). Rows:

* **ours**: ``F.scaled_dot_product_attention(..., backend="numba")`` under ``no_grad``, which
  runs ``kernels/cpu/decode.py`` (keys split across threads when the kv heads are few, each
  K/V row read once per kv head);
* **torch**: ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``;
* **copy**: ``np.copyto`` of K and V into a buffer of the same size.

Printed: medians [min-max] over ``--repeats`` (calls interleaved rep by rep, as
compare_e2e.py), ``copy / ours`` (the share of the copy's read rate the step reaches; the
issue asks >= 0.6) and ``torch / ours`` (>= 1.5 asked). Also an MQA row (Hkv=1), where
the split across threads is what keeps both cores busy.

Usage::

    python benchmarks/compare_decode.py               # ~1 minute on 2 cores
    python benchmarks/compare_decode.py --nk 4096 --repeats 21
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

import microattn as ma
from microattn import functional as F
from microattn.kernels.cpu import decode


def interleaved(calls: dict, reps: int) -> dict:
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds) -> str:
    ms = np.asarray(seconds) * 1e3
    return f"{np.median(ms):.3g} [{ms.min():.3g}-{ms.max():.3g}]"


def step_row(Hq, Hkv, D, Nk, reps, rng):
    q = rng.standard_normal((1, Hq, 1, D), dtype=np.float32)
    k = rng.standard_normal((1, Hkv, Nk, D), dtype=np.float32)
    v = rng.standard_normal((1, Hkv, Nk, D), dtype=np.float32)
    cache = np.stack([k, v])
    copy = np.empty_like(cache)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    with ma.no_grad():
        ours = F.scaled_dot_product_attention(q, k, v, backend="numba").data
    with torch.no_grad():
        theirs = TF.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-5)

    def run_ours():
        with ma.no_grad():
            F.scaled_dot_product_attention(q, k, v, backend="numba")

    def run_torch():
        with torch.no_grad():
            TF.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)

    times = interleaved({"ours": run_ours, "torch": run_torch,
                         "copy": lambda: np.copyto(copy, cache)}, reps)
    med = {name: np.median(t) for name, t in times.items()}
    spec = ma.kernels.spec.make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3)
    print(f"| Hq={Hq} Hkv={Hkv} D={D} Nk={Nk} ({cache.nbytes / 1e6:.0f} MB, "
          f"{decode.splits_for(spec)} split(s)) | {summary(times['ours'])} | "
          f"{summary(times['torch'])} | {summary(times['copy'])} | "
          f"{med['copy'] / med['ours']:.2f} | {med['torch'] / med['ours']:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nk", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, B=1, one query")
    print("\n| call | microattn (ms) | PyTorch (ms) | np.copyto (ms) | copy / ours | torch / ours |")
    print("|---|---|---|---|---|---|")
    step_row(32, 8, 128, args.nk, args.repeats, rng)
    step_row(32, 1, 128, args.nk, args.repeats, rng)


if __name__ == "__main__":
    main()
