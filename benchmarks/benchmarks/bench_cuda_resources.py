"""What each numba.cuda attention kernel costs, read from its compiled code: no GPU needed.

One class, ``CudaKernelResources``, over every kernel of both rungs of the CUDA ladder
(rung 1: ``kernels/cuda/flash.py``, a row per thread; rung 2: ``kernels/cuda/tiled.py``,
register micro-tiles), float32 and float64, head dims 64 and 128, compiled for sm_90 (H100)
by ``benchmarks/cuda_resources.py`` (numba-cuda -> PTX, nvJitLink's ptxas -> cubin,
nvdisasm -> SASS). The figures are deterministic for a given toolchain, so the dashboard shows
a register or spill regression the day it lands:

* ``track_registers``            registers per thread;
* ``track_spill_store_bytes``    bytes spilled to local memory (stores), per thread;
* ``track_spill_load_bytes``     bytes read back from the spills, per thread;
* ``track_shared_bytes``         static shared memory per block;
* ``track_ffma_per_shared_load`` FMA instructions per shared-memory load instruction in the
                                 hot loop (the tile product);
* ``track_occupancy_percent``    resident threads per SM as a percentage of 2048.

Rung 2's float32 targets (issue 13): 0 spill bytes, >= 4 FMA per shared load, >= 25%
occupancy (tests/kernels/test_cuda_resources.py holds them). All compiling happens once, in
``setup_cache`` (about a minute); ``setup`` skips (NotImplementedError) every combination when
numba-cuda's compiler, nvJitLink or nvdisasm is missing (``pip install -e '.[cuda,cuda-dev]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TOOL = Path(__file__).resolve().parents[1] / "cuda_resources.py"
CC = (9, 0)
# The preprocess kernel (delta = rowsum(out * dout), a few registers) is left out: its loop
# loads nothing from shared memory, so it has no FMA-per-shared-load figure.
KERNELS = ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("cuda_resources", _TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class CudaKernelResources:
    """Registers, spills, shared memory, FMA per shared load and occupancy per kernel (sm_90)."""

    params = [[1, 2], KERNELS, ["float32", "float64"], [64, 128]]
    param_names = ["rung", "kernel", "dtype", "D"]
    timeout = 900.0  # setup_cache compiles 32 kernels (the preprocess kernels with the rest)

    def setup_cache(self):
        """{(rung, kernel, dtype, D): record}, or a string saying which tool is missing."""
        tool = _load_tool()
        reason = tool.missing_reason()
        if reason is not None:
            return reason
        records = {}
        for rung in self.params[0]:
            for dtype in self.params[2]:
                for D in self.params[3]:
                    for record in tool.measure(rung, dtype, D, CC):
                        records[rung, record["kernel"], dtype, D] = record
        return records

    def setup(self, cache, rung, kernel, dtype, D):
        if isinstance(cache, str):
            raise NotImplementedError(f"cannot compile offline here: {cache}")
        self.record = cache[rung, kernel, dtype, D]

    def track_registers(self, cache, *params):
        return float(self.record["registers"])

    track_registers.unit = "registers/thread"

    def track_spill_store_bytes(self, cache, *params):
        return float(self.record["spill_store_bytes"])

    track_spill_store_bytes.unit = "bytes/thread"

    def track_spill_load_bytes(self, cache, *params):
        return float(self.record["spill_load_bytes"])

    track_spill_load_bytes.unit = "bytes/thread"

    def track_shared_bytes(self, cache, *params):
        return float(self.record["shared_bytes"])

    track_shared_bytes.unit = "bytes/block"

    def track_ffma_per_shared_load(self, cache, *params):
        return float(self.record["ffma_per_shared_load"])

    track_ffma_per_shared_load.unit = "FMA/LDS"

    def track_occupancy_percent(self, cache, *params):
        return 100.0 * self.record["occupancy"]

    track_occupancy_percent.unit = "%"
