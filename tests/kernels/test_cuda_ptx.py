"""Host-side checks of the numba.cuda kernels: PTX for sm_80 / sm_90, no GPU needed.

Runs in the main pytest process (NOT under the simulator, which has no compiler). Needs the
numba-cuda package with its NVVM/NVRTC (``pip install 'numba-cuda[cu13]'``, the ``cuda`` extra
of microattn); skipped only when that compiler is missing (a failure under CI=true, which
installs the extra: see tests/conftest.py).

* every kernel compiles for compute capability 8.0 and 9.0 at the largest head dims the
  tiles are sized for (D = Dv = 128), with a bias, dropout, softcap and ALiBi (the most code);
* float32 kernels contain no float64 instruction (no stray double constant or promotion);
* the shared memory each kernel declares is what ``flash.shared_memory_bytes`` says and fits
  the 48 KiB static budget;
* the records of ``spec.pack()`` (band: ``UniTuple(int64, 3)``, dropout: ``(int64, 6)``;
  reals: ``UniTuple(dtype, 3)``; bias and alibi arrays) and the int8 block mask of a mask_mod
  are kernel arguments, and no kernel takes more than 14;
* a specialisation without bias, dropout, softcap or ALiBi compiles no dropout hash and no
  tanh.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from microattn.kernels.cuda import flash
from microattn.kernels.spec import make_attention_spec

CCS = [(8, 0), (9, 0)]
DTYPES = ["float32", "float64"]
D = DV = 128


MISSING = flash.ptx_compiler_missing()
needs_compiler = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def compile_kernels(dtype_name, cc, D, Dv, has_bias, has_dropout, has_terms=None):
    """{kernel name: PTX} for one specialisation, compiled for ``cc`` with no GPU present.

    ``cuda.compile_ptx`` takes the target from ``cc``, but a kernel's calls to
    ``cuda.jit(device=True)`` functions (the masking rules, ``compile.compile_rules``) compile
    those for "the current device", which needs a GPU. So the rules are compiled fresh here,
    while that lookup answers ``cc``. ``has_terms``: softcap and ALiBi compiled in (default:
    with the bias).
    """
    from numba.cuda import dispatcher

    tiles = flash.Tiles(flash.GPU_RESIDENT, flash.staged_rows(np.dtype(dtype_name).itemsize, D, Dv))
    signatures = flash.kernel_signatures(dtype_name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatcher, "get_current_device",
                      lambda: SimpleNamespace(compute_capability=cc))
        rules = flash.device_rules()
        terms = has_bias if has_terms is None else has_terms
        functions = flash.kernel_functions(dtype_name, D, Dv, tiles, has_bias, has_dropout, rules,
                                           has_softcap=terms, has_alibi=terms)
        return {name: flash.cuda.compile_ptx(fn, signatures[name], cc=cc)[0]
                for name, fn in functions.items()}, tiles


@pytest.fixture(scope="module")
def ptx():
    """{(dtype, cc): ({kernel: PTX}, tiles)} at D = Dv = 128 with bias, dropout, softcap and
    ALiBi compiled in."""
    return {(dtype, cc): compile_kernels(dtype, cc, D, DV, True, True)
            for dtype in DTYPES for cc in CCS}


F64_INSTRUCTION = re.compile(r"^\s*(?:@%p\d+\s+)?[a-z]+(?:\.[a-z0-9]+)*\.f64\b.*$", re.MULTILINE)
SHARED_DECLARATION = re.compile(r"^\s*(?:\.visible\s+)?\.shared\s+\.align\s+\d+\s+\.b8\s+(\w+)\[(\d+)\];",
                                re.MULTILINE)


def shared_bytes(ptx_text: str) -> int:
    return sum(int(size) for _, size in SHARED_DECLARATION.findall(ptx_text))


@needs_compiler
@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_compiles(ptx, dtype, cc):
    kernels, _ = ptx[dtype, cc]
    assert set(kernels) == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    for name, text in kernels.items():
        assert f".target sm_{cc[0]}{cc[1]}" in text, name
        assert ".entry" in text, name


@needs_compiler
@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_float32_kernels_have_no_float64_instruction(ptx, cc):
    kernels, _ = ptx["float32", cc]
    for name, text in kernels.items():
        found = F64_INSTRUCTION.findall(text)
        assert not found, f"{name} has float64 instructions, e.g. {found[:3]}"
    # the pattern does find them where they belong
    assert F64_INSTRUCTION.search(ptx["float64", cc][0]["_attn_fwd"])


@needs_compiler
@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_memory_fits_the_budget(ptx, dtype, cc):
    kernels, tiles = ptx[dtype, cc]
    expected = flash.shared_memory_bytes(dtype, D, DV, tiles)
    for name, text in kernels.items():
        assert shared_bytes(text) == expected[name], name
        assert shared_bytes(text) <= flash.SHARED_MEMORY_BUDGET, name
    assert max(expected.values()) > flash.SHARED_MEMORY_BUDGET // 2  # the tiles use the room


MIX32_MULTIPLIER = str(0x7FEB352D)  # masking.mix32's first constant, an immediate in the PTX


# masking.tanh as numba mangles it ("...7masking4tanh..."): the symbol of its environment,
# declared by every kernel that calls it (libdevice's tanhf itself is inlined, nameless)
TANH = re.compile(r"\dmasking4tanh")


@needs_compiler
def test_specialisation_without_bias_or_dropout(ptx):
    """A smaller variant compiles too, float64-free, with no dropout hash compiled in."""
    kernels, _ = compile_kernels("float32", (8, 0), 64, 32, False, False)
    for name, text in kernels.items():
        assert not F64_INSTRUCTION.findall(text), name
        assert MIX32_MULTIPLIER not in text, name
    assert MIX32_MULTIPLIER in ptx["float32", (8, 0)][0]["_attn_fwd"]


@needs_compiler
def test_softcap_compiles_only_where_asked(ptx):
    """softcap's tanh is in the PTX of the specialisation that has it, and of no other."""
    with_terms = ptx["float32", (8, 0)][0]
    without, _ = compile_kernels("float32", (8, 0), 64, 32, True, True, has_terms=False)
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert TANH.search(with_terms[name]), name
        assert not TANH.search(without[name]), name


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_take_the_packed_spec(dtype):
    """Each attention kernel's signature (the one the PTX is compiled with) takes the records
    of spec.pack() and the block mask last, as numba types Python tuples; no kernel takes more
    than 14 arguments (8 arrays, the 5 records and the block mask)."""
    from numba import typeof, types
    from numba.cuda.core import sigutils

    band, dropout = types.UniTuple(types.int64, 3), types.UniTuple(types.int64, 6)
    reals = types.UniTuple(getattr(types, dtype), 3)
    shape = (1, 2, 5, 8)
    packed = make_attention_spec(shape, shape, shape, (np.dtype(dtype),) * 3, is_causal=True,
                                 dropout_p=0.5, seed=2**64 - 1, softcap=30.0,
                                 alibi_slopes=np.ones(2)).pack()  # the largest seed halves
    assert tuple(typeof(x) for x in packed[1:4]) == (band, dropout, reals)  # what a launch passes
    for name, signature in flash.kernel_signatures(dtype).items():
        arguments, _ = sigutils.normalize_signature(signature)
        assert len(arguments) <= 14, name
        if name != "_attn_bwd_preprocess":
            bias, alibi, blocks = arguments[-6], arguments[-2], arguments[-1]
            assert (bias.ndim, bias.dtype) == (4, getattr(types, dtype)), name
            assert (alibi.ndim, alibi.dtype) == (2, getattr(types, dtype)), name
            assert (blocks.ndim, blocks.dtype) == (4, types.int8), name
            assert tuple(arguments[-5:-2]) == (band, dropout, reals), name


