"""What a grader needs: load the learner's file, call into it, and say precisely what is wrong.

A grader never holds a second copy of the answer. It computes the expected values with the
library's own functions, calls the learner's function on the same inputs, and on the first
disagreement raises :class:`Failure` naming the array, the worst element, expected vs got, how
many elements are off, and what that kind of mistake usually means.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
import types
from pathlib import Path

import numpy as np

_loaded = itertools.count()


class Failure(Exception):
    """The learner's answer is wrong (or missing); ``str(failure)`` says what and why."""


def load(path) -> types.ModuleType:
    """Import the learner's file at ``path`` as a fresh module (a new name every time)."""
    path = Path(path)
    if not path.is_file():
        raise Failure(f"there is no {path}: run `microattn exercise start` first, or pass the directory you used")
    name = f"microattn_exercise_{next(_loaded)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba and dataclasses look modules up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise Failure(f"{path.name} does not parse: line {error.lineno}: {error.msg}") from None
    except SystemExit as error:
        raise Failure(f"importing {path.name} called sys.exit({error.code!r}): keep scripts under "
                      "`if __name__ == \"__main__\":`") from None
    except Exception as error:  # noqa: BLE001 - any error importing the learner's file is reported
        raise Failure(f"importing {path.name} failed: {_last_frame(error)}") from None
    return module


def function(ns, name: str):
    """The learner's ``name`` from ``ns`` (their module, or the solution namespace)."""
    found = getattr(ns, name, None)
    if found is None:
        raise Failure(f"your file defines no `{name}`: keep the name the stub gives it")
    return found


def call(ns, name: str, *args, **kwargs):
    """Call the learner's ``name``; a blank stub or an exception becomes a :class:`Failure`."""
    try:
        return function(ns, name)(*args, **kwargs)
    except Failure:
        raise
    except NotImplementedError:
        raise Failure(f"`{name}` is not written yet: it still raises NotImplementedError. Replace the "
                      f"`raise NotImplementedError` line with your code (`microattn exercise hint` helps)") from None
    except SystemExit as error:  # a learner's sys.exit() must not end the grader quietly
        raise Failure(f"`{name}` called sys.exit({error.code!r}): return a value instead") from None
    except Exception as error:  # noqa: BLE001 - the learner's exception is the message
        raise Failure(f"`{name}` raised {_last_frame(error)}") from None


def _last_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}, line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def compare(what: str, got, expected, *, rtol: float = 1e-6, atol: float = 1e-9, meaning=()) -> None:
    """Raise :class:`Failure` unless ``got`` equals ``expected`` elementwise within tolerance.

    ``meaning`` is a sequence of ``(test, explanation)``: the first ``test(got, expected)`` that
    holds adds its explanation, the usual cause of that wrong answer, to the message.
    """
    expected = np.asarray(expected)
    if got is None:
        raise Failure(f"{what} is None: did you forget a `return`?")
    try:
        got = np.asarray(got, dtype=np.result_type(expected.dtype, np.float64) if expected.dtype.kind == "f"
                         else None)
    except (TypeError, ValueError) as error:
        raise Failure(f"{what} is not an array of numbers ({error})") from None
    if got.shape != expected.shape:
        message = f"{what} has shape {got.shape}, expected {expected.shape}"
        raise Failure(_explain(message, got, expected, meaning))
    both_nan = np.isnan(got) & np.isnan(expected) if expected.dtype.kind in "fc" else np.zeros(got.shape, bool)
    error = np.abs(got - expected)
    bad = ~((error <= atol + rtol * np.abs(expected)) | both_nan | (got == expected))
    if not bad.any():
        return
    badness = np.where(bad, np.nan_to_num(error, nan=np.inf, posinf=np.inf), -1.0)
    worst = np.unravel_index(int(np.argmax(badness)), got.shape) if got.ndim else ()
    index = ", ".join(str(int(i)) for i in worst)
    message = (f"{what}[{index}] is {_number(got[worst])}, expected {_number(expected[worst])} "
               f"({int(bad.sum())} of {bad.size} elements are off)")
    raise Failure(_explain(message, got, expected, meaning))


def _number(x) -> str:
    return f"{x:.6g}" if np.isrealobj(x) and np.ndim(x) == 0 and np.asarray(x).dtype.kind in "fiub" else repr(x)


def _explain(message: str, got, expected, meaning) -> str:
    for test, explanation in meaning:
        try:
            holds = bool(test(got, expected))
        except Exception:  # noqa: BLE001 - a diagnosis that does not apply is skipped
            holds = False
        if holds:
            return f"{message}.\nWhat this usually means: {explanation}"
    return message


def same_values_up_to(factor_test):
    """A ``meaning`` test: ``got`` equals ``expected`` transformed by ``factor_test(expected)``."""
    def test(got, expected):
        other = np.asarray(factor_test(expected))
        return other.shape == np.shape(got) and np.allclose(got, other, rtol=1e-5, atol=1e-8)
    return test
