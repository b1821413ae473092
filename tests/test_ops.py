"""Every op: (a) forward against the NumPy formula, (b) gradient against central finite
differences in float64 with a random cotangent (``ma.gradcheck``)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import microattn as ma
from tests.strategies import (
    arrays,
    broadcastable_shapes,
    distinct_arrays,
    fast_settings,
    matmul_shapes,
    shapes,
)


def leaf(array):
    return ma.tensor(array, requires_grad=True)


def check_op(fn, numpy_fn, *arrays_in):
    """fn on Tensors matches numpy_fn on arrays, and fn's gradient passes gradcheck."""
    inputs = [leaf(a) for a in arrays_in]
    np.testing.assert_allclose(fn(*inputs).data, numpy_fn(*arrays_in), rtol=1e-12, atol=1e-12)
    assert ma.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- arithmetic

BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@fast_settings
@given(data=st.data())
def test_binary_broadcasting(name, data):
    fn, numpy_fn = BINARY[name]
    shape_a, shape_b = data.draw(broadcastable_shapes())
    check_op(fn, numpy_fn, data.draw(arrays(shape_a)), data.draw(arrays(shape_b)))


@fast_settings
@given(data=st.data())
def test_div(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a = data.draw(arrays(shape_a))
    b = data.draw(arrays(shape_b, min_magnitude=0.5))
    check_op(lambda x, y: x / y, np.divide, a, b)


@fast_settings
@given(a=arrays(low=0.5, high=2.0), exponent=st.sampled_from([2, 3, 0.5, -1.5, 1.7]))
def test_pow_scalar_exponent(a, exponent):
    check_op(lambda x: x**exponent, lambda x: x**exponent, a)


@fast_settings
@given(data=st.data())
def test_pow_tensor_exponent(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    base = data.draw(arrays(shape_a, low=0.5, high=2.0))
    exponent = data.draw(arrays(shape_b, low=-2.0, high=2.0))
    check_op(lambda x, y: x**y, np.power, base, exponent)


def test_pow_at_a_zero_base_has_pytorchs_gradients():
    """At x = 0, d(x ** e)/de is 0 for e >= 0 (x ** e is 0 for every nearby e > 0), not
    0 * log(0) = NaN, and d(x ** 0)/dx is 0, not 0 * 0 ** -1 = NaN: PyTorch's values
    (torch.pow's backward masks exactly these two cases)."""
    x = leaf(np.array([0.0, 0.0, 0.0, 2.0, 0.0]))
    e = leaf(np.array([2.0, 0.5, 0.0, 0.0, 1.0]))
    out = x**e
    with np.errstate(divide="raise", invalid="raise"):  # no NumPy warnings on the way either
        out.backward(np.ones(5))
    np.testing.assert_array_equal(e.grad, [0.0, 0.0, 0.0, np.log(2.0), 0.0])
    np.testing.assert_array_equal(x.grad, [0.0, np.inf, 0.0, 0.0, 1.0])  # 0.5 * 0 ** -0.5 = inf, as PyTorch

    scalar_exponent = leaf(np.array([0.0, 1.0]))
    (scalar_exponent**0).backward(np.ones(2))
    np.testing.assert_array_equal(scalar_exponent.grad, [0.0, 0.0])


def test_pow_keeps_the_formulas_where_pytorch_does():
    """x = 0 with e < 0 (inf * log 0 = -inf) and x < 0 (log of a negative: NaN) are not masked."""
    x, e = leaf(np.array([0.0, -1.0])), leaf(np.array([-1.0, 0.5]))
    with np.errstate(divide="ignore", invalid="ignore"):
        (x**e).backward(np.ones(2))
    assert np.isneginf(e.grad[0]) and np.isnan(e.grad[1])


@fast_settings
@given(a=arrays(low=-2.0, high=2.0))
def test_rpow_scalar_base(a):
    check_op(lambda x: 2.5**x, lambda x: 2.5**x, a)


@fast_settings
@given(a=arrays())
def test_scalars_on_either_side(a):
    def formula(x):
        return 3.0 - x * 2.0 + 1.5 / (x * x + 1.0) - (-x) + 0.5**2

    check_op(formula, formula, a)


def test_neg():
    a = np.array([1.5, -2.0, 0.0])
    check_op(lambda x: -x, np.negative, a)


@fast_settings
@given(data=st.data())
def test_matmul(data):
    shape_a, shape_b = data.draw(matmul_shapes())
    check_op(lambda x, y: x @ y, np.matmul, data.draw(arrays(shape_a)), data.draw(arrays(shape_b)))


def test_rmatmul_with_array_on_the_left():
    a, b = np.random.default_rng(1).standard_normal((2, 3, 3))
    out = a @ leaf(b)
    assert isinstance(out, ma.Tensor)
    np.testing.assert_allclose(out.data, a @ b)
    assert ma.gradcheck(lambda y: a @ y, [leaf(b)])


# ----------------------------------------------------------------------------- elementwise

UNARY = {
    # name: (method, NumPy formula, input strategy)
    "exp": (ma.Tensor.exp, np.exp, arrays()),
    "log": (ma.Tensor.log, np.log, arrays(low=0.1, high=3.0)),
    "sqrt": (ma.Tensor.sqrt, np.sqrt, arrays(low=0.1, high=3.0)),
    "abs": (ma.Tensor.abs, np.abs, arrays(min_magnitude=1e-2)),
    "tanh": (ma.Tensor.tanh, np.tanh, arrays()),
    "relu": (ma.Tensor.relu, lambda x: np.maximum(x, 0), arrays(min_magnitude=1e-2)),
    "sigmoid": (ma.Tensor.sigmoid, lambda x: 1 / (1 + np.exp(-x)), arrays(low=-6.0, high=6.0)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@fast_settings
@given(data=st.data())
def test_unary(name, data):
    method, numpy_fn, strategy = UNARY[name]
    check_op(method, numpy_fn, data.draw(strategy))


def test_sigmoid_is_stable_for_large_inputs():
    x = ma.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0], requires_grad=True)
    with np.errstate(over="raise", invalid="raise"):  # no overflow warnings either
        out = x.sigmoid()
        out.backward(np.ones(5))
    expected = [0.0, 1 / (1 + np.exp(50.0)), 0.5, 1 / (1 + np.exp(-50.0)), 1.0]
    np.testing.assert_allclose(out.data, expected)
    assert np.all(np.isfinite(x.grad))


# ----------------------------------------------------------------------------- reductions

axes_for = st.shared(shapes(min_dims=1), key="reduction-shape").flatmap(
    lambda shape: st.one_of(
        st.none(),
        st.integers(-len(shape), len(shape) - 1),
        st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1).map(tuple),
    )
)


@pytest.mark.parametrize("name", ["sum", "mean"])
@fast_settings
@given(
    a=st.shared(shapes(min_dims=1), key="reduction-shape").flatmap(lambda shape: arrays(shape)),
    axis=axes_for,
    keepdims=st.booleans(),
)
def test_sum_and_mean(name, a, axis, keepdims):
    numpy_fn = getattr(np, name)
    check_op(
        lambda x: getattr(x, name)(axis=axis, keepdims=keepdims),
        lambda x: numpy_fn(x, axis=axis, keepdims=keepdims),
        a,
    )


@fast_settings
@given(
    a=st.shared(shapes(min_dims=1), key="reduction-shape").flatmap(distinct_arrays),
    axis=axes_for,
    keepdims=st.booleans(),
)
def test_max_without_ties(a, axis, keepdims):
    check_op(
        lambda x: x.max(axis=axis, keepdims=keepdims),
        lambda x: np.max(x, axis=axis, keepdims=keepdims),
        a,
    )


def test_max_splits_the_gradient_evenly_among_ties():
    x = ma.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 0.0, 2.0, -1.0]], requires_grad=True)
    x.max(axis=1).backward(np.array([6.0, 4.0]))
    np.testing.assert_allclose(x.grad, [[0, 2, 2, 2], [2, 0, 2, 0]])


