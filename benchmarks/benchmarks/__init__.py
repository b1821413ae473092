"""microattn's asv benchmark suite (numpy/scipy style: one class per operation).

asv imports this package before any benchmark module, in the process that later runs
the benchmarks, so this is the place to choose numba's threading layer: numba reads
``NUMBA_THREADING_LAYER`` when it is first imported.

Why ``workqueue``: numba's default picks TBB or OpenMP when present. Both keep their
worker threads spinning for a while after each parallel region; on a 2-core machine
those spinning threads steal the one core the NumPy code between two kernel calls runs
on, and timings become noisy and pessimistic. numba's own ``workqueue`` layer puts its
workers to sleep at once. ``OMP_WAIT_POLICY=PASSIVE`` does the same for any OpenMP
runtime that is loaded anyway. A value set by the caller wins, so layers can be compared:
``NUMBA_THREADING_LAYER=omp asv run ...``.
"""

import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
