"""microattn.distributed under real MPI: tests/distributed/mpi_checks.py on 2 and 4 ranks
(oversubscribed on a 2-core machine; that is fine for correctness). Bounded in time: a hang
is a failure, not a stuck CI."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import require

CHECKS = pathlib.Path(__file__).with_name("mpi_checks.py")
ROOT = CHECKS.parents[2]


def mpiexec() -> str:
    require("mpi4py")
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        pytest.fail("mpiexec not found: install the mpi extra (mpi4py and the mpich wheel)")
    return found


def check_names() -> list[str]:
    return re.findall(r"^@check\ndef (\w+)", CHECKS.read_text(), flags=re.M)


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_check_passes_on_every_rank(ranks):
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(CHECKS)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = re.findall(r"ok (\w+) rank (\d+)", result.stdout)
    names = check_names()
    assert len(names) >= 7
    assert sorted(passed) == sorted((name, str(rank)) for name in names for rank in range(ranks))