def test_max_of_everything():
    x = ma.tensor([[1.0, 5.0], [5.0, 2.0]], requires_grad=True)
    out = x.max()
    assert out.shape == () and out.item() == 5.0
    out.backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5], [0.5, 0]])


# ----------------------------------------------------------------------------- softmax


def numpy_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 0])
@fast_settings
@given(a=arrays(low=-5.0, high=5.0))
def test_softmax(axis, a):
    if a.ndim == 0:
        a = a.reshape(1)
    check_op(lambda x: x.softmax(axis=axis), lambda x: numpy_softmax(x, axis), a)


@pytest.mark.parametrize("axis", [-1, 0])
@fast_settings
@given(a=arrays(low=-5.0, high=5.0))
def test_log_softmax(axis, a):
    if a.ndim == 0:
        a = a.reshape(1)
    check_op(lambda x: x.log_softmax(axis=axis), lambda x: np.log(numpy_softmax(x, axis)), a)


def test_softmax_is_stable_for_huge_logits():
    x = ma.tensor([[1000.0, 1001.0, -1000.0]])
    np.testing.assert_allclose(x.softmax().data, numpy_softmax(np.array([[0.0, 1.0, -2000.0]])))
    assert np.all(np.isfinite(x.log_softmax().data[:, :2]))


