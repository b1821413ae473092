"""Exercises 2-4 (softmax backward, a new Function, the attention backward): the usual
mistakes get the usual diagnosis, and each stub filled in by hand (not by importing the
library) passes, so the stubs are fillable as designed."""

import pytest

from microattn import exercises
from tests.exercises.learner import fails_saying, filled_stub

SOFTMAX = exercises.exercise(2)
FUNCTION = exercises.exercise(3)
ATTENTION = exercises.exercise(4)






# ----------------------------------------------------------------------------- 2, softmax backward

SOFTMAX_RIGHT = "return p * (dy - np.sum(p * dy, axis=axis, keepdims=True))"


def test_softmax_backward_by_hand_passes(tmp_path):
    assert SOFTMAX.check(filled_stub(tmp_path, SOFTMAX, SOFTMAX_RIGHT))


@pytest.mark.parametrize("body, diagnosis", [
    ("return p * dy", "only the diagonal of the Jacobian"),
    ("return p * (dy - np.sum(p * dy, axis=axis))", "you forgot keepdims=True"),
    ("return p * (dy - np.sum(p * dy, axis=-1, keepdims=True))", "you summed over axis 2, not over `axis` (1)"),
    ("return dy - np.sum(p * dy, axis=axis, keepdims=True)", "you forgot the leading factor p"),
])
def test_softmax_backward_mistakes(tmp_path, body, diagnosis):
    fails_saying(SOFTMAX, filled_stub(tmp_path, SOFTMAX, body), "What this usually means: ", diagnosis)


# ----------------------------------------------------------------------------- 3, a new Function

FORWARD = "out = 1 / (1 + np.exp(-a)); ctx.save_for_backward(out); return out"
BACKWARD = "(out,) = ctx.saved_tensors; return grad * out * (1 - out)"


def test_new_function_by_hand_passes(tmp_path):
    assert FUNCTION.check(filled_stub(tmp_path, FUNCTION, FORWARD, BACKWARD))


@pytest.mark.parametrize("forward, backward, fragments", [
    (FORWARD, "(out,) = ctx.saved_tensors; return grad * out", ["dL/da from your backward", "that is grad * out"]),
    ("ctx.save_for_backward(a); return 1 / (1 + np.exp(-a))", "(a,) = ctx.saved_tensors; return grad * a * (1 - a)",
     ["you used the input a where the formula wants out"]),
    ("out = np.exp(a) / (1 + np.exp(a)); ctx.save_for_backward(out); return out", BACKWARD,
     ["(logits up to 745)", "is nan, expected 1", "exp overflowed"]),
    ("out = 1 / (1 + np.exp(-a)); ctx.out = out; return out", "return grad * ctx.out * (1 - ctx.out)",
     ["Sigmoid.forward saved nothing"]),
    (FORWARD, "(out,) = ctx.saved_tensors; grad *= out * (1 - out); return grad", ["changed `grad` in place"]),
    (FORWARD, "raise NotImplementedError", ["`Sigmoid.backward` is not written yet"]),
])
def test_new_function_mistakes(tmp_path, forward, backward, fragments):
    fails_saying(FUNCTION, filled_stub(tmp_path, FUNCTION, forward, backward), *fragments)


# ----------------------------------------------------------------------------- 4, the attention backward

STEPS = {
    "value_grads": "return p.swapaxes(-1, -2) @ dout, dout @ v.swapaxes(-1, -2)",
    "row_delta": "return (out * dout).sum(axis=-1)",
    "score_grads": "return p * (dp - delta[..., None])",
    "query_key_grads": "return scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q",
}


def attention(tmp_path, **wrong):
    return filled_stub(tmp_path, ATTENTION, *({**STEPS, **wrong}[name] for name in STEPS))


def test_attention_backward_by_hand_passes(tmp_path):
    assert len(ATTENTION.check(attention(tmp_path))) == 5
    # the delta of the long form, rowsum(P * dP), is the same number: accepted
    assert ATTENTION.check(attention(tmp_path, score_grads="return p * (dp - (p * dp).sum(-1, keepdims=True))"))


@pytest.mark.parametrize("wrong, fragments", [
    ({"query_key_grads": "return ds @ k, ds.swapaxes(-1, -2) @ q"}, ["dQ (", "you forgot the scale"]),
    ({"query_key_grads": "return scale * ds @ k, scale * ds @ q"}, ["dK (", "transpose dS (keys are its columns)"]),
    ({"score_grads": "return dp - delta[..., None]"}, ["dS (", "no gradient flows through the mask"]),
    ({"score_grads": "return p * dp"}, ["that is P * dP: subtract delta first"]),
    ({"score_grads": "return p * (dp - delta)"}, ["delta[..., None], so row i subtracts delta_i"]),
    ({"value_grads": "return p @ dout, dout @ v.swapaxes(-1, -2)"}, ["dV (", "transpose P"]),
    ({"row_delta": "return (out * dout).sum(axis=-1, keepdims=True)"}, ["delta (", "sum without keepdims"]),
])
def test_attention_backward_mistakes(tmp_path, wrong, fragments):
    fails_saying(ATTENTION, attention(tmp_path, **wrong), *fragments)


def test_attention_stub_runs_as_a_script_once_filled(tmp_path):
    import runpy
    import sys
    from io import StringIO

    attention(tmp_path)
    printed, stdout = StringIO(), sys.stdout
    sys.stdout = printed
    try:
        runpy.run_path(str(tmp_path / ATTENTION.FILE), run_name="__main__")
    finally:
        sys.stdout = stdout
    lines = printed.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["dq", "dk", "dv"]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-12 for line in lines)
