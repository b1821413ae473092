"""numba.cuda kernels: rung 1 ``flash.py`` (one query or key row per thread) and rung 2
``tiled.py`` (register micro-tiles); docs/cuda-flash.md."""
