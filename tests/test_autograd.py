"""The engine: graph building, the backward walk, accumulation, grad mode, dtypes, the
Function extension point and the Tensor surface."""

import pathlib
import re
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import microattn as ma
from tests.strategies import arrays, broadcastable_shapes, fast_settings

# ----------------------------------------------------------------------------- gradients


@fast_settings
@given(data=st.data())
def test_broadcast_gradients_are_summed_to_operand_shape(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a = ma.tensor(data.draw(arrays(shape_a)), requires_grad=True)
    b = ma.tensor(data.draw(arrays(shape_b)), requires_grad=True)
    out = a + b
    cotangent = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(cotangent)
    np.testing.assert_allclose(a.grad, sum_into(cotangent, a.shape))
    np.testing.assert_allclose(b.grad, sum_into(cotangent, b.shape))


def sum_into(cotangent, shape):
    """Oracle for d<c, a + b>/da, element by element: every output position adds its
    cotangent to the operand element it read (index 0 along a stretched axis)."""
    total = np.zeros(shape)
    leading = cotangent.ndim - len(shape)
    for index in np.ndindex(cotangent.shape):
        source = tuple(0 if side == 1 else i for i, side in zip(index[leading:], shape))
        total[source] += cotangent[index]
    return total


def test_broadcast_example():
    a = ma.tensor(np.ones((3, 1)), requires_grad=True)
    b = ma.tensor(np.ones(4), requires_grad=True)
    (a * b).backward(np.arange(12.0).reshape(3, 4))
    np.testing.assert_allclose(a.grad, [[6.0], [22.0], [38.0]])
    np.testing.assert_allclose(b.grad, [12.0, 15.0, 18.0, 21.0])


def test_node_used_twice_accumulates_both_paths():
    x = ma.tensor([1.5, -2.0], requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([1.5, -2.0]) + 1)

    y = ma.tensor(3.0, requires_grad=True)
    h = y * 2.0  # an interior node used by two consumers
    (h * h + h.exp()).backward()
    np.testing.assert_allclose(y.grad, 2 * 2 * 6.0 + 2 * np.exp(6.0))


def test_backward_twice_accumulates_again():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    out = (x * 3.0).sum()
    out.backward()
    first = x.grad
    out.backward()  # the graph is not freed
    np.testing.assert_allclose(x.grad, [6.0, 6.0])
    assert x.grad is first  # accumulated in place with +=


def test_first_gradient_is_a_copy():
    x = ma.tensor(np.ones(3), requires_grad=True)
    cotangent = np.array([1.0, 2.0, 3.0])
    (x + 0.0).backward(cotangent)
    x.grad[0] = 100.0
    assert cotangent[0] == 1.0


def test_only_leaves_get_grad():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    hidden = x * 2.0
    hidden.sum().backward()
    assert x.is_leaf and not hidden.is_leaf
    assert hidden.grad is None


def test_constants_get_no_grad():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    c = ma.tensor([3.0, 4.0])
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, [3.0, 4.0])


def test_deep_graph_does_not_recurse():
    x = ma.tensor(0.0, requires_grad=True)
    out = x
    for _ in range(5000):
        out = out + 1.0
    out.backward()
    assert out.item() == 5000.0 and x.grad == 1.0


def test_backward_argument_checks():
    x = ma.tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar outputs"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2, 3\)"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        ma.tensor([1.0]).backward()
    (x * 2.0).backward(ma.tensor(np.ones((2, 3))))  # a Tensor cotangent works too
    np.testing.assert_allclose(x.grad, 2.0)


def test_one_element_non_scalar_output_gets_implicit_grad():
    x = ma.tensor([[2.0]], requires_grad=True)
    (x * x).backward()
    np.testing.assert_allclose(x.grad, [[4.0]])


# ----------------------------------------------------------------------------- grad mode


