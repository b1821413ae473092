"""GPU benchmark of the numba.cuda flash attention kernels (microattn.kernels.cuda.flash).

Validate, then time (as llm.c's harness does): each (dtype, D, causal) configuration is first
checked against the NumPy reference in float64 on a small problem (the same inputs, rounded
to the dtype), then forward and forward+backward are timed on (B, H, N, D) inputs that stay
on the device, with ``cuda.synchronize()`` around each timed call; the best of ``--repeats``
runs is kept. With ``--torch``, torch's ``scaled_dot_product_attention`` in float32 runs
beside it twice, with TF32 off and on (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32``), each validated on the same small problem.

The kernels follow the stats protocol (kernels/protocol.py): ``forward`` returns
``(out, stats)``, stats (2, B, H, N) = (m, l), and ``backward`` takes those stats.

FLOP counts (the convention of the flash-attention papers, Nq = Nk = N, D = Dv):
forward 4 * B * H * N^2 * D (half of it when causal); backward 2.5x forward, so
forward+backward = 3.5x forward.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_flash.py                       # N 1024..8192, D 64/128, H 16, B 4, float32
    python benchmarks/gpu_flash.py --n 4096 --d 128 --dtype float32 float64 --torch
    python benchmarks/gpu_flash.py --n 4096 --d 64 --resident 128 --staged 32   # try other tiles
    python benchmarks/gpu_flash.py --n 2048 --json results.json

Under ``NUMBA_ENABLE_CUDASIM=1`` it runs (very slowly; timings mean nothing), which the test
suite does at N = 16. ``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import json
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


def validation_problem(D, dtype, causal, n):
    """q, k, v, dout (1, 2, n, D) in ``dtype``, and the float64 reference's out, dq, dk, dv on
    those same (rounded) inputs: the truth every implementation is measured against."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, n, D)).astype(dtype) for _ in range(4))
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    spec64 = make_spec(1, 2, n, D, np.float64, causal)
    out, stats = reference.forward(q64, k64, v64, spec64)
    truth = (out,) + tuple(reference.backward(q64, k64, v64, out, stats, do64, spec64))
    return (q, k, v, dout), truth


def max_rel_err(got, truth) -> float:
    """max over out, dq, dk, dv of max |got - truth| / max |truth|."""
    return float(max(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
                     for a, b in zip(got, truth)))


def validate(D, dtype, causal, n):
    """Max relative error of out and dq/dk/dv against the float64 reference on (1, 2, n, D)."""
    (q, k, v, dout), truth = validation_problem(D, dtype, causal, n)
    spec = make_spec(1, 2, n, D, dtype, causal)
    out, stats = flash.forward(q, k, v, spec)
    grads = flash.backward(q, k, v, out, stats, dout, spec)
    return max_rel_err((out,) + tuple(grads), truth)


def time_call(fn, repeats, synchronize):
    """Best wall time of ``fn()`` in ms, synchronising the device before and after."""
    best = np.inf
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def time_flash(B, H, N, D, dtype, causal, repeats):
    rng = np.random.default_rng(0)
    q, k, v, dout = (flash.to_device(rng.standard_normal((B, H, N, D)).astype(dtype))
                     for _ in range(4))  # (B, H, N, D) each, on the device
    spec = make_spec(B, H, N, D, dtype, causal)
    out, stats = flash.forward(q, k, v, spec)  # compiles on first use
    flash.backward(q, k, v, out, stats, dout, spec)
    sync = flash.cuda.synchronize
    fwd_ms = time_call(lambda: flash.forward(q, k, v, spec), repeats, sync)

    def fwd_bwd():
        o, s = flash.forward(q, k, v, spec)
        flash.backward(q, k, v, o, s, dout, spec)

    return fwd_ms, time_call(fwd_bwd, repeats, sync)


# -- torch SDPA (float32), TF32 off and on ----------------------------------------------------


