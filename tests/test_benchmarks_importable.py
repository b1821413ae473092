"""Keep the asv suite (benchmarks/benchmarks) from rotting: import every module and run
each benchmark method once, at the smallest size, without asv.

Per class: every value of "backend" and "pass", the smallest "N"/"size"/"width", the
first value of everything else. A combination the suite skips (NotImplementedError in
setup: backend unavailable here, over a budget) is a pytest skip here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import math
import os
import pathlib
import sys

import pytest

SUITE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "benchmarks"
PACKAGE = "microattn_asv_suite"  # not "benchmarks": that name is asv's, and too common
SIZE_PARAMS = {"N", "size", "width"}
ALL_VALUES = {"backend", "pass"}
METHOD_PREFIXES = ("time_", "peakmem_", "track_")


def _import_suite():
    """The suite's modules. Its __init__ sets numba's threading layer through the
    environment; that is for benchmark processes, so the variables are restored here."""
    saved = {name: os.environ.get(name) for name in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")}
    try:
        if PACKAGE not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                PACKAGE, SUITE / "__init__.py", submodule_search_locations=[str(SUITE)])
            package = importlib.util.module_from_spec(spec)
            sys.modules[PACKAGE] = package
            spec.loader.exec_module(package)
        return [importlib.import_module(f"{PACKAGE}.{path.stem}") for path in sorted(SUITE.glob("bench_*.py"))]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _benchmark_classes():
    return [cls for module in _import_suite() for name, cls in vars(module).items()
            if inspect.isclass(cls) and not name.startswith("_") and cls.__module__ == module.__name__]


def _small_combinations(cls):
    names = getattr(cls, "param_names", [])
    choices = []
    for name, values in zip(names, getattr(cls, "params", [])):
        if name in SIZE_PARAMS:
            choices.append([min(values)])
        elif name in ALL_VALUES:
            choices.append(list(values))
        else:
            choices.append([values[0]])
    return list(itertools.product(*choices))


CASES = [pytest.param(cls, combo, id=f"{cls.__name__}-{'-'.join(map(str, combo))}")
         for cls in _benchmark_classes() for combo in _small_combinations(cls)]


def test_suite_has_the_main_classes():
    names = {cls.__name__ for cls in _benchmark_classes()}
    assert {"ScaledDotProductAttention", "SlidingWindowAttention", "LinearAttention",
            "MLPStep", "DecoderLMStep"} <= names


_CACHES: dict = {}


def _cached(cls):
    """What asv's setup_cache gives every benchmark of a class: computed once per class here."""
    if cls not in _CACHES:
        _CACHES[cls] = cls().setup_cache()
    return _CACHES[cls]


@pytest.mark.slow
@pytest.mark.parametrize("cls, combo", CASES)
def test_benchmark_runs_once(cls, combo):
    bench = cls()
    if hasattr(cls, "setup_cache"):  # asv passes the cache first to setup and each benchmark
        try:
            combo = (_cached(cls),) + tuple(combo)
        except NotImplementedError as why:
            pytest.skip(f"skipped by the suite: {why}")
    try:
        bench.setup(*combo)
    except NotImplementedError as why:
        pytest.skip(f"skipped by the suite: {why}")
    methods = [name for name in dir(bench) if name.startswith(METHOD_PREFIXES)]
    assert methods, f"{cls.__name__} has no benchmark methods"
    for name in methods:
        result = getattr(bench, name)(*combo)
        if name.startswith("track_"):
            assert isinstance(result, float) and math.isfinite(result) and result >= 0, (name, result)
            assert getattr(getattr(cls, name), "unit", None), f"{name} needs a unit"
        if name == "track_max_error":  # float32 at N = 256: ~1e-7; a broken oracle slice: ~1
            assert result < 1e-4, result
    if hasattr(bench, "teardown"):
        bench.teardown(*combo)
