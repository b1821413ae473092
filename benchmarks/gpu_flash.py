"""GPU benchmark of the numba.cuda flash attention kernels (microattn.kernels.cuda.flash).

Validate, then time (as llm.c's harness does): each (dtype, D, causal) configuration is first
checked against the NumPy reference on a small problem, then forward and forward+backward are
timed on B x H x N x D inputs that stay on the device, with ``cuda.synchronize()`` around
each timed call. Beside it, torch's scaled_dot_product_attention in float32 when torch with
CUDA is importable.

FLOP counts (the convention of the flash-attention papers, Nq = Nk = N, D = Dv):
forward 4 * B * H * N^2 * D (half of it when causal); backward 2.5x forward, so
forward+backward = 3.5x forward.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_flash.py                       # N 1024..16384, D 64/128, H 16, B 4
    python benchmarks/gpu_flash.py --n 4096 --d 128 --dtype float32
    python benchmarks/gpu_flash.py --n 4096 --d 64 --resident 128 --staged 32   # try other tiles

No figures are recorded here yet: this was written on a machine without a GPU. Under
``NUMBA_ENABLE_CUDASIM=1`` it runs (very slowly), which the test suite does at N = 16.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from microattn.kernels import reference
from microattn.kernels.cuda import flash
from microattn.kernels.spec import make_attention_spec

VALIDATE_N = 128  # sequence length of the correctness check before timing


def forward_flops(B, H, N, D, causal):
    flops = 4 * B * H * N * N * D
    return flops / 2 if causal else flops


def make_spec(B, H, N, D, dtype, causal):
    shape = (B, H, N, D)
    return make_attention_spec(shape, shape, shape, (np.dtype(dtype),) * 3, is_causal=causal)


def validate(D, dtype, causal, n):
    """Max relative error of out and dq/dk/dv against the reference on a (1, 2, n, D) problem."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, n, D)).astype(dtype) for _ in range(4))
    spec = make_spec(1, 2, n, D, dtype, causal)
    out, lse = flash.forward(q, k, v, spec)
    grads = flash.backward(q, k, v, out, lse, dout, spec)
    r_out, r_lse = reference.forward(q, k, v, spec)
    r_grads = reference.backward(q, k, v, r_out, r_lse, dout, spec)
    errors = [np.abs(a - b).max() / np.abs(b).max()
              for a, b in zip((out,) + tuple(grads), (r_out,) + tuple(r_grads))]
    return float(max(errors))


def time_call(fn, repeats):
    """Best wall time of ``fn()`` in ms, synchronising the device before and after."""
    best = np.inf
    for _ in range(repeats):
        flash.cuda.synchronize()
        start = time.perf_counter()
        fn()
        flash.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def time_flash(B, H, N, D, dtype, causal, repeats):
    rng = np.random.default_rng(0)
    q, k, v, dout = (flash.to_device(rng.standard_normal((B, H, N, D)).astype(dtype))
                     for _ in range(4))  # (B, H, N, D) each
    spec = make_spec(B, H, N, D, dtype, causal)
    out, lse = flash.forward(q, k, v, spec)  # compiles on first use
    flash.backward(q, k, v, out, lse, dout, spec)
    fwd_ms = time_call(lambda: flash.forward(q, k, v, spec), repeats)

    def fwd_bwd():
        o, l = flash.forward(q, k, v, spec)
        flash.backward(q, k, v, o, l, dout, spec)

    return fwd_ms, time_call(fwd_bwd, repeats)


def torch_sdpa():
    """torch.nn.functional.scaled_dot_product_attention if torch with CUDA is importable."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def time_torch(torch, B, H, N, D, causal, repeats):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(B, H, N, D, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda")

    def best_ms(fn):
        fn()
        best = np.inf
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    fwd = best_ms(lambda: sdpa(q, k, v, is_causal=causal))
    fwd_bwd = best_ms(lambda: sdpa(q, k, v, is_causal=causal).backward(dout))
    return fwd, fwd_bwd


def device_name() -> str:
    if flash.simulated():
        return "numba CUDA simulator (timings mean nothing)"
    name = flash.cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths (Nq = Nk)")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims (D = Dv)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch SDPA column")
    parser.add_argument("--resident", type=int, default=None,
                        help="tile tuning: rows owned by a block's threads (BLOCK_M of fwd/dq)")
    parser.add_argument("--staged", type=int, default=None,
                        help="tile tuning: rows staged in shared memory (BLOCK_N of fwd/dq)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reason = flash.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the GPU benchmark: {reason}")
    if (args.resident is None) != (args.staged is None):
        raise SystemExit("--resident and --staged go together")
    previous_tiles = flash.TILES_OVERRIDE
    if args.resident is not None:
        flash.TILES_OVERRIDE = flash.Tiles(args.resident, args.staged)
    try:
        return run(args, argv)
    finally:
        flash.TILES_OVERRIDE = previous_tiles


def run(args, argv):
    torch = None if args.no_torch else torch_sdpa()
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    print("command: python benchmarks/gpu_flash.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"device: {device_name()}")
    print("tiles (resident, staged): " + ", ".join(
        f"{dt} D={D} {tuple(flash.tile_config(np.dtype(dt), D, D))}" for dt in args.dtype for D in args.d))
    header = (f"{'dtype':8} {'D':>4} {'causal':>6} {'N':>6} {'err':>8} {'fwd ms':>9} {'TFLOP/s':>8} "
              f"{'f+b ms':>9} {'TFLOP/s':>8}" + (f" {'torch32 fwd':>11} {'torch32 f+b':>11}" if torch else ""))
    print(header)
    rows = []
    B, H = args.batch, args.heads
    for dtype in args.dtype:
        for D in args.d:
            for causal in causal_modes:
                err = validate(D, dtype, causal, min(VALIDATE_N, min(args.n)))
                for N in args.n:
                    fwd_ms, fwd_bwd_ms = time_flash(B, H, N, D, dtype, causal, args.repeats)
                    flops = forward_flops(B, H, N, D, causal)
                    row = dict(dtype=dtype, D=D, causal=causal, N=N, max_rel_err=err,
                               fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                               fwd_bwd_ms=fwd_bwd_ms, fwd_bwd_tflops=3.5 * flops / fwd_bwd_ms / 1e9)
                    line = (f"{dtype:8} {D:>4} {str(causal):>6} {N:>6} {err:>8.1e} {fwd_ms:>9.3f} "
                            f"{row['fwd_tflops']:>8.3f} {fwd_bwd_ms:>9.3f} {row['fwd_bwd_tflops']:>8.3f}")
                    if torch is not None:
                        t_fwd, t_fwd_bwd = time_torch(torch, B, H, N, D, causal, args.repeats)
                        row.update(torch_fwd_ms=t_fwd, torch_fwd_bwd_ms=t_fwd_bwd)
                        line += f" {t_fwd:>11.3f} {t_fwd_bwd:>11.3f}"
                    print(line, flush=True)
                    rows.append(row)
    return rows


if __name__ == "__main__":
    main()