def import_torch_cuda():
    """torch, if it imports and sees a CUDA device; else (None, why not)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device (a CPU-only build, or no GPU)"
    return torch, None


class tf32_mode:
    """Context manager: torch's TF32 switches for matmuls and cuDNN set to ``enabled``."""

    def __init__(self, torch, enabled: bool):
        self.torch, self.enabled = torch, enabled

    def __enter__(self):
        b = self.torch.backends
        self.previous = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        b = self.torch.backends
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = self.previous


def torch_validate(torch, D, causal, n, tf32):
    """Max relative error of torch SDPA float32 (out, dq, dk, dv) against the float64 reference."""
    (q, k, v, dout), truth = validation_problem(D, np.float32, causal, n)
    q, k, v = (torch.tensor(x, device="cuda", requires_grad=True) for x in (q, k, v))
    with tf32_mode(torch, tf32):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(torch.tensor(dout, device="cuda"))
    got = [x.detach().cpu().numpy() for x in (out, q.grad, k.grad, v.grad)]
    return max_rel_err(got, truth)


def time_torch(torch, B, H, N, D, causal, repeats, tf32):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(B, H, N, D, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda")
    sync = torch.cuda.synchronize

    def fwd():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=causal)

    def fwd_bwd():
        sdpa(q, k, v, is_causal=causal).backward(dout)

    with tf32_mode(torch, tf32):
        fwd(), fwd_bwd()  # warm up (kernel selection, allocator)
        return time_call(fwd, repeats, sync), time_call(fwd_bwd, repeats, sync)


# -- what each kernel uses -------------------------------------------------------------------


def kernel_resources(dtype, D, Dv) -> dict:
    """{kernel: (registers per thread, static shared bytes, local bytes per thread)} of the
    specialisation without bias and dropout, compiled by one small launch. Local memory is
    where a thread's arrays go when they do not fit in registers (spills)."""
    tiles = flash.tile_config(np.dtype(dtype), D, Dv)
    n = tiles.resident
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 1, n, D)).astype(dtype) for _ in range(2))
    v, dout = (rng.standard_normal((1, 1, n, Dv)).astype(dtype) for _ in range(2))
    spec = make_attention_spec(q.shape, k.shape, v.shape, (np.dtype(dtype),) * 3)
    out, stats = flash.forward(q, k, v, spec)
    flash.backward(q, k, v, out, stats, dout, spec)
    kernels = flash._kernels(np.dtype(dtype).name, D, Dv, tiles, False, False)

    def one(figures):  # a dict keyed by signature when the dispatcher is not specialised
        return max(figures.values()) if isinstance(figures, dict) else figures

    return {name: (one(kern.get_regs_per_thread()), one(kern.get_shared_mem_per_block()),
                   one(kern.get_local_mem_per_thread())) for name, kern in kernels.items()}


def print_resources(args):
    print("resources per kernel (no bias, no dropout): registers/thread, shared bytes/block, "
          "local (spill) bytes/thread")
    for dtype in args.dtype:
        for D in args.d:
            tiles = flash.tile_config(np.dtype(dtype), D, D)
            for name, (regs, shared, local) in kernel_resources(dtype, D, D).items():
                print(f"  {dtype:8} D=Dv={D:<4} tiles {tuple(tiles)}  {name:22} regs {regs:4}  "
                      f"shared {shared:6}  local {local:5}")


# -- the run ------------------------------------------------------------------------------------


