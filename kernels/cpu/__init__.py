"""numba parallel CPU kernels."""