def test_partially_masked_rows_match_the_unmasked_entries():
    x = leaf(np.array([[0.3, -np.inf, 1.2, -np.inf]]))
    out = x.softmax()
    live = numpy_softmax(np.array([0.3, 1.2]))
    np.testing.assert_allclose(out.data, [[live[0], 0.0, live[1], 0.0]])
    out.backward(np.array([[1.0, 2.0, -1.0, 3.0]]))
    assert np.all(np.isfinite(x.grad)) and x.grad[0, 1] == 0 and x.grad[0, 3] == 0
    # the live entries get softmax's gradient of the live row alone: p * (c - <p, c>)
    live_cotangent = np.array([1.0, -1.0])
    np.testing.assert_allclose(x.grad[0, [0, 2]], live * (live_cotangent - live @ live_cotangent), rtol=1e-14)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_fully_masked_rows_give_no_nan_and_zero_gradient(op):
    logits = np.array([[-np.inf, -np.inf, -np.inf], [0.5, -np.inf, 1.0]])
    x = leaf(logits)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # not even a warning
        out = getattr(x, op)()
        out.backward(np.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]]))
    expected_dead_row = 0.0 if op == "softmax" else -np.inf
    assert np.all(out.data[0] == expected_dead_row)
    assert not np.any(np.isnan(out.data))
    np.testing.assert_array_equal(x.grad[0], 0.0)
    assert np.all(np.isfinite(x.grad))


def test_masked_softmax_gradcheck_on_live_entries():
    rng = np.random.default_rng(2)
    mask = np.array(
        [[True, False, True, True], [False, False, False, False], [True, True, False, True]]
    )
    logits = leaf(rng.standard_normal((3, 4)))
    assert ma.gradcheck(lambda x: x.masked_fill(~mask, -np.inf).softmax(), [logits])


# ----------------------------------------------------------------------------- shape


@fast_settings
@given(a=arrays(shape=shapes(min_dims=1, max_dims=3)), data=st.data())
def test_reshape(a, data):
    target = tuple(data.draw(st.permutations(a.shape)))[::-1] + (1,)
    check_op(lambda x: x.reshape(target), lambda x: x.reshape(target), a)
    check_op(lambda x: x.reshape(-1), lambda x: x.reshape(-1), a)
    check_op(lambda x: x.reshape(*target), lambda x: x.reshape(target), a)


@fast_settings
@given(a=arrays(shape=shapes(min_dims=1, max_dims=4)), data=st.data())
def test_transpose(a, data):
    axes = tuple(data.draw(st.permutations(range(a.ndim))))
    check_op(lambda x: x.transpose(*axes), lambda x: np.transpose(x, axes), a)
    check_op(lambda x: x.transpose(axes), lambda x: np.transpose(x, axes), a)
    check_op(lambda x: x.transpose(), np.transpose, a)
    check_op(lambda x: x.T, lambda x: x.T, a)


def test_transpose_with_negative_axes():
    a = np.random.default_rng(3).standard_normal((2, 3, 4))
    check_op(lambda x: x.transpose(0, -1, -2), lambda x: np.transpose(x, (0, 2, 1)), a)