def device_name() -> str:
    if flash.simulated():
        return "numba CUDA simulator (timings mean nothing)"
    name = flash.cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Validates each configuration against the float64 NumPy reference, then times it.")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="sequence lengths N (Nq = Nk); default 1024 2048 4096 8192")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128],
                        help="head dims D (= Dv); default 64 128")
    parser.add_argument("--heads", "-H", type=int, default=16, help="heads H (default 16)")
    parser.add_argument("--batch", "-B", type=int, default=4, help="batch B (default 4)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"],
                        help="dtypes of the numba kernels (default float32)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    parser.add_argument("--torch", action="store_true",
                        help="also time torch SDPA in float32, TF32 off and on (needs torch with CUDA)")
    parser.add_argument("--resident", type=int, default=None,
                        help="tile tuning: rows owned by a block's threads (BLOCK_M of fwd/dq)")
    parser.add_argument("--staged", type=int, default=None,
                        help="tile tuning: rows staged in shared memory (BLOCK_N of fwd/dq)")
    parser.add_argument("--resources", action="store_true",
                        help="print each kernel's registers, shared and local memory (a GPU only)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the rows (one dict per configuration) to PATH")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reason = flash.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the GPU benchmark: {reason}")
    if (args.resident is None) != (args.staged is None):
        raise SystemExit("--resident and --staged go together")
    torch = None
    if args.torch:
        torch, why = import_torch_cuda()
        if torch is None:
            raise SystemExit(f"--torch: {why}")
    previous_tiles = flash.TILES_OVERRIDE
    if args.resident is not None:
        flash.TILES_OVERRIDE = flash.Tiles(args.resident, args.staged)
    try:
        if args.resources and not flash.simulated():
            print_resources(args)
        rows = run(args, argv, torch)
    finally:
        flash.TILES_OVERRIDE = previous_tiles
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def run(args, argv, torch):
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    print("command: python benchmarks/gpu_flash.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"device: {device_name()}")
    if torch is not None:
        print(f"torch {torch.__version__}, SDPA in float32 (tf32 off | tf32 on)")
    print("tiles (resident, staged): " + ", ".join(
        f"{dt} D={D} {tuple(flash.tile_config(np.dtype(dt), D, D))}" for dt in args.dtype for D in args.d))
    print(f"B={args.batch} H={args.heads}; err = max relative error of out, dq, dk, dv against the "
          f"float64 reference at N={min(VALIDATE_N, min(args.n))}; best of {args.repeats} runs")
    header = (f"{'dtype':8} {'D':>4} {'causal':>6} {'N':>6} {'err':>8} {'fwd ms':>9} {'TFLOP/s':>8} "
              f"{'f+b ms':>9} {'TFLOP/s':>8}")
    if torch is not None:
        header += "".join(f" | {'torch ' + mode + ' err':>15} {'fwd ms':>8} {'f+b ms':>8} {'TFLOP/s':>8}"
                          for mode in ("tf32off", "tf32on"))
    print(header)
    rows = []
    B, H = args.batch, args.heads
    n_check = min(VALIDATE_N, min(args.n))
    for dtype in args.dtype:
        for D in args.d:
            for causal in causal_modes:
                err = validate(D, dtype, causal, n_check)
                torch_errs = {}
                if torch is not None:
                    torch_errs = {tf32: torch_validate(torch, D, causal, n_check, tf32)
                                  for tf32 in (False, True)}
                for N in args.n:
                    fwd_ms, fwd_bwd_ms = time_flash(B, H, N, D, dtype, causal, args.repeats)
                    flops = forward_flops(B, H, N, D, causal)
                    row = dict(dtype=dtype, D=D, causal=causal, N=N, B=B, H=H, max_rel_err=err,
                               fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                               fwd_bwd_ms=fwd_bwd_ms, fwd_bwd_tflops=3.5 * flops / fwd_bwd_ms / 1e9)
                    line = (f"{dtype:8} {D:>4} {str(causal):>6} {N:>6} {err:>8.1e} {fwd_ms:>9.3f} "
                            f"{row['fwd_tflops']:>8.3f} {fwd_bwd_ms:>9.3f} {row['fwd_bwd_tflops']:>8.3f}")
                    for tf32, t_err in torch_errs.items():
                        t_fwd, t_fwd_bwd = time_torch(torch, B, H, N, D, causal, args.repeats, tf32)
                        key = "torch_tf32" if tf32 else "torch_fp32"
                        row.update({f"{key}_err": t_err, f"{key}_fwd_ms": t_fwd,
                                    f"{key}_fwd_bwd_ms": t_fwd_bwd,
                                    f"{key}_fwd_bwd_tflops": 3.5 * flops / t_fwd_bwd / 1e9})
                        line += (f" | {t_err:>15.1e} {t_fwd:>8.3f} {t_fwd_bwd:>8.3f} "
                                 f"{row[f'{key}_fwd_bwd_tflops']:>8.3f}")
                    print(line, flush=True)
                    rows.append(row)
    return rows


if __name__ == "__main__":
    main()
