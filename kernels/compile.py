"""The one place that compiles ``masking.py`` for a target: CPU (``numba.njit``) or GPU
(``numba.cuda.jit(device=True)``).

``masking.keep`` calls ``dropout_bits``, which calls ``mix32``: plain Python globals that
compiled code cannot call. So each callee defined in the same module is compiled first
(once), and a function is compiled from a copy of itself whose globals name the compiled
callees. The code object is the same: the rules are compiled as written, never rewritten.

    >>> import numba
    >>> from microattn.kernels import compile, masking
    >>> rules = compile.compile_rules(numba.njit)
    >>> bool(rules.in_band((0, 2, 0), 4, 3))
    True
"""

from __future__ import annotations

import dis
import types

from . import masking

RULES = ("in_band", "key_range", "query_range", "tile_in_band", "has_bias", "bias_index",
         "keep", "has_dropout", "row_shift", "has_softcap", "cap", "cap_and_slope", "has_alibi",
         "alibi_bias", "tile_class")


def _global_names(fn) -> set:
    """The global names ``fn`` reads (not attribute names: ``np.tanh`` reads ``np`` only)."""
    return {ins.argval for ins in dis.get_instructions(fn) if ins.opname == "LOAD_GLOBAL"}


def compile_function(fn, jit, compiled: dict):
    """``jit(fn)``, after compiling (with ``jit``) the functions of fn's module it calls."""
    if fn in compiled:
        return compiled[fn]
    callees = {}
    for name in _global_names(fn):
        callee = fn.__globals__.get(name)
        if isinstance(callee, types.FunctionType) and callee.__module__ == fn.__module__:
            callees[name] = compile_function(callee, jit, compiled)
    rebound = types.FunctionType(fn.__code__, {**fn.__globals__, **callees}, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    rebound.__doc__ = fn.__doc__
    compiled[fn] = jit(rebound)
    return compiled[fn]


def compile_rules(jit, replace=None) -> types.SimpleNamespace:
    """Every rule of ``masking.py`` (``RULES``) compiled with ``jit``, as a namespace.

    ``replace``: {masking function: its implementation for this target}, used wherever a
    rule calls that function: the same meaning, a faster body (the CPU kernels' float32
    ``tanh``). Its entries are used as given (already compiled, or numba overloads).
    """
    compiled: dict = dict(replace or {})
    return types.SimpleNamespace(**{name: compile_function(getattr(masking, name), jit, compiled)
                                    for name in RULES})