def test_no_grad_builds_no_graph():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    with ma.no_grad():
        assert not ma.is_grad_enabled()
        out = x * 2.0
    assert ma.is_grad_enabled()
    assert not out.requires_grad and out.is_leaf
    assert out._ctx is not None and out._ctx.parents == ()  # ctx kept for extra results
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_no_grad_as_decorator_and_nested_and_on_error():
    @ma.no_grad()
    def double(t):
        assert not ma.is_grad_enabled()
        return t * 2.0

    x = ma.tensor([1.0], requires_grad=True)
    assert not double(x).requires_grad
    assert ma.is_grad_enabled()

    with ma.no_grad():
        with ma.no_grad():
            pass
        assert not ma.is_grad_enabled()  # the inner exit restored "off", not "on"
    with pytest.raises(KeyError):
        with ma.no_grad():
            raise KeyError("boom")
    assert ma.is_grad_enabled()


def test_grad_mode_is_per_thread():
    seen = []
    with ma.no_grad():
        worker = threading.Thread(target=lambda: seen.append(ma.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


# ----------------------------------------------------------------------------- dtypes


def test_float32_stays_float32():
    x = ma.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    out = (2.0 - x * 3.0 + 1 / (x + 0.5)) ** 2 / 4.0
    out = (out.exp().log().tanh().sigmoid() + out.softmax() + out.log_softmax()).mean()
    assert out.dtype == np.float32
    out.backward()
    assert x.grad.dtype == np.float32


def test_float32_grad_stays_float32_even_when_an_op_upcasts_its_gradient():
    x = ma.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    (2.5**x).sum().backward()  # d/dx uses np.log(2.5), a float64 NumPy scalar
    assert x.grad.dtype == np.float32


def test_python_floats_become_float64_and_integers_stay_integer():
    assert ma.tensor([1.0, 2.0]).dtype == np.float64
    ints = ma.tensor([1, 2, 3])
    assert np.issubdtype(ints.dtype, np.integer)
    assert np.issubdtype((ints + 1).dtype, np.integer)
    assert np.issubdtype((ints * ints).dtype, np.integer)
    assert ma.tensor([1, 2], dtype=np.float32).dtype == np.float32


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="int"):
        ma.tensor([1, 2, 3], requires_grad=True)
    t = ma.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="int"):
        t.requires_grad = True


# ----------------------------------------------------------------------------- Function


