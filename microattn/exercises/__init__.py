"""Graded exercises, from ``Tensor.backward`` to the CUDA kernel and the ring.

    microattn exercise list              # what there is, in order
    microattn exercise start 1 work/     # copies the stub for exercise 1 into work/
    microattn exercise check 1 work/     # grades work/<file>: which element is wrong, and why
    microattn exercise hint 1            # hints, gentlest first

Each exercise is one module ``exNN_slug.py`` here, with

    NUMBER, SLUG, TITLE   its place in the order, a short name, one line
    FILE                  the stub's file name in ``stubs/`` (and in the learner's directory)
    READ                  the docs page (and section) to read first
    HINTS                 a list of hints, gentlest first
    ENV                   (optional) environment the grader needs, e.g. the CUDA simulator
    solution()            the answer as a namespace of the library's own functions: the
                          grader never holds a second copy
    check(ns)             grades ``ns`` (the learner's module, or ``solution()``): returns the
                          lines it checked, raises ``grading.Failure`` on the first wrong one

CI grades every exercise twice: ``solution()`` must pass, the blank stub must fail with a
message that says what to do.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .grading import Failure, load

# In order; an entry is the module name. Modules are imported on first use: the CUDA exercise
# must not import numba.cuda into a process that did not ask for it.
ORDER = [
    "ex01_unbroadcast",
    "ex02_softmax_backward",
    "ex03_new_function",
    "ex04_attention_backward",
    "ex05_online_softmax",
    "ex06_flash_tile_loop",
    "ex07_cuda_row_forward",
    "ex08_lse_merge",
    "ex09_linear_prefix_sums",
    "ex10_ring_step",
]

STUBS = Path(__file__).parent / "stubs"


def exercise(number):
    """The exercise module numbered ``number`` (1-based, as ``list`` shows)."""
    try:
        number = int(number)
    except (TypeError, ValueError):
        raise ValueError(f"an exercise number is an integer from 1 to {len(ORDER)}, got {number!r}") from None
    if not 1 <= number <= len(ORDER):
        raise ValueError(f"there is no exercise {number}: they are numbered 1 to {len(ORDER)} "
                         "(`microattn exercise list`)")
    return importlib.import_module(f"{__name__}.{ORDER[number - 1]}")


def all_exercises() -> list:
    return [exercise(n) for n in range(1, len(ORDER) + 1)]


def stub_path(ex) -> Path:
    return STUBS / ex.FILE


def start(number, directory, *, force: bool = False) -> Path:
    """Copy exercise ``number``'s stub into ``directory``; refuses to overwrite work unless ``force``."""
    ex = exercise(number)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file: give a directory to put {ex.FILE} in")
    target = directory / ex.FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists already (your work?): check it, or pass --force to start over")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stub_path(ex), target)
    return target


def needs_own_process(ex) -> bool:
    """Whether grading ``ex`` needs environment this process lacks (set before numba starts)."""
    env = getattr(ex, "ENV", {})
    return any(os.environ.get(key) != value for key, value in env.items())


def check(number, directory) -> list[str]:
    """Grade ``directory``'s file for exercise ``number``: the lines checked, or raises Failure."""
    ex = exercise(number)
    return ex.check(load(Path(directory) / ex.FILE))


def check_in_own_process(number, directory) -> tuple[int, str]:
    """Grade in a child process with the exercise's ENV: (exit status, what it printed)."""
    ex = exercise(number)
    env = {**os.environ, **getattr(ex, "ENV", {})}
    child = subprocess.run([sys.executable, "-m", "microattn", "exercise", "check", str(number), str(directory)],
                           env=env, capture_output=True, text=True)
    return child.returncode, child.stdout + child.stderr


__all__ = ["ORDER", "Failure", "all_exercises", "check", "exercise", "start", "stub_path"]
