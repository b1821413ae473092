"""numba.cuda kernels."""