class ScaleAndShift(ma.Function):
    """out = scale * x + shift, with a Python-number scale and an array or Tensor shift."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(x)
        ctx.scale = scale  # a plain attribute
        return scale * x + shift

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        assert isinstance(x, np.ndarray)
        # forward: out = scale * x + shift  ->  dx = scale * grad, dshift = grad
        dshift = grad if ctx.needs_input_grad[2] else None
        return ctx.scale * grad, None, dshift


def test_user_function_with_saved_tensors_attributes_and_none_gradients():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    shift = ma.tensor([10.0, 20.0], requires_grad=True)
    out = ScaleAndShift.apply(x, 3.0, shift)
    assert out._ctx.needs_input_grad == (True, False, True)
    np.testing.assert_allclose(out.data, [13.0, 26.0])
    out.backward(np.array([1.0, -1.0]))
    np.testing.assert_allclose(x.grad, [3.0, -3.0])
    np.testing.assert_allclose(shift.grad, [1.0, -1.0])
    assert ma.gradcheck(lambda a, s: ScaleAndShift.apply(a, 3.0, s), [x, shift])

    constant_shift = np.array([1.0, 1.0])  # arrays are constants
    y = ma.tensor([1.0, 2.0], requires_grad=True)
    ScaleAndShift.apply(y, 2.0, constant_shift).sum().backward()
    np.testing.assert_allclose(y.grad, [2.0, 2.0])


def test_keyword_arguments_are_options_and_ctx_carries_extra_results():
    class RowNorms(ma.Function):
        @staticmethod
        def forward(ctx, x, *, squared=False):
            ctx.save_for_backward(x)
            ctx.row_max = x.max(axis=-1)  # an extra result other code can read
            return (x * x).sum(axis=-1) if squared else np.sqrt((x * x).sum(axis=-1))

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad[..., None]

    x = ma.tensor([[1.0, 2.0], [3.0, -4.0]], requires_grad=True)
    with ma.no_grad():
        out = RowNorms.apply(x, squared=True)
    np.testing.assert_allclose(out._ctx.row_max, [2.0, 3.0])
    assert ma.gradcheck(lambda t: RowNorms.apply(t, squared=True), [x])


def test_wrong_gradient_count_is_a_clear_error():
    class Forgetful(ma.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a * b

        @staticmethod
        def backward(ctx, grad):
            return grad  # should be two gradients

    a = ma.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Forgetful\.backward returned 1 gradient.*expected 2"):
        Forgetful.apply(a, a).backward()


def test_wrong_gradient_shape_is_a_clear_error():
    class BadShape(ma.Function):
        @staticmethod
        def forward(ctx, a):
            return a.sum()

        @staticmethod
        def backward(ctx, grad):
            return np.ones(7)

    a = ma.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"BadShape\.backward returned a gradient of shape \(7,\)"):
        BadShape.apply(a).backward()


# ----------------------------------------------------------------------------- the Tensor surface


def test_tensor_copies_and_exposes_numpy():
    source = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    t = ma.tensor(source)
    source[0, 0] = 99.0
    assert t.data[0, 0] == 1.0
    assert (t.shape, t.dtype, t.ndim, t.size, len(t)) == ((2, 3), np.float64, 2, 6, 2)
    assert t.T.shape == (3, 2)
    assert np.asarray(t) is t.data and t.numpy() is t.data
    assert np.asarray(t, dtype=np.float32).dtype == np.float32
    assert np.array(t, copy=True) is not t.data
    assert ma.tensor(t).data is not t.data
    assert ma.tensor(2.5).item() == 2.5
    with pytest.raises(TypeError):
        len(ma.tensor(1.0))


def test_detach_shares_data_but_leaves_the_graph():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.is_leaf
    (x * d).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 4.0])


def test_repr():
    assert repr(ma.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert repr(ma.tensor([1.0], dtype=np.float32, requires_grad=True)) == (
        "tensor([1.], dtype=float32, requires_grad=True)"
    )


def test_numpy_arrays_on_the_left_give_tensors():
    x = ma.tensor([1.0, 2.0], requires_grad=True)
    for out in (np.ones(2) + x, np.ones(2) - x, np.ones(2) * x, np.ones(2) / x, np.ones(2) ** x):
        assert isinstance(out, ma.Tensor) and out.requires_grad


def test_comparisons_give_bool_arrays_and_tensors_stay_hashable():
    x = ma.tensor([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(x > 1.5, [False, True, True])
    np.testing.assert_array_equal(x <= ma.tensor([1.0, 0.0, 3.0]), [True, False, True])
    assert x in [x] and len({x, ma.tensor([1.0])}) == 2


def test_package_exports():
    for name in ("Tensor", "tensor", "Function", "no_grad", "is_grad_enabled", "gradcheck",
                 "GradcheckError", "concatenate", "stack", "where"):
        assert hasattr(ma, name), name
    # one version, stated in two places: the package and pyproject.toml
    pyproject = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == ma.__version__


def test_function_with_integer_output_is_not_part_of_the_graph():
    class ArgMax(ma.Function):
        @staticmethod
        def forward(ctx, x):
            return np.argmax(x, axis=-1)

        @staticmethod
        def backward(ctx, grad):
            raise AssertionError("never called")

    x = ma.tensor([[1.0, 3.0], [5.0, 2.0]], requires_grad=True)
    index = ArgMax.apply(x)
    assert not index.requires_grad and index.is_leaf
    np.testing.assert_array_equal(index.data, [1, 0])


def test_scalar_conversions():
    assert bool(ma.tensor([0.0])) is False
    assert float(ma.tensor(2.5)) == 2.5 and int(ma.tensor(3)) == 3
    with pytest.raises(ValueError):
        bool(ma.tensor([1.0, 2.0]))


def test_no_grad_forward_sees_no_input_needing_grad():
    seen = []

    class Probe(ma.Function):
        @staticmethod
        def forward(ctx, a, b):
            seen.append(ctx.needs_input_grad)
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return grad, grad

    x = ma.tensor([1.0], requires_grad=True)
    with ma.no_grad():
        out = Probe.apply(x, x)
    Probe.apply(x, 1.0)
    assert seen == [(False, False), (True, False)]
    assert not out.requires_grad and out._ctx.function is Probe
