"""microattn: a small autograd tensor engine on NumPy, with exact and fast attention."""

import importlib

from . import memory  # noqa: F401  (keeps freed memory for reuse: see memory.py)
from .autograd import Function, is_grad_enabled, no_grad
from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor, concatenate, stack, tensor, where

__version__ = "0.1.0"


def _import_if_present(submodule):
    """Import ``microattn.<submodule>`` (which also binds it as ``microattn.<submodule>``),
    or return None if exactly that module does not exist. Any other import error, e.g. a
    missing dependency inside it, propagates."""
    name = f"{__name__}.{submodule}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None


_import_if_present("functional")
_import_if_present("nn")
_import_if_present("optim")
if _import_if_present("backends") is not None:
    from .backends import available_backends
