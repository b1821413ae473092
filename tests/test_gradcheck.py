"""gradcheck itself: it passes correct gradients, catches wrong ones (including ones a
``sum()`` cotangent would miss), names the culprit, and leaves inputs as it found them."""

import re

import numpy as np
import pytest

import microattn as ma


def leaf(array):
    return ma.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


class Cube(ma.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # forward: out = x^3  ->  dx = 3 x^2 grad
        return 3 * x**2 * grad


class WrongSecondGradient(ma.Function):
    """out = a * b, but db is off by a factor of two."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, 2 * grad * a


class SoftmaxWithZeroGradient(ma.Function):
    """Right forward, backward returning zeros: the gradient of sum(softmax) is zero too,
    so only a random cotangent can tell."""

    @staticmethod
    def forward(ctx, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    @staticmethod
    def backward(ctx, grad):
        return np.zeros_like(grad)


def test_passes_on_a_correct_function():
    x = leaf(np.random.default_rng(0).standard_normal((3, 2)))
    assert ma.gradcheck(Cube.apply, [x]) is True


def test_names_the_input_element_and_values_of_a_wrong_gradient():
    a, b = leaf([1.0, 2.0, 3.0]), leaf([0.5, -1.0, 4.0])
    with pytest.raises(ma.GradcheckError) as failure:
        ma.gradcheck(WrongSecondGradient.apply, [a, b])
    message = str(failure.value)
    # db is twice what it should be: the worst element is the last (a = 3), and the analytic
    # value reported is twice the numeric one (both times gradcheck's random cotangent)
    assert "input 1" in message and "element (2,)" in message and "tolerance" in message
    analytic, numeric = map(float, re.search(r"analytic (\S+), numeric (\S+),", message).groups())
    assert analytic == pytest.approx(2 * numeric, rel=1e-6) and abs(numeric) > 0.1
    assert isinstance(failure.value, AssertionError)


def test_catches_what_a_sum_cotangent_would_miss():
    x = leaf(np.random.default_rng(1).standard_normal((2, 5)))
    with pytest.raises(ma.GradcheckError, match="input 0"):
        ma.gradcheck(SoftmaxWithZeroGradient.apply, [x])
    # the premise: through sum() the wrong backward is indistinguishable from the right one
    assert ma.gradcheck(lambda x: SoftmaxWithZeroGradient.apply(x).sum(), [x])


def test_leaves_grad_and_data_as_it_found_them():
    fresh = leaf([1.0, 2.0])
    existing = leaf([3.0, 4.0])
    earlier_grad = np.array([7.0, 8.0])
    existing.grad = earlier_grad
    data_before = existing.data.copy()
    assert ma.gradcheck(lambda p, q: p * q, [fresh, existing])
    assert fresh.grad is None
    assert existing.grad is earlier_grad
    np.testing.assert_array_equal(earlier_grad, [7.0, 8.0])
    np.testing.assert_array_equal(existing.data, data_before)


def test_restores_grad_when_it_fails():
    a, b = leaf([1.0]), leaf([2.0])
    with pytest.raises(ma.GradcheckError):
        ma.gradcheck(WrongSecondGradient.apply, [a, b])
    assert a.grad is None and b.grad is None


def test_requires_float64():
    x = ma.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        ma.gradcheck(Cube.apply, [x])


def test_needs_something_to_check():
    with pytest.raises(ValueError, match="requires grad"):
        ma.gradcheck(Cube.apply, [ma.tensor([1.0])])


def test_skips_constant_inputs_and_non_tensors():
    x = leaf([1.0, -2.0])
    constant = ma.tensor([3.0, 4.0])
    assert ma.gradcheck(lambda t, c, k: t * c * k, [x, constant, 2.0])
    assert constant.grad is None


def test_tuple_outputs_are_all_checked():
    x = leaf([0.5, 1.5])
    assert ma.gradcheck(lambda t: (t * 2.0, Cube.apply(t)), [x])

    def second_output_wrong(a, b):
        return a * b, WrongSecondGradient.apply(a, b)

    with pytest.raises(ma.GradcheckError, match="input 1"):
        ma.gradcheck(second_output_wrong, [leaf([1.0, 2.0]), leaf([3.0, 4.0])])


def test_works_inside_no_grad():
    x = leaf([1.0, 2.0])
    with ma.no_grad():
        assert ma.gradcheck(Cube.apply, [x])
        assert not ma.is_grad_enabled()


def test_tolerances_are_honoured():
    class SlightlyOff(ma.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2.001 * grad  # relative error 5e-4

    x = leaf([1.0, 2.0, 3.0])
    assert ma.gradcheck(SlightlyOff.apply, [x], rtol=1e-3)
    with pytest.raises(ma.GradcheckError):
        ma.gradcheck(SlightlyOff.apply, [x], atol=1e-8, rtol=1e-5)
