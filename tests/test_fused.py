"""microattn.fused: every fused Function against float64 finite differences (gradcheck,
random cotangents) and against its teaching twin built from Tensor ops (nn/layers.py),
forward and backward, float32 and float64; AdamW's fused update against the NumPy one."""

import numpy as np
import pytest

import microattn as ma
from microattn import fused, losses, optim
from microattn.nn import layers

DTYPES = [np.float64, np.float32]
TOLERANCE = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}
# rows and widths off every block and chunk boundary, and one row
SHAPES = [(3, 5), (1, 7), (2, 3, 33)]


@pytest.fixture(autouse=True, params=["serial", "parallel", "split"])
def threads(request, monkeypatch):
    """Every test three times: the kernels' serial twins (small inputs pick them), the
    parallel ones forced on for any size, and the two-thread split (``_two_threads``)."""
    if request.param == "parallel":
        monkeypatch.setattr(fused, "PARALLEL_WORK", 0)
    if request.param == "split":
        monkeypatch.setattr(fused, "SPLIT_WORK", 0)
    return request.param


def rng(seed=0):
    return np.random.default_rng(seed)


def leaves(*arrays, dtype=np.float64):
    return [ma.tensor(np.asarray(a, dtype=dtype), requires_grad=True) for a in arrays]


def compare_with_twin(fused_fn, twin_fn, arrays, dtype, seed=1):
    """Same outputs and the same gradients of <c, out> for a random cotangent c."""
    results = []
    for fn in (fused_fn, twin_fn):
        inputs = leaves(*arrays, dtype=dtype)
        out = fn(*inputs)
        cotangent = rng(seed).standard_normal(out.shape).astype(dtype)
        out.backward(cotangent)
        results.append((out.data, [x.grad for x in inputs]))
    (out, grads), (twin_out, twin_grads) = results
    assert out.dtype == twin_out.dtype == dtype
    np.testing.assert_allclose(out, twin_out, **TOLERANCE[dtype])
    for grad, twin_grad in zip(grads, twin_grads):
        assert grad.dtype == dtype
        np.testing.assert_allclose(grad, twin_grad, **TOLERANCE[dtype])


# ----------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_twin_and_gradchecks(dtype, bias):
    x, w, b = rng().standard_normal((2, 3, 4)), rng(1).standard_normal((5, 4)), rng(2).standard_normal(5)
    if bias:
        compare_with_twin(fused.Linear.apply, layers.linear_composed, [x, w, b], dtype)
        assert ma.gradcheck(fused.Linear.apply, leaves(x, w, b))
    else:
        compare_with_twin(lambda x, w: fused.Linear.apply(x, w, None),
                          lambda x, w: layers.linear_composed(x, w, None), [x, w], dtype)
        assert ma.gradcheck(lambda x, w: fused.Linear.apply(x, w, None), leaves(x, w))


def test_linear_takes_a_non_contiguous_input():
    x = rng().standard_normal((4, 3, 6)).transpose(1, 0, 2)  # (3, 4, 6), strided
    w, b = rng(1).standard_normal((2, 6)), rng(2).standard_normal(2)
    compare_with_twin(fused.Linear.apply, layers.linear_composed, [x, w, b], np.float64)


@pytest.mark.parametrize("rows", [3, 37])  # fewer and more rows than PRODUCT_PARTS
def test_linear_products_split_over_two_threads(rows, monkeypatch):
    monkeypatch.setattr(fused, "THREADED_PRODUCT", 0)  # every product through _split_product
    monkeypatch.setattr(fused, "MIN_PART", 1)  # many blocks: cut by rows (37) and by columns (3)
    monkeypatch.setattr(fused, "FEW_ROWS", 0)
    x, w, b = rng().standard_normal((rows, 6)), rng(1).standard_normal((5, 6)), rng(2).standard_normal(5)
    for dtype in DTYPES:
        compare_with_twin(fused.Linear.apply, layers.linear_composed, [x, w, b], dtype)