# -- host-side arithmetic (no compiler needed) ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tiles_fit_the_shared_memory_budget(dtype):
    for D_, Dv_ in ((8, 8), (64, 64), (128, 128), (128, 32), (256, 256)):
        rows = flash.staged_rows(np.dtype(dtype).itemsize, D_, Dv_)
        used = flash.shared_memory_bytes(dtype, D_, Dv_, flash.Tiles(flash.GPU_RESIDENT, rows))
        assert max(used.values()) <= flash.SHARED_MEMORY_BUDGET
        doubled = 2 * rows * (D_ + Dv_ + flash.ROW_VECTORS) * np.dtype(dtype).itemsize
        assert rows == flash.GPU_MAX_STAGED or doubled > flash.SHARED_MEMORY_BUDGET


def test_unavailable_reason_tells_the_truth(monkeypatch):
    """None exactly when numba.cuda can run kernels here (a GPU or the simulator); otherwise
    the reason names what is missing: the numba-cuda package, or a usable GPU."""
    reason = flash.unavailable_reason()
    runnable = flash.cuda is not None and flash.cuda.is_available()
    assert (reason is None) == runnable, reason
    if flash.cuda is not None:
        monkeypatch.setattr(flash.cuda, "is_available", lambda: False)
        assert "no CUDA GPU is usable" in flash.unavailable_reason()
        monkeypatch.setattr(flash.cuda, "is_available", lambda: True)
        assert flash.unavailable_reason() is None
    monkeypatch.setattr(flash, "cuda", None)
    assert "numba-cuda is not installed" in flash.unavailable_reason()
