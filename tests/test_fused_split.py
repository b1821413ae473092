"""microattn.fused's two-thread split (``kernel``, ``_two_threads``): each kernel with
independent rows gives, cut into pieces for this thread and the product helper, exactly
the serial twin's outputs. (tests/test_fused.py runs every fused Function through the
split too, against the twins and gradcheck.)"""

import threading

import numpy as np
import pytest

from microattn import fused

DTYPES = [np.float64, np.float32]


def rng(seed=0):
    return np.random.default_rng(seed)


def split_cases(dtype):
    """(kernel, args, the outputs' positions) for every split kernel, sizes off BLOCK's
    and SPLIT_PARTS' edges."""
    r = rng(4)
    flat = [r.standard_normal(3 * fused.BLOCK + 5).astype(dtype) for _ in range(3)]
    rows = [r.standard_normal((37, 19)).astype(dtype) for _ in range(2)]
    w, b = r.standard_normal(19).astype(dtype), r.standard_normal(19).astype(dtype)
    targets = r.integers(0, 19, 37)
    e, e1, e2 = (np.empty_like(flat[0]) for _ in range(3))
    m37, s37 = np.empty(37, dtype=dtype), np.empty(37, dtype=dtype)
    lse = np.log(np.exp(rows[0]).sum(axis=1)).astype(dtype)
    return [
        (fused._activation_forward, (flat[0], fused.GELU, e), (2,)),
        (fused._activation_backward, (flat[0], flat[1], fused.SILU, e), (3,)),
        (fused._gated_forward, (flat[0], flat[1], fused.GELU, e), (3,)),
        (fused._gated_backward, (flat[0], flat[1], flat[2], fused.SILU, e1, e2), (4, 5)),
        (fused._layer_norm_forward, (rows[0], w, b, 1e-5, np.empty_like(rows[0]), m37, s37), (4, 5, 6)),
        (fused._rms_norm_forward, (rows[0], w, 1e-6, np.empty_like(rows[0]), s37), (3, 4)),
        (fused._cross_entropy_forward, (rows[0], rows[0].max(axis=1), targets, 3, m37, s37), (4, 5)),
        (fused._cross_entropy_backward, (rows[0], targets, 3, lse, rows[1][:, 0].copy(),
                                         np.empty_like(rows[0])), (5,)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(8))
def test_the_two_thread_split_is_bit_identical_to_one_thread(case, dtype, monkeypatch):
    """Every output of a split kernel (pieces on two threads, flat ones cut at BLOCK
    multiples) equals the serial twin's bit for bit, and every element is written."""
    monkeypatch.setattr(fused, "SPLIT_WORK", 0)
    kernel, args, outputs = split_cases(dtype)[case]
    assert kernel.split is not None and all(i in kernel.split for i in outputs)
    kernel.serial(*args)
    expected = [args[i].copy() for i in outputs]
    for i in outputs:
        args[i][...] = np.nan
    kernel(*args, work=1)  # SPLIT_WORK is 0 here: the split
    for i, want in zip(outputs, expected):
        np.testing.assert_array_equal(args[i], want)


def test_nobody_waits_for_a_busy_helper(monkeypatch):
    """The helper thread busy elsewhere: this thread takes every piece and does not wait
    for the helper's (cancelled) task."""
    monkeypatch.setattr(fused, "SPLIT_WORK", 0)
    kernel, args, outputs = split_cases(np.float64)[0]
    release = threading.Event()
    blocker = fused._product_helper.submit(release.wait)
    try:
        kernel(*args, work=1)  # would hang if it waited for its queued task
        expected = args[outputs[0]].copy()
    finally:
        release.set()
        blocker.result()
    kernel.serial(*args)
    np.testing.assert_array_equal(args[outputs[0]], expected)


def _child_product(queue):
    a = np.arange(12.0).reshape(3, 4)
    queue.put(fused._product(a, a.T))  # THREADED_PRODUCT 0 (inherited): on the helper


def test_a_forked_child_still_has_a_product_helper(monkeypatch):
    """After fork the child has no helper thread, though the parent's executor had one
    (started and idle): a product that waits for its block on the helper must not hang."""
    import multiprocessing
    import queue as queues

    monkeypatch.setattr(fused, "THREADED_PRODUCT", 0)
    a = np.arange(12.0).reshape(3, 4)
    expected = fused._product(a, a.T)  # the parent's helper thread is started now
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child_product, args=(results,))
    child.start()
    try:
        got = results.get(timeout=60)
    except queues.Empty:
        got = None
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
    assert got is not None, "the forked child hung waiting for the product helper"
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", ["layer_norm-wider-x", "layer_norm-narrower-x", "layer_norm-short-bias",
                                  "rms_norm-wider-x", "swiglu-short-up", "geglu-broadcast-up"])
def test_inputs_that_do_not_fit_are_an_error_not_a_read_past_an_array(case):
    """The kernels index without bounds checks: a weight shorter than x's last axis, or an
    up shorter than gate, would read past the array's end (garbage, or a crash). The
    composed twins raise on these; the fused Functions must too, naming the shapes."""
    from microattn import Tensor, nn

    x16, x4 = Tensor(np.ones((2, 16))), Tensor(np.ones((2, 4)))
    w8, b8 = np.ones(8), np.zeros(8)
    calls = {
        "layer_norm-wider-x": lambda: fused.LayerNorm.apply(x16, w8, b8, eps=1e-5),
        "layer_norm-narrower-x": lambda: nn.LayerNorm(8, dtype=np.float64)(x4),
        "layer_norm-short-bias": lambda: fused.LayerNorm.apply(x16, np.ones(16), b8, eps=1e-5),
        "rms_norm-wider-x": lambda: nn.RMSNorm(8, dtype=np.float64)(x16),
        "swiglu-short-up": lambda: fused.swiglu(Tensor(np.ones(10)), Tensor(np.ones(4))),
        "geglu-broadcast-up": lambda: fused.geglu(Tensor(np.ones((3, 4))), Tensor(np.ones(4))),
    }
    with pytest.raises(ValueError, match=r"shape"):
        calls[case]()
