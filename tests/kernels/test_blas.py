"""microattn.kernels.blas.single_threaded: both OpenBLAS copies (NumPy's, SciPy's) on one
thread inside the block, their thread counts put back after it, nesting free.

(It lives in kernels/ and belongs in tests/kernels/; it is tested here, beside the demo
that uses it, until that folder takes it.)"""

import sys

import numpy as np
import pytest

from microattn.kernels import blas


def thread_counts():
    return [get() for get, _ in blas.thread_controls()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheels' bundled OpenBLAS is found on Linux")
def test_both_copies_are_found():
    assert len(blas.thread_controls()) == 2  # NumPy's and SciPy's


def test_pins_every_copy_and_puts_the_counts_back():
    controls = blas.thread_controls()
    before = thread_counts()
    for _, put in controls:
        put(2)
    try:
        with blas.single_threaded():
            assert thread_counts() == [1] * len(controls)
            with blas.single_threaded():  # nested: already one thread, nothing changes
                assert thread_counts() == [1] * len(controls)
            assert thread_counts() == [1] * len(controls)
            a = np.arange(12.0).reshape(3, 4)
            np.testing.assert_array_equal(a @ a.T, np.einsum("ik,jk->ij", a, a))
        assert thread_counts() == [2] * len(controls)
    finally:
        for (_, put), count in zip(controls, before):
            put(count)


def test_counts_are_put_back_when_the_block_raises():
    before = thread_counts()
    with pytest.raises(RuntimeError), blas.single_threaded():
        raise RuntimeError("inside")
    assert thread_counts() == before
