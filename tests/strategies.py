"""Hypothesis strategies shared by the tests: shapes, broadcastable shape pairs, float64
arrays in ranges where finite differences are trustworthy, non-contiguous layouts.

Sizes stay small on purpose: gradient checks evaluate the function twice per element.
"""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Decorate property tests with @fast_settings. No deadline: JIT-compiled code makes
# first calls slow. Few examples: every gradient check costs two evaluations per element.
fast_settings = settings(deadline=None, max_examples=20)


@st.composite
def shapes(draw, min_dims=0, max_dims=3, min_side=1, max_side=4):
    return draw(
        hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)
    )


@st.composite
def broadcastable_shapes(draw, max_dims=3, max_side=4):
    """Two shapes that broadcast together: each drops some leading axes of a common
    shape and may set any remaining axis to 1."""
    full = draw(shapes(min_dims=0, max_dims=max_dims, max_side=max_side))

    def operand():
        kept = full[draw(st.integers(0, len(full))):]
        return tuple(1 if draw(st.booleans()) else side for side in kept)

    return operand(), operand()


def _make_noncontiguous(draw, array):
    """The same values laid out non-contiguously: a strided slice or a transposed copy."""
    if array.ndim == 0:
        return array
    if draw(st.booleans()):
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    order = draw(st.permutations(range(array.ndim)))
    stored = np.ascontiguousarray(np.transpose(array, order))
    return np.transpose(stored, np.argsort(order))  # a view with permuted strides


@st.composite
def arrays(draw, shape=None, low=-3.0, high=3.0, min_magnitude=0.0, dtype=np.float64):
    """Float arrays with values in [low, high] and |value| >= min_magnitude (keep kinks
    such as relu's and singularities such as 1/x away from finite differences), in
    a random memory layout."""
    if shape is None:
        shape = draw(shapes())
    elif isinstance(shape, st.SearchStrategy):
        shape = draw(shape)
    elements = st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)
    if min_magnitude > 0:
        elements = elements.filter(lambda value: abs(value) >= min_magnitude)
    array = draw(hnp.arrays(np.float64, shape, elements=elements)).astype(dtype)
    if draw(st.booleans()):
        array = _make_noncontiguous(draw, array)
    return array


@st.composite
def distinct_arrays(draw, shape=None, spacing=0.25):
    """Arrays whose elements are all different, at least ``spacing`` apart: a max has no
    ties there, so finite differences see a smooth function."""
    if shape is None:
        shape = draw(shapes())
    elif isinstance(shape, st.SearchStrategy):
        shape = draw(shape)
    size = int(np.prod(shape))
    order = draw(st.permutations(range(size)))
    return (np.array(order, dtype=np.float64) * spacing - size * spacing / 2).reshape(shape)


@st.composite
def matmul_shapes(draw, max_side=4):
    """Operand shapes for NumPy matmul: 1-D on either side, or batched with broadcasting."""
    m, k, n = (draw(st.integers(1, max_side)) for _ in range(3))
    kind = draw(st.sampled_from(["vec-vec", "vec-mat", "mat-vec", "batched"]))
    if kind == "vec-vec":
        return (k,), (k,)
    if kind == "vec-mat":
        return (k,), draw(broadcastable_shapes(max_dims=2))[0] + (k, n)
    if kind == "mat-vec":
        return draw(broadcastable_shapes(max_dims=2))[0] + (m, k), (k,)
    batch_a, batch_b = draw(broadcastable_shapes(max_dims=2, max_side=3))
    return batch_a + (m, k), batch_b + (k, n)
