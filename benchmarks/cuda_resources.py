"""What the numba.cuda attention kernels cost in registers, spills, shared memory and shared
loads, read from their compiled code without a GPU.

For every kernel of every rung (rung 1: ``kernels/cuda/flash.py``, one row per thread;
rung 2: ``kernels/cuda/tiled.py``, register micro-tiles), float32 and float64, D = Dv = 64
and 128, for sm_80 and sm_90:

1. numba-cuda's ``cuda.compile_ptx`` (NVVM) gives the PTX; the device functions a kernel
   calls compile for "the current device", which without a GPU is answered by a stand-in
   that names the target;
2. nvJitLink (``cuda.bindings.nvjitlink``, pip ``nvidia-nvjitlink``) runs ptxas with
   ``-Xptxas=-v``: registers per thread and spill stores/loads, and links a cubin;
3. ``nvdisasm`` (pip ``nvidia-cuda-nvdisasm``) disassembles the cubin to SASS; the *hot loop*
   is the innermost loop (a backward branch with no other loop inside) that holds the most
   FMAs (FFMA, or DFMA for float64), and ``ffma_per_shared_load`` is its FMA count over
   its shared-load count (LDS, LDS.64, LDS.128 ... one each).

Shared memory is the sum of the PTX's ``.shared`` declarations (static shared memory). The
table also shows the hot loop's *FMA share*: FMAs over all its instructions, the fraction of
issue slots doing arithmetic (an SM sub-partition issues one warp instruction per clock).
``occupancy`` is the fraction of an SM's 2048 threads the kernel can keep resident, from
its registers, threads per block and shared memory (``occupancy`` below: sm_80 and sm_90
both have 65536 registers, allocated per warp in units of 256, and at most 32 blocks per SM;
shared memory per SM is 164 KiB on sm_80 and 228 KiB on sm_90, 1 KiB of it reserved per block).

Usage (needs ``pip install -e '.[cuda,cuda-dev]'``; no GPU)::

    python benchmarks/cuda_resources.py                    # the table, sm_80 and sm_90
    python benchmarks/cuda_resources.py --json             # records for sm_90 (--cc 80: sm_80)
    python benchmarks/cuda_resources.py --rung 2 --dtype float32 --d 64
    python benchmarks/cuda_resources.py --rung 2 --dtype float32 --d 64 --mods   # with mods

``--mods`` compiles the kernels with the user mods of ``example_mods`` compiled in (a
prefix-LM mask_mod, a relative-position score_mod and its score_mod_grad, float32-clean), as
a call with those keywords gets them (``kernels/cuda/flash.py``, "user mods").

``--json`` prints a list of records with exactly the keys ``kernel``, ``rung``, ``dtype``,
``D``, ``registers``, ``spill_store_bytes``, ``spill_load_bytes``, ``shared_bytes``,
``ffma_per_shared_load`` (null when the hot loop has no shared load: the preprocess kernel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RUNGS = (1, 2)
DTYPES = ("float32", "float64")
HEAD_DIMS = (64, 128)
CCS = ((8, 0), (9, 0))
KEYS = ("kernel", "rung", "dtype", "D", "registers", "spill_store_bytes", "spill_load_bytes",
        "shared_bytes", "ffma_per_shared_load")

# SM limits used by `occupancy` (CUDA occupancy calculator values for these targets)
MAX_THREADS_PER_SM = 2048
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {(8, 0): 164 * 1024, (9, 0): 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024


# -- the tools --------------------------------------------------------------------------------


def nvdisasm_path() -> str | None:
    """nvdisasm from the pip package nvidia-cuda-nvdisasm (or one on PATH)."""
    for cu in ("cu13", "cu12"):
        try:
            import nvidia
        except ImportError:
            break
        for base in getattr(nvidia, "__path__", []):
            candidate = Path(base) / cu / "bin" / "nvdisasm"
            if candidate.is_file():
                return str(candidate)
    for base in sys.path:  # older wheels: nvidia/cuda_nvdisasm/bin
        candidate = Path(base) / "nvidia" / "cuda_nvdisasm" / "bin" / "nvdisasm"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvdisasm")


def missing_reason() -> str | None:
    """None when the offline pipeline can run here, else what is missing."""
    from microattn.kernels.cuda import flash

    reason = flash.ptx_compiler_missing()
    if reason is not None:
        return reason
    try:
        from cuda.bindings import nvjitlink

        nvjitlink.version()
    except Exception as exc:  # noqa: BLE001 - the library missing or not loadable
        return f"nvJitLink is not usable (pip install nvidia-nvjitlink): {exc}"
    if nvdisasm_path() is None:
        return "nvdisasm is not installed (pip install -e '.[cuda-dev]': nvidia-cuda-nvdisasm)"
    return None


@contextmanager
def target(cc):
    """Device functions compile for "the current device": answer ``cc`` without a GPU."""
    from numba.cuda import dispatcher

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


PREFIX = 64  # example_mods: keys every query sees
SLOPE32 = np.float32(0.0625)  # example_mods: the relative bias per position of distance


def prefix_lm(b, h, i, j):
    return (j < PREFIX) | (j <= i)


def relative_bias(score, b, h, i, j):
    return score - SLOPE32 * np.float32(abs(i - j))


def relative_bias_grad(score, b, h, i, j):
    return np.float32(1.0)


def example_mods():
    """(mask_mod, score_mod, score_mod_grad) that ``--mods`` compiles in."""
    return prefix_lm, relative_bias, relative_bias_grad


def kernel_sources(rung: int, dtype: str, D: int, Dv: int, rules, mods=None):
    """({name: python function}, {name: signature}, {name: threads per block},
    {name: launch bounds or None}) of one rung, as its launches compile them. ``mods``:
    ``flash.DeviceMods`` to compile in (None: none)."""
    from microattn.kernels.cuda import flash, tiled

    if rung == 1:
        tiles = flash.Tiles(flash.GPU_RESIDENT, flash.staged_rows(np.dtype(dtype).itemsize, D, Dv))
        functions = flash.kernel_functions(dtype, D, Dv, tiles, True, True, rules=rules,
                                           has_softcap=True, has_alibi=True, mods=mods)  # the most code
        threads = {name: tiles.resident for name in functions}
        return functions, flash.kernel_signatures(dtype), threads, {name: None for name in functions}
    tilings = tiled.gpu_tilings(dtype, D, Dv)
    chunks = tiled.mod_chunks(tilings)
    functions = tiled.kernel_functions(dtype, D, Dv, tilings.main, rules=rules, mods=mods, chunks=chunks)
    functions["_attn_bwd_dkdv"] = tiled.kernel_functions(dtype, D, Dv, tilings.dkdv, rules=rules, mods=mods,
                                                         chunks=chunks)["_attn_bwd_dkdv"]
    threads = {name: tilings.main.threads for name in functions}
    threads["_attn_bwd_dkdv"] = tilings.dkdv.threads
    bounds = {name: tiled.launch_bounds(dtype, tilings.dkdv if name == "_attn_bwd_dkdv" else tilings.main)
              for name in functions}
    return functions, tiled.kernel_signatures(dtype), threads, bounds


def compile_ptx(rung: int, dtype: str, D: int, Dv: int, cc, mods: tuple | None = None) -> tuple[dict, dict]:
    """({kernel: PTX}, {kernel: threads per block}) for one rung, dtype and head dims; ``mods``
    (mask_mod, score_mod, score_mod_grad) plain functions compiled in (None: none)."""
    from numba import cuda

    from microattn.kernels.cuda import flash

    with target(cc):
        rules = flash.device_rules()  # fresh: compiled for this target
        device_mods = None if mods is None else flash.device_mods(*mods)  # fresh too
        functions, signatures, threads, bounds = kernel_sources(rung, dtype, D, Dv, rules, device_mods)
        return {name: cuda.compile_ptx(fn, signatures[name], cc=cc, launch_bounds=bounds[name])[0]
                for name, fn in functions.items()}, threads


def link(ptx: str, cc) -> tuple[str, bytes]:
    """ptxas's verbose report and the cubin, through nvJitLink."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-Xptxas=-v"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError:
            size = nvjitlink.get_error_log_size(handle)
            log = bytearray(size)
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(bytes(log).decode(errors="replace")) from None
        size = nvjitlink.get_info_log_size(handle)
        log = bytearray(size)
        nvjitlink.get_info_log(handle, log)
        size = nvjitlink.get_linked_cubin_size(handle)
        cubin = bytearray(size)
        nvjitlink.get_linked_cubin(handle, cubin)
    finally:
        nvjitlink.destroy(handle)
    return bytes(log).rstrip(b"\0").decode(errors="replace"), bytes(cubin)


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True,
                              check=True).stdout


