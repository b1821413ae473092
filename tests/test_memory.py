"""microattn/memory.py: freed memory kept for reuse (glibc's malloc thresholds), checked in
fresh processes: set at import, not set when the user chose glibc's own variables, and
what it is for: a large array allocated again after a free costs no fresh pages."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

FAULTS = """
import resource, numpy as np, microattn
for _ in range(3):
    np.ones(1 << 19, dtype=np.float32)  # 2 MB, freed at once (NumPy asks for huge pages from 4 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(1 << 19, dtype=np.float32)
print(microattn.memory.KEPT, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_extra=None):
    env = None
    if env_extra:
        import os

        env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_import_keeps_freed_memory_and_reuse_costs_no_page_faults():
    kept, faults = run()
    assert kept
    assert faults < 100  # 20 x 2 MB of fresh pages would be ~10,000 faults


def test_the_users_own_setting_wins():
    """MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ in the environment: nothing changed,
    and with a small mmap threshold every 2 MB array is fresh pages again."""
    kept, faults = run({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not kept
    assert faults > 20 * 400
