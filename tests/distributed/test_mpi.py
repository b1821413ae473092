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

import numpy as np
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


def test_data_parallel_training_resumes_on_another_rank_count(tmp_path):
    """A 12-step run checkpointed at step 6 by one process, finished by 4 MPI ranks through
    the CLI, ends where the same run in one process ends (float32 rounding apart)."""
    from microattn.demo.loop import Run, TrainConfig, train_step

    config = TrainConfig(steps=12, batch_size=8, checkpoint_every=100)
    whole = Run.create(config)
    half = Run.create(config)
    for _ in range(12):
        train_step(whole)
    for _ in range(6):
        train_step(half)
    half.save(tmp_path)
    result = subprocess.run([mpiexec(), "-n", "4", sys.executable, "-m", "microattn", "train",
                             "--out", str(tmp_path), "--resume", "--no-progress", "--eval-examples", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data parallel over 4 MPI ranks" in result.stdout
    assert "weights identical on all 4 ranks" in result.stdout
    assert result.stdout.count("resuming") == 1  # rank 0 speaks for all
    finished = Run.load(tmp_path)
    assert finished.step == 12
    np.testing.assert_allclose(finished.losses, whole.losses, rtol=1e-4)
    for name, value in whole.model.state_dict().items():
        np.testing.assert_allclose(finished.model.state_dict()[name], value, rtol=1e-3, atol=1e-5)


def test_a_batch_the_ranks_cannot_split_is_one_clear_error(tmp_path):
    result = subprocess.run([mpiexec(), "-n", "3", sys.executable, "-m", "microattn", "train",
                             "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "cannot be split evenly over 3 ranks" in result.stderr
