"""What every kernel module provides: the one protocol behind every attention backend.

Softmax attention (``reference``, ``cpu.flash``, ``cpu.ladder``'s rungs, ``cpu.decode``,
``cuda.flash``, ``cuda.tiled``)::

    forward(q, k, v, spec)                                 -> (out, stats)
    backward(q, k, v, out, stats, dout, spec, dlse=None)   -> (dq, dk, dv)

Linear attention (``linear_reference``, ``cpu.linear``), the same shape without stats::

    forward(q, k, v, spec)                        -> out
    backward(q, k, v, out, dout, spec)            -> (dq, dk, dv)

Shapes (legend in ``spec.py``): q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv),
out and dout (B, Hq, Nq, Dv), and **stats (2, B, Hq, Nq)**: per query row, ``stats[0] = m``,
the shift the forward's exps were taken against (the running max), and ``stats[1] = l``,
the sum of ``exp(s - m)`` over the row. ``lse = m + log(l)`` (:func:`lse_of`); the backward
recomputes ``p = exp(s - m) / l`` (``masking.row_shift``), which stays exact where lse
does not (a row masked by -1e9; docs/semantics.md).

**dlse (B, Hq, Nq) or None**: the gradient of the loss with respect to ``lse`` (when the
caller used ``return_lse=True`` and lse reached the loss, e.g. through
``merge_attention_states``). ``d lse / d s_j = p_j`` (the undropped softmax, which is what
lse is the log-normaliser of), so the scores' gradient becomes
``ds = p * (dp - delta) + p * dlse = p * (dp - (delta - dlse))``: every backward folds it into
its per-row ``delta`` (``delta' = delta - dlse``) in its preprocess step and nothing else
changes. Dropout changes nothing here (``delta = rowsum(dout * out)`` already holds the
dropped terms, lse has none); an empty row has ``p = 0``, so its dlse has no effect. The
compiled preprocess kernels take ``dlse`` as a C-contiguous (B, Hq, Nq) array, or an empty
(0, 0, 0) one (:func:`dlse_or_empty`) for None: nothing to subtract.

Optional hooks, used when present:

* ``unavailable_reason() -> str | None``: why this module cannot run here (None: it can);
  checked before first use.
* ``to_device(x)`` / ``to_host(x)``: move arrays, so the arrays backward needs stay on the
  device between forward and backward.

``backends.py`` checks each module against this protocol (:func:`check`) when it loads it.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class AttentionKernel(Protocol):
    def forward(self, q, k, v, spec) -> tuple[np.ndarray, np.ndarray]: ...

    def backward(self, q, k, v, out, stats, dout, spec, dlse=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@runtime_checkable
class LinearKernel(Protocol):
    def forward(self, q, k, v, spec) -> np.ndarray: ...

    def backward(self, q, k, v, out, dout, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


HOOKS = ("unavailable_reason", "to_device", "to_host")


def check(module: ModuleType | object, protocol: type) -> None:
    """Raise TypeError unless ``module`` offers ``protocol``'s functions with its leading
    parameters (by name, in order; a parameter with a default in the protocol, such as
    ``dlse=None``, must have one in the module too; extra keyword parameters with defaults
    are allowed) and every hook it defines is callable."""
    name = getattr(module, "__name__", type(module).__name__)
    for fn_name in ("forward", "backward"):
        wanted = list(inspect.signature(getattr(protocol, fn_name)).parameters.values())[1:]  # no self
        want = [p.name for p in wanted]
        shown = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default}"
                          for p in wanted)
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise TypeError(f"kernel module {name} has no {fn_name}({shown})")
        params = list(inspect.signature(fn).parameters.values())
        got = [p.name for p in params[:len(want)]]
        rest = params[len(want):]
        optional = [p.default is not inspect.Parameter.empty for p in wanted]
        if got != want or any(p.default is inspect.Parameter.empty and p.kind not in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in rest) or any(
                needs and p.default is inspect.Parameter.empty
                for needs, p in zip(optional, params)):
            raise TypeError(f"{name}.{fn_name} must take ({shown}), "
                            f"got ({', '.join(p.name for p in params)})")
    for hook in HOOKS:
        if hasattr(module, hook) and not callable(getattr(module, hook)):
            raise TypeError(f"{name}.{hook} must be callable")


def dlse_or_empty(dlse, dtype):
    """``dlse`` as it is, or, for None, the empty (0, 0, 0) array of ``dtype`` that the
    compiled preprocess kernels read as "no dlse" (they test ``dlse.shape[0] > 0``)."""
    return np.zeros((0, 0, 0), dtype=dtype) if dlse is None else dlse


def lse_of(stats: np.ndarray) -> np.ndarray:
    """lse (B, Hq, Nq) = m + log(l) from stats (2, B, Hq, Nq); -inf on a row with no key."""
    m, l = stats[0], stats[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l == 0, -np.inf, m + np.log(l)).astype(stats.dtype, copy=False)