# -- reading the results ----------------------------------------------------------------------

SHARED_DECLARATION = re.compile(r"^\s*(?:\.visible\s+)?\.shared\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\];",
                                re.MULTILINE)
REGISTERS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*);")
LABEL = re.compile(r"^\s*\.(L_x_\d+):")
BRANCH_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")


def shared_bytes(ptx: str) -> int:
    return sum(int(size) for size in SHARED_DECLARATION.findall(ptx))


def ptxas_figures(log: str) -> dict:
    registers = REGISTERS.search(log)
    spills = SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return {"registers": int(registers.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2))}


def instructions(sass: str) -> tuple[list, dict]:
    """[(address, opcode, operands)] and {label: address of the instruction after it}."""
    listing, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = INSTRUCTION.search(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            listing.append((address, match.group(2), match.group(3)))
    return listing, labels


def loops(sass: str) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a branch back to an earlier label."""
    listing, labels = instructions(sass)
    found = []
    for address, opcode, operands in listing:
        if opcode.startswith("BRA"):
            target_label = BRANCH_TARGET.search(operands)
            if target_label and labels.get(target_label.group(1), address + 1) <= address:
                found.append((labels[target_label.group(1)], address))
    return found


def is_fma(opcode: str) -> bool:
    return opcode.split(".")[0] in ("FFMA", "DFMA")


def is_shared_load(opcode: str) -> bool:
    return opcode.split(".")[0] in ("LDS", "LDSM")


def hot_loop(sass: str) -> dict:
    """FMA and shared-load counts of the hot loop.

    Each loop is judged by its *own* instructions, those inside no loop nested in it, so
    that a tile product NVVM unrolled completely (on sm_80 it does, for some kernels) is
    counted in the loop around it. The hot loop is the tile product: among the loops that read
    shared memory (where a tile product streams its operands from), the one with the most
    shared loads of its own, ties going to the most FMAs; without such loops, the loop with
    the most FMAs. Counting FMAs alone is fooled: rung 1's per-row softmax loop, unrolled,
    can hold more FMAs than its product, and so can float64's p loop in the backward
    (libdevice's exp is a DFMA polynomial, ~100 DFMAs in ~500 instructions a value), and since
    the staging is unrolled into the chunk loop, that loop is no longer half FMAs for float64.
    """
    listing, _ = instructions(sass)
    spans = loops(sass)
    candidates = []
    for first, last in spans:
        nested = [(c, d) for c, d in spans if (c, d) != (first, last) and first <= c and d <= last]
        own = [op for address, op, _ in listing if first <= address <= last
               and not any(c <= address <= d for c, d in nested)]
        fma = sum(map(is_fma, own))
        candidates.append({"fma": fma, "shared_loads": sum(map(is_shared_load, own)),
                           "instructions": len(own), "span": (first, last)})
    reading = [c for c in candidates if c["shared_loads"] and c["fma"]]
    pool = reading or [c for c in candidates if c["fma"]]
    if not pool:
        return {"fma": 0, "shared_loads": 0, "instructions": 0, "span": None}
    best = max(pool, key=lambda c: (c["shared_loads"], c["fma"]) if reading else c["fma"])
    return {key: best[key] for key in ("fma", "shared_loads", "instructions", "span")}


def occupancy(registers: int, threads: int, shared: int, cc) -> float:
    """Resident threads / 2048 on one SM (the limits of the module docstring)."""
    warps = math.ceil(threads / 32)
    registers_per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (registers_per_warp * warps)
    by_threads = MAX_THREADS_PER_SM // threads
    by_shared = SHARED_PER_SM[cc] // (shared + SHARED_RESERVED_PER_BLOCK) if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_registers, by_threads, by_shared, MAX_BLOCKS_PER_SM)
    return blocks * threads / MAX_THREADS_PER_SM


def measure(rung: int, dtype: str, D: int, cc, mods: tuple | None = None) -> list[dict]:
    """One record per kernel (KEYS, plus ``cc``, ``threads``, ``occupancy``, ``fma``, ``shared_loads``)."""
    ptx, threads = compile_ptx(rung, dtype, D, D, cc, mods)
    records = []
    for name, text in ptx.items():
        log, cubin = link(text, cc)
        figures = ptxas_figures(log)
        loop = hot_loop(disassemble(cubin))
        shared = shared_bytes(text)
        ratio = loop["fma"] / loop["shared_loads"] if loop["shared_loads"] else None
        records.append({
            "kernel": name, "rung": rung, "dtype": dtype, "D": D, **figures,
            "shared_bytes": shared,
            "ffma_per_shared_load": None if ratio is None else round(ratio, 3),
            "cc": f"sm_{cc[0]}{cc[1]}", "threads": threads[name],
            "occupancy": occupancy(figures["registers"], threads[name], shared, cc),
            "fma": loop["fma"], "shared_loads": loop["shared_loads"],
            "fma_share": loop["fma"] / loop["instructions"] if loop["instructions"] else None,
        })
    return records


def table(records: list[dict]) -> str:
    header = (f"{'target':7} {'rung':>4} {'kernel':22} {'dtype':8} {'D':>4} {'threads':>7} {'regs':>5} "
              f"{'spill st/ld B':>13} {'smem B':>7} {'occup.':>6} {'hot loop FMA/LDS':>17} {'FMA share':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        ratio = "-" if r["ffma_per_shared_load"] is None else (
            f"{r['fma']}/{r['shared_loads']} = {r['ffma_per_shared_load']:.2f}")
        lines.append(f"{r['cc']:7} {r['rung']:>4} {r['kernel']:22} {r['dtype']:8} {r['D']:>4} "
                     f"{r['threads']:>7} {r['registers']:>5} "
                     f"{r['spill_store_bytes']:>6}/{r['spill_load_bytes']:<6} {r['shared_bytes']:>7} "
                     f"{r['occupancy']:>6.1%} {ratio:>17} "
                     f"{'-' if r['fma_share'] is None else format(r['fma_share'], '.0%'):>9}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="records (KEYS only) for one target")
    parser.add_argument("--cc", type=int, nargs="+", choices=(80, 90), default=None,
                        help="targets (default: 80 90 for the table, 90 for --json)")
    parser.add_argument("--rung", type=int, nargs="+", choices=RUNGS, default=list(RUNGS))
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--d", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--mods", action="store_true", help="compile example_mods in")
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason is not None:
        parser.exit(2, f"cuda_resources: {reason}\n")
    ccs = args.cc or ([90] if args.json else [80, 90])
    if args.json and len(ccs) != 1:
        parser.error("--json reports one target: give one --cc")
    records = [record for cc in ccs for rung in args.rung for dtype in args.dtype for D in args.d
               for record in measure(rung, dtype, D, divmod(cc, 10), example_mods() if args.mods else None)]
    if args.json:
        print(json.dumps([{key: r[key] for key in KEYS} for r in records], indent=1))
    else:
        print(table(records))
    return records


if __name__ == "__main__":
    main()
