"""Packed variable-length sequences, side by side in one process: microattn's numba backend
given ``cu_seqlens``, the same sequences as separate calls, and PyTorch's CPU
``scaled_dot_product_attention`` given the equivalent dense block-diagonal causal mask.

Issue 14's call: 16 sequences of random lengths packed to 16384 tokens, B=1, H=8, D=64,
float32, causal, forward + backward. Targets: packed within 1.3x the separate calls, and
>= 8x faster than PyTorch with the dense mask. Medians [min-max] over ``--repeats``, the
three calls interleaved repetition by repetition (a second's pause after PyTorch's call,
whose OpenMP workers keep spinning for a while and would slow the next call).

Usage::

    python benchmarks/compare_varlen.py                 # ~2 minutes on 2 cores
    python benchmarks/compare_varlen.py --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

import microattn as ma
from microattn import functional as F

H, D = 8, 64


def lengths_summing_to(total, count, rng):
    cuts = np.sort(rng.choice(np.arange(1, total), count - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lengths = lengths_summing_to(args.tokens, args.sequences, rng)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    N = args.tokens
    q, k, v, dout = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(4))

    def packed():
        tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                       backend="numba").backward(dout)

    def separate():
        for s in range(len(lengths)):
            rows = slice(cu[s], cu[s + 1])
            tq, tk, tv = (ma.tensor(np.ascontiguousarray(x[:, :, rows]), requires_grad=True) for x in (q, k, v))
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, backend="numba").backward(
                np.ascontiguousarray(dout[:, :, rows]))

    same_sequence = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(N)
    mask = torch.from_numpy((same_sequence[:, None] == same_sequence[None, :])
                            & (positions[None, :] <= positions[:, None]))
    tdout = torch.from_numpy(dout)

    def dense_torch():
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        TF.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask).backward(tdout)

    calls = {"torch": dense_torch, "packed": packed, "separate": separate}
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            if name == "torch":
                time.sleep(1.0)  # PyTorch's OpenMP workers spin for a while after a call
    med = {name: float(np.median(t)) for name, t in times.items()}

    def summary(name):
        t = np.asarray(times[name])
        return f"{np.median(t):.3g} [{t.min():.3g}-{t.max():.3g}]"

    print(f"{len(lengths)} causal sequences, {N} tokens (lengths {lengths.min()}..{lengths.max()}), "
          f"H={H}, D={D}, float32, forward + backward; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| microattn packed (s) | microattn separate calls (s) | PyTorch, dense mask (s) | "
          "packed / separate | torch / packed |")
    print("|---|---|---|---|---|")
    print(f"| {summary('packed')} | {summary('separate')} | {summary('torch')} | "
          f"{med['packed'] / med['separate']:.2f} | {med['torch'] / med['packed']:.1f} |")


if __name__ == "__main__":
    main()
