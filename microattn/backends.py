"""Backend names -> kernel modules, what is available here, and what "auto" picks.

Adding a backend is one kernel module (the protocol in ``kernels/protocol.py``) and one line
in a table below. Each module is checked against its family's protocol when it is loaded
(a module that does not conform is a TypeError naming what is missing). A kernel module may
define ``unavailable_reason() -> str | None`` (checked before first use) and ``to_device`` /
``to_host`` (used to keep the arrays that backward needs on the device between forward and
backward).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .kernels import protocol

# "composed" has no kernel module: it is built from Tensor ops in functional.py.
SDPA_KERNELS = {
    "reference": "microattn.kernels.reference",
    "composed": None,
    "numba": "microattn.kernels.cpu.flash",
    "cuda": "microattn.kernels.cuda.tiled",  # rung 2, the fastest (rung 1: cuda.flash); docs/cuda-flash.md
}
LINEAR_KERNELS = {
    "reference": "microattn.kernels.linear_reference",
    "numba": "microattn.kernels.cpu.linear",
}
FAMILIES = {"scaled_dot_product_attention": SDPA_KERNELS, "linear_attention": LINEAR_KERNELS}
PROTOCOLS = {"scaled_dot_product_attention": protocol.AttentionKernel,
             "linear_attention": protocol.LinearKernel}


_CHECKED: set = set()  # (module name, family) pairs that passed protocol.check


def _import(module_name: str, family: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # numba (or numba-cuda) missing, or a broken install
        return None, f"{module_name} cannot be imported: {exc}"
    if (module_name, family) not in _CHECKED:  # once per process: ~100 us a check
        protocol.check(module, PROTOCOLS[family])
        _CHECKED.add((module_name, family))
    check = getattr(module, "unavailable_reason", None)
    reason = check() if check is not None else None
    return (None, reason) if reason else (module, None)


def unavailable_reason(name: str, family: str = "scaled_dot_product_attention") -> str | None:
    """None when backend ``name`` works on this machine, else a sentence saying why not."""
    table = FAMILIES[family]
    if name not in table:
        return f"unknown backend {name!r}"
    if table[name] is None:
        return None
    return _import(table[name], family)[1]


def available_backends(family: str = "scaled_dot_product_attention") -> list[str]:
    """The backends that work on this machine, e.g. ['reference', 'composed', 'numba']."""
    return [name for name in FAMILIES[family] if unavailable_reason(name, family) is None]


def _is_simulated_gpu() -> bool:
    try:
        from numba import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


def resolve(backend: str, family: str = "scaled_dot_product_attention") -> tuple[str, ModuleType | None]:
    """(name, kernel module) for a backend argument; the module is None for "composed".

    "auto" picks the fastest available: "cuda" on a real GPU (never the simulator, which is
    a correctness tool and thousands of times slower), then "numba", then "reference".
    Raises ValueError for an unknown name and RuntimeError for an unavailable one.
    """
    table = FAMILIES[family]
    if not isinstance(backend, str) or (backend != "auto" and backend not in table):
        raise ValueError(
            f"unknown backend {backend!r} for {family}; expected 'auto' or one of {sorted(table)}"
        )
    if backend == "auto":
        order = ["numba", "reference"]
        if "cuda" in table and not _is_simulated_gpu():
            order.insert(0, "cuda")
        for name in order:
            module, reason = _import(table[name], family)
            if reason is None:
                return name, module
        raise RuntimeError(f"no {family} backend is available here")  # reference always is
    if table[backend] is None:
        return backend, None
    module, reason = _import(table[backend], family)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available here: {reason}")
    return backend, module
