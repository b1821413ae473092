"""Optional test dependencies: skipped here without them, a failure in CI.

The oracles (torch, matplotlib: the ``oracle`` extra) and numba-cuda (the ``cuda`` extra) are
not dependencies of microattn, so a developer without them still gets a green run, with the
skips listed. CI (``CI=true``) installs every extra, so there a missing one would mean that
the tests needing it silently do not run: under CI such a skip is turned into a failure,
whether it comes from ``require`` below or from a plain ``pytest.importorskip``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

EXTRA_OF = {"torch": "oracle", "matplotlib": "oracle", "transformers": "oracle", "numba_cuda": "cuda",
            "mpi4py": "mpi", "safetensors": "models", "tokenizers": "models"}

# the reasons require() and pytest.importorskip give when one of those modules is missing
MISSING_OPTIONAL = re.compile(r"\b(%s)\b.*(?:No module named|is not installed)" % "|".join(EXTRA_OF))


def require(module: str):
    """Import and return ``module``; without it, skip the test (or module), or fail under CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRA_OF.get(module, "test")
        message = f"{module} is not installed (pip install -e '.[{extra}]'): {exc}"
        if IN_CI:
            pytest.fail(f"CI installs every extra, yet {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def fail_if_optional_missing_in_ci(report):
    """Under CI, a skip for a missing optional module becomes a failure."""
    if IN_CI and report.skipped and MISSING_OPTIONAL.search(skip_reason(report)):
        report.longrepr = f"CI installs every extra, yet: {skip_reason(report)}"
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_if_optional_missing_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    fail_if_optional_missing_in_ci(outcome.get_result())


def pytest_report_header(config):
    """One line saying which optional dependencies this run has (found, not imported)."""
    found = []
    for module, extra in EXTRA_OF.items():
        if importlib.util.find_spec(module) is not None:
            found.append(f"{module} {importlib.metadata.version(module.replace('_', '-'))}")
        else:
            found.append(f"{module} missing (extra '{extra}': its tests "
                         f"{'FAIL, CI=true' if IN_CI else 'are skipped'})")
    return "optional test dependencies: " + ", ".join(found)
