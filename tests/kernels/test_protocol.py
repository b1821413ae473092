"""kernels/protocol.py: the check backends.py runs on every kernel module it loads, and lse_of."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from microattn import backends
from microattn.kernels import protocol


def module(**functions):
    return SimpleNamespace(__name__="fake", **functions)


def good_forward(q, k, v, spec):
    return None


def good_backward(q, k, v, out, stats, dout, spec, dlse=None, blocks=(2, 2)):  # extra keywords allowed
    return None


@pytest.mark.parametrize("family", list(backends.FAMILIES))
def test_every_registered_kernel_module_conforms(family):
    for name, module_name in backends.FAMILIES[family].items():
        if module_name is None:
            continue
        import importlib

        protocol.check(importlib.import_module(module_name), backends.PROTOCOLS[family])


def test_a_conforming_module_passes():
    protocol.check(module(forward=good_forward, backward=good_backward), protocol.AttentionKernel)


def test_missing_function_is_named():
    with pytest.raises(TypeError, match=r"fake has no backward\(q, k, v, out, stats, dout, spec, dlse=None\)"):
        protocol.check(module(forward=good_forward), protocol.AttentionKernel)


def test_wrong_parameters_are_shown():
    def old_backward(q, k, v, out, lse, dout, spec, dlse=None):
        return None

    with pytest.raises(TypeError, match=r"fake.backward must take \(q, k, v, out, stats, dout, spec, "
                                        r"dlse=None\), got \(q, k, v, out, lse, dout, spec, dlse\)"):
        protocol.check(module(forward=good_forward, backward=old_backward), protocol.AttentionKernel)


def test_backward_without_dlse_is_refused():
    """A backward that cannot take the gradient reaching lse would silently drop it."""
    def no_dlse(q, k, v, out, stats, dout, spec):
        return None

    def dlse_required(q, k, v, out, stats, dout, spec, dlse):
        return None

    for backward in (no_dlse, dlse_required):
        with pytest.raises(TypeError, match="dlse=None"):
            protocol.check(module(forward=good_forward, backward=backward), protocol.AttentionKernel)


def test_extra_required_parameter_is_refused():
    def needs_more(q, k, v, spec, tiles):
        return None

    with pytest.raises(TypeError, match="forward must take"):
        protocol.check(module(forward=needs_more, backward=good_backward), protocol.AttentionKernel)


def test_hooks_must_be_callable():
    with pytest.raises(TypeError, match="to_host must be callable"):
        protocol.check(module(forward=good_forward, backward=good_backward, to_host=3),
                       protocol.AttentionKernel)


def test_linear_protocol_has_no_stats():
    def forward(q, k, v, spec):
        return None

    def backward(q, k, v, out, dout, spec):
        return None

    protocol.check(module(forward=forward, backward=backward), protocol.LinearKernel)
    with pytest.raises(TypeError):
        protocol.check(module(forward=forward, backward=backward), protocol.AttentionKernel)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lse_of_is_m_plus_log_l_and_minus_inf_on_empty_rows(dtype):
    m = np.array([[[-1e9, 2.0, -np.inf]]], dtype=dtype)
    l = np.array([[[6.0, 1.5, 0.0]]], dtype=dtype)
    lse = protocol.lse_of(np.stack([m, l]))
    assert lse.dtype == dtype
    np.testing.assert_array_equal(lse, np.array([[[dtype(-1e9) + dtype(np.log(6.0)), 2.0 + np.log(dtype(1.5)), -np.inf]]],
                                                 dtype=dtype))