@fast_settings
@given(a=arrays(shape=shapes(min_dims=2, max_dims=4)), data=st.data())
def test_swapaxes(a, data):
    axis1, axis2 = (data.draw(st.integers(-a.ndim, a.ndim - 1)) for _ in range(2))
    check_op(lambda x: x.swapaxes(axis1, axis2), lambda x: np.swapaxes(x, axis1, axis2), a)


@fast_settings
@given(data=st.data())
def test_masked_fill(data):
    shape, mask_shape = data.draw(broadcastable_shapes())
    shape = np.broadcast_shapes(shape, mask_shape)  # the mask must broadcast to the tensor
    a = data.draw(arrays(shape))
    mask = data.draw(hnp.arrays(np.bool_, mask_shape))
    check_op(lambda x: x.masked_fill(mask, -7.5), lambda x: np.where(mask, -7.5, x), a)


def test_masked_fill_rejects_a_mask_that_grows_the_tensor():
    with pytest.raises(ValueError, match="does not broadcast"):
        ma.tensor(np.zeros(3)).masked_fill(np.zeros((2, 3), dtype=bool), 0.0)
    with pytest.raises(TypeError, match="bool mask"):
        ma.tensor(np.zeros(3)).masked_fill(np.zeros(3), 0.0)


INDEXES = [
    (1,),
    (slice(None), 2),
    (slice(1, None, 2), slice(None, None, -1)),
    (Ellipsis, 0),
    (None, 0, slice(1, 3)),
    (np.array([0, 2, 0, 0]),),  # repeated rows: their gradients add up
    (np.array([[1, 1], [0, 2]]), slice(None)),
    (np.array([0, 2, 2]), np.array([3, 1, 1])),
    (np.array([True, False, True]),),
    (slice(None), np.array([False, True, True, False])),
]


@pytest.mark.parametrize("index", INDEXES, ids=[str(i) for i in range(len(INDEXES))])
def test_getitem(index):
    a = np.random.default_rng(4).standard_normal((3, 4))
    check_op(lambda x: x[index], lambda x: x[index], a)
    if len(index) == 1:
        check_op(lambda x: x[index[0]], lambda x: x[index[0]], a)


def test_getitem_with_tensor_index():
    a = np.arange(6.0).reshape(2, 3)
    index = ma.tensor([2, 0, 2])
    check_op(lambda x: x[:, index], lambda x: x[:, np.array([2, 0, 2])], a)


# ----------------------------------------------------------------------------- joining


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate(axis):
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 3))]
    if axis == 0:
        parts[1] = rng.standard_normal((4, 3))
    check_op(
        lambda *xs: ma.concatenate(xs, axis=axis),
        lambda *xs: np.concatenate(xs, axis=axis),
        *parts,
    )


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack(axis):
    parts = list(np.random.default_rng(6).standard_normal((3, 2, 3)))
    check_op(lambda *xs: ma.stack(xs, axis=axis), lambda *xs: np.stack(xs, axis=axis), *parts)


def test_joining_a_single_tensor_and_constants():
    x = leaf(np.ones((2, 2)))
    assert ma.gradcheck(lambda t: ma.concatenate([t], axis=1), [x])
    constant = np.arange(4.0).reshape(2, 2)
    out = ma.stack([constant, x, constant])
    np.testing.assert_allclose(out.data, np.stack([constant, np.ones((2, 2)), constant]))
    assert ma.gradcheck(lambda t: ma.stack([constant, t * 2.0]), [x])


@fast_settings
@given(data=st.data())
def test_where(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    cond_shape = np.broadcast_shapes(shape_a, shape_b)
    condition = np.asarray(data.draw(arrays(cond_shape))) > 0
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b))
    check_op(lambda x, y: ma.where(condition, x, y), lambda x, y: np.where(condition, x, y), a, b)


def test_where_with_a_scalar_branch_and_tensor_condition():
    x = leaf(np.array([-1.0, 2.0, -3.0]))
    out = ma.where(x > 0, x, 0.0)
    np.testing.assert_allclose(out.data, [0.0, 2.0, 0.0])
    out.backward(np.array([5.0, 6.0, 7.0]))
    np.testing.assert_allclose(x.grad, [0.0, 6.0, 0.0])
