"""GPU benchmark of rung 2 of the numba.cuda attention ladder (``kernels/cuda/tiled.py``),
beside rung 1 (``kernels/cuda/flash.py``) and torch SDPA float32 (TF32 off and on).

Validate, then time (llm.c's harness): each (dtype, D, causal) is first checked against the
float64 NumPy reference on a small problem, then forward and forward+backward are timed on
(B, H, N, D) inputs that stay on the device, with a device synchronisation around each
timed call (best of ``--repeats``). One line per configuration is printed as soon as it is
measured (flushed), so a run cut short by a time limit keeps what it measured; ``--budget-s``
skips what would start after that many seconds.

FLOP counts (the flash-attention papers' convention, Nq = Nk = N, D = Dv): forward
4 * B * H * N^2 * D (half when causal); backward 2.5x forward, so forward+backward = 3.5x.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/gpu_tiled.py                                  # N 1024..16384, D 64/128, H 16, B 4
    python benchmarks/gpu_tiled.py --n 4096 --d 128 --dtype float32 --rung1 --torch
    python benchmarks/gpu_tiled.py --n 4096 --d 64 --tiling 128,64,16,16,16   # other tiles
    python benchmarks/gpu_tiled.py --n 4096 --d 128 --dkdv-tiling 64,64,16,16,16
    python benchmarks/gpu_tiled.py --n 4096 --d 64 --min-resident-threads 256   # <= 255 registers

``--tiling rows,cols,threads_rows,threads_cols,chunk`` sets ``tiled.TILING_OVERRIDE`` for every
kernel (``--dkdv-tiling`` the dK/dV kernel's apart); the default tiles are put back at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from microattn.kernels.cuda import flash, tiled  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_flash import (  # noqa: E402  (rung 1's script: the shared timing and validation)
    forward_flops, import_torch_cuda, make_spec, max_rel_err, time_call, validation_problem,
)


def max_err(module, D, dtype, causal, n) -> float:
    """max over out, dq, dk, dv of max |got - truth| / max |truth|, truth in float64."""
    (q, k, v, dout), truth = validation_problem(D, dtype, causal, n)
    spec = make_spec(1, 2, n, D, dtype, causal)
    out, stats = module.forward(q, k, v, spec)
    got = (module.to_host(out),) + tuple(module.to_host(g) for g in module.backward(q, k, v, out, stats, dout, spec))
    return max_rel_err(got, truth)


def time_module(module, B, H, N, D, dtype, causal, repeats):
    rng = np.random.default_rng(0)
    q, k, v, dout = (module.to_device(rng.standard_normal((B, H, N, D)).astype(dtype)) for _ in range(4))
    spec = make_spec(B, H, N, D, dtype, causal)
    out, stats = module.forward(q, k, v, spec)  # compiles on first use
    module.backward(q, k, v, out, stats, dout, spec)
    sync = tiled.cuda.synchronize
    fwd_ms = time_call(lambda: module.forward(q, k, v, spec), repeats, sync)

    def fwd_bwd():
        o, s = module.forward(q, k, v, spec)
        module.backward(q, k, v, o, s, dout, spec)

    return fwd_ms, time_call(fwd_bwd, repeats, sync)


def time_torch(torch, B, H, N, D, causal, repeats, tf32):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    b = torch.backends
    previous = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = tf32
    try:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, N, D, device="cuda")

        def fwd():
            with torch.no_grad():
                sdpa(q, k, v, is_causal=causal)

        def fwd_bwd():
            sdpa(q, k, v, is_causal=causal).backward(dout)

        fwd(), fwd_bwd()
        return time_call(fwd, repeats, torch.cuda.synchronize), time_call(fwd_bwd, repeats, torch.cuda.synchronize)
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = previous


def print_resources(dtype, D, tiles):
    """Registers, static shared and local (spill) bytes of the kernels as compiled on this
    device: the figures benchmarks/cuda_resources.py predicts offline."""
    # the launches' own kernels: the same arguments as tiled._prepare passes (lru_cache keys
    # on the arguments as written, so leaving the default out would compile a second set)
    kernels = tiled._kernels(np.dtype(dtype).name, D, D, tiles, tiled.NO_MODS)

    def one(figures):  # keyed by signature when the dispatcher is not specialised
        if isinstance(figures, dict):
            return max(figures.values()) if figures else "(not compiled)"
        return figures

    for name, kernel in kernels.items():
        print(f"# resources {dtype} D={D} {name}: {one(kernel.get_regs_per_thread())} registers, "
              f"{one(kernel.get_shared_mem_per_block())} shared B, "
              f"{one(kernel.get_local_mem_per_thread())} local B/thread", flush=True)


def parse_tiling(text):
    return None if text is None else tiled.Tiling(*(int(x) for x in text.split(",")))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validate-n", type=int, default=200)
    parser.add_argument("--tiling", help="rows,cols,threads_rows,threads_cols,chunk (every kernel)")
    parser.add_argument("--dkdv-tiling", help="the same for the dK/dV kernel alone")
    parser.add_argument("--min-resident-threads", type=int, default=None,
                        help="float32 launch bounds: threads per SM ptxas must fit (tiled.MIN_RESIDENT_THREADS)")
    parser.add_argument("--rung1", action="store_true", help="time rung 1 (flash.py) too")
    parser.add_argument("--no-torch", action="store_true", help="skip torch SDPA")
    parser.add_argument("--budget-s", type=float, default=None, help="start nothing after this")
    args = parser.parse_args(argv)

    reason = tiled.unavailable_reason()
    if reason is not None:
        parser.exit(2, f"gpu_tiled: {reason}\n")
    torch, why = (None, "--no-torch") if args.no_torch else import_torch_cuda()
    main_tiling, dkdv_tiling = parse_tiling(args.tiling), parse_tiling(args.dkdv_tiling)
    if args.min_resident_threads is not None:  # before anything is compiled
        tiled.MIN_RESIDENT_THREADS = args.min_resident_threads
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    start = time.perf_counter()
    device = "simulator" if tiled.simulated() else tiled.cuda.get_current_device().name
    device = device.decode() if isinstance(device, bytes) else device
    print(f"# device: {device}; "
          f"B={args.batch} H={args.heads}; torch: {why or 'float32 SDPA, TF32 off / on'}", flush=True)
    print("# rung dtype D N causal | tiles | err | fwd ms TFLOP/s | fwd+bwd ms TFLOP/s", flush=True)
    rows = []
    saved = tiled.TILING_OVERRIDE
    try:
        for dtype in args.dtype:
            for causal in causals:  # non-causal first: the headline figures
                for D in args.d:
                    tiled.TILING_OVERRIDE = saved
                    if main_tiling or dkdv_tiling:
                        defaults = tiled.tiling_for(dtype, D, D)
                        tiled.TILING_OVERRIDE = tiled.Tilings(main_tiling or defaults.main,
                                                              dkdv_tiling or main_tiling or defaults.dkdv)
                    tiles = tiled.tiling_for(dtype, D, D)
                    modules = [("2", tiled)] + ([("1", flash)] if args.rung1 else [])
                    errors = {name: max_err(m, D, dtype, causal, args.validate_n) for name, m in modules}
                    if not tiled.simulated() and causal == causals[0]:
                        print_resources(dtype, D, tiles)
                    for N in args.n:
                        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                            print(f"# budget of {args.budget_s} s spent: stopping", flush=True)
                            return rows
                        flops = forward_flops(args.batch, args.heads, N, D, causal)
                        for name, module in modules:
                            fwd_ms, fwd_bwd_ms = time_module(module, args.batch, args.heads, N, D, dtype,
                                                             causal, args.repeats)
                            row = {"rung": name, "dtype": dtype, "D": D, "N": N, "causal": causal,
                                   "tiles": tuple(tiles), "max_err": errors[name],
                                   "fwd_ms": fwd_ms, "fwd_tflops": flops / fwd_ms / 1e9,
                                   "fwd_bwd_ms": fwd_bwd_ms, "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9}
                            rows.append(row)
                            shown = f"{tuple(tiles.main)}/{tuple(tiles.dkdv)}" if name == "2" else "rung 1's"
                            print(f"rung{name} {dtype} D={D} N={N} causal={causal} | "
                                  f"{shown} | {row['max_err']:.1e} | "
                                  f"{fwd_ms:.2f} {row['fwd_tflops']:.1f} | {fwd_bwd_ms:.2f} "
                                  f"{row['fwd_bwd_tflops']:.1f}", flush=True)
                        if torch is not None and dtype == "float32":
                            for tf32 in (False, True):
                                fwd_ms, fwd_bwd_ms = time_torch(torch, args.batch, args.heads, N, D, causal,
                                                                args.repeats, tf32)
                                print(f"torch-sdpa float32{' TF32' if tf32 else ''} D={D} N={N} causal={causal} | "
                                      f"- | - | {fwd_ms:.2f} {flops / fwd_ms / 1e9:.1f} | {fwd_bwd_ms:.2f} "
                                      f"{3.5 * flops / fwd_bwd_ms / 1e9:.1f}", flush=True)
    finally:
        tiled.TILING_OVERRIDE = saved
    return rows


if __name__ == "__main__":
    main()