def test_linear_backward_pairs_its_two_products_even_with_the_helper_busy(monkeypatch):
    """A large backward computes dx and dweight at once, one on each thread
    (``_two_products``); with the helper thread busy elsewhere this thread computes both
    instead of waiting. Either way the gradients equal the twin's."""
    import threading

    monkeypatch.setattr(fused, "THREADED_PRODUCT", 0)
    x, w, b = rng().standard_normal((9, 6)), rng(1).standard_normal((5, 6)), rng(2).standard_normal(5)
    compare_with_twin(fused.Linear.apply, layers.linear_composed, [x, w, b], np.float64)
    release = threading.Event()
    blocker = fused._product_helper.submit(release.wait)
    try:
        first, second = (x, w.T), (w, w.T)
        got = fused._two_products(first, second)  # would hang if it waited for the helper
    finally:
        release.set()
        blocker.result()
    np.testing.assert_array_equal(got[0], x @ w.T)
    np.testing.assert_array_equal(got[1], w @ w.T)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_twin(shape, dtype):
    x, w, b = rng().standard_normal(shape) * 3 + 1, rng(1).standard_normal(shape[-1]), rng(2).standard_normal(shape[-1])
    compare_with_twin(lambda x, w, b: fused.LayerNorm.apply(x, w, b, eps=1e-5),
                      lambda x, w, b: layers.layer_norm_composed(x, w, b, 1e-5), [x, w, b], dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_twin(shape, dtype):
    x, w = rng().standard_normal(shape) * 3 + 1, rng(1).standard_normal(shape[-1])
    compare_with_twin(lambda x, w: fused.RMSNorm.apply(x, w, eps=1e-6),
                      lambda x, w: layers.rms_norm_composed(x, w, 1e-6), [x, w], dtype)


def test_norms_gradcheck():
    x, w, b = leaves(rng().standard_normal((3, 6)), rng(1).standard_normal(6), rng(2).standard_normal(6))
    assert ma.gradcheck(lambda x, w, b: fused.LayerNorm.apply(x, w, b, eps=1e-5), [x, w, b])
    assert ma.gradcheck(lambda x, w: fused.RMSNorm.apply(x, w, eps=1e-6), [x, w])


def test_norm_parameter_gradients_sum_many_rows_deterministically():
    # more rows than CHUNKS, so several partial sums are combined
    x, w, b = rng().standard_normal((fused.CHUNKS * 3 + 5, 8)), np.ones(8), np.zeros(8)
    compare_with_twin(lambda x, w, b: fused.LayerNorm.apply(x, w, b, eps=1e-5),
                      lambda x, w, b: layers.layer_norm_composed(x, w, b, 1e-5), [x, w, b], np.float64)
    grads = []
    for _ in range(2):
        x_t, w_t, b_t = leaves(x, w, b, dtype=np.float32)
        fused.LayerNorm.apply(x_t, w_t, b_t, eps=1e-5).backward(np.ones(x.shape, np.float32))
        grads.append(w_t.grad)
    assert np.array_equal(grads[0], grads[1])


# ----------------------------------------------------------------------------- activations

ACTIVATIONS = [(fused.gelu, layers.gelu_composed), (fused.silu, layers.silu_composed)]
GATED = [(fused.swiglu, layers.swiglu_composed), (fused.geglu, layers.geglu_composed)]


@pytest.mark.parametrize("fn, twin", ACTIVATIONS, ids=["gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_match_twins(fn, twin, dtype):
    x = np.concatenate([np.linspace(-12, 12, 49), rng().standard_normal(fused.BLOCK + 3)])
    compare_with_twin(fn, twin, [x], dtype)


@pytest.mark.parametrize("fn, twin", GATED, ids=["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_units_match_twins(fn, twin, dtype):
    gate, up = rng().standard_normal((3, 17)) * 4, rng(1).standard_normal((3, 17))
    compare_with_twin(fn, twin, [gate, up], dtype)


@pytest.mark.parametrize("fn", [fused.gelu, fused.silu, fused.swiglu, fused.geglu],
                         ids=["gelu", "silu", "swiglu", "geglu"])
def test_activations_gradcheck(fn):
    n_inputs = 2 if fn in (fused.swiglu, fused.geglu) else 1
    inputs = leaves(*(rng(i).standard_normal((2, 9)) * 3 for i in range(n_inputs)))
    assert ma.gradcheck(fn, inputs)


def test_activations_saturate_without_overflow():
    x = np.array([-1e4, -200.0, -90.0, 90.0, 200.0, 1e4], dtype=np.float32)
    for fn in (fused.gelu, fused.silu):
        y = fn(ma.tensor(x)).data
        np.testing.assert_allclose(y, np.where(x > 0, x, 0), atol=1e-30)


# ----------------------------------------------------------------------------- cross-entropy


def cross_entropy_composed(logits, targets, reduction):
    """-log_softmax(logits)[target], masked, reduced: the twin of fused.cross_entropy."""
    valid = targets != -100
    picked = -logits.log_softmax(axis=-1)[np.arange(len(targets)), np.where(valid, targets, 0)]
    losses_ = picked * valid.astype(logits.dtype)
    if reduction == "none":
        return losses_
    return losses_.sum() if reduction == "sum" else losses_.sum() / float(valid.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_twins(reduction, dtype):
    logits, targets = rng().standard_normal((7, 5)) * 4, np.array([0, 4, -100, 2, 2, 1, 3])
    compare_with_twin(lambda x: fused.cross_entropy(x, targets, reduction=reduction),
                      lambda x: cross_entropy_composed(x, targets, reduction), [logits], dtype)
    compare_with_twin(lambda x: fused.cross_entropy(x, targets, reduction=reduction),
                      lambda x: losses.cross_entropy(x, targets, reduction=reduction), [logits], dtype)


def test_cross_entropy_gradchecks_and_keeps_leading_axes():
    x = leaves(rng().standard_normal((2, 3, 4)))
    targets = np.array([[0, 3, -100], [1, 1, 2]])
    for reduction in ("mean", "sum", "none"):
        assert ma.gradcheck(lambda x: fused.cross_entropy(x, targets, reduction=reduction), x)
    assert fused.cross_entropy(x[0], targets, reduction="none").shape == (2, 3)


def test_cross_entropy_refuses_what_losses_refuses():
    x = ma.tensor(np.zeros((2, 3)))
    for targets, error in ((np.array([0, 3]), ValueError), (np.array([0.0, 1.0]), TypeError),
                           (np.array([0]), ValueError)):
        for fn in (fused.cross_entropy, losses.cross_entropy):
            with pytest.raises(error):
                fn(x, targets)


# ----------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_matches_twin_with_repeated_tokens(dtype):
    weight = rng().standard_normal((7, fused.COLUMNS + 44))  # wider than one task's columns
    tokens = np.array([[1, 3, 3], [0, 6, 1]])
    compare_with_twin(lambda w: fused.Embedding.apply(w, tokens=tokens),
                      lambda w: layers.embedding_composed(w, tokens), [weight], dtype)
    assert ma.gradcheck(lambda w: fused.Embedding.apply(w, tokens=tokens), leaves(weight[:, :4]))


# ----------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_fused_step_matches_numpy_update(dtype):
    shapes = [(fused.BLOCK + 5,), (3, 4), ()]
    twins = []
    for use_fused in (True, False):
        params = [ma.tensor(rng(i).standard_normal(s).astype(dtype), requires_grad=True)
                  for i, s in enumerate(shapes)]
        opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = rng(10 * step + i).standard_normal(p.shape).astype(dtype)
            if use_fused:
                opt.step()
            else:
                optim.Optimizer.step(opt)  # the NumPy update, one parameter at a time
        twins.append((params, opt.state_dict()))
    (fused_params, fused_state), (numpy_params, numpy_state) = twins
    for a, b in zip(fused_params, numpy_params):
        np.testing.assert_allclose(a.data, b.data, **TOLERANCE[dtype])
    for index, entry in numpy_state["state"].items():
        assert fused_state["state"][index]["step"] == entry["step"] == 3
        np.testing.assert_allclose(fused_state["state"][index]["exp_avg_sq"], entry["exp_avg_sq"],
                                   **TOLERANCE[dtype])
