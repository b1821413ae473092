"""Merging partial softmax results: the one formula behind ``merge_attention_states``,
attention sinks and split-KV decoding.

Two parts of one softmax row, each over its own keys, are each described by their row
statistics ``(m, l)`` (``protocol.py``: ``l = sum_j exp(s_j - m)``, so ``lse = m + log(l)``)
and their normalised output ``out_x = sum_j exp(s_j - m_x) v_j / l_x``. Over all the keys::

    m   = max(m_a, m_b)
    l   = l_a exp(m_a - m) + l_b exp(m_b - m)
    out = w_a out_a + w_b out_b,     w_x = l_x exp(m_x - m) / l       (w_a + w_b = 1)

which is ``lse = log(e^lse_a + e^lse_b)``, ``out = e^(lse_a - lse) out_a + e^(lse_b - lse)
out_b`` written on the statistics. A part with no key (``l_x = 0``, ``m_x = -inf``) weighs
0; when both are empty the merged row is empty too (``m = -inf, l = 0``, both weights 0):
never NaN, unless a NaN came in.

Users of the formula:

* ``functional.merge_attention_states`` (lse form: ``(m, l) = (lse, 1)``, or ``(-inf, 0)``
  for an empty part, :func:`merge_lse`);
* ``sinks.py``: a sink is a key of value 0, i.e. a part with ``(m, l) = (sink, 1)`` and
  ``out = 0``;
* ring attention (``distributed/ring.py``: ``ring_step`` merges each step's block into a
  query chunk's running state);
* the split-KV decode (``cpu/decode.py`` merges its splits the same way; it may call
  :func:`merge_rows` from numba: the function is written with the NumPy calls numba
  compiles, on arrays, with no ``np.errstate``).

Shapes: any broadcastable arrays (per row; the caller multiplies ``out_x`` by ``w_x[...,
None]``).
"""

from __future__ import annotations

import numpy as np


def merge_rows(m_a, l_a, m_b, l_b):
    """(m, l, w_a, w_b): the statistics of two parts of a row merged, and each part's weight.

    m_x, l_x: the parts' shifts and sums (``l_x = 0``: an empty part, whose ``m_x`` is -inf).
    """
    m = np.maximum(m_a, m_b)  # NaN propagates
    shift = np.where(m == -np.inf, np.zeros_like(m), m)  # both parts empty: 0, so no inf - inf
    a = l_a * np.exp(m_a - shift)  # an empty part: 0 * exp(-inf) = 0
    b = l_b * np.exp(m_b - shift)
    l = a + b
    norm = np.where(l == 0, np.ones_like(l), l)  # both empty: weights 0 / 1
    return m, l, a / norm, b / norm


def lse_part(lse):
    """The ``l`` of a part given by its lse alone: 1, or 0 for an empty part (lse -inf)."""
    return (lse > -np.inf).astype(np.result_type(lse))


def merge_lse(lse_a, lse_b):
    """(lse, w_a, w_b) for two parts given by their lse (-inf: an empty part):
    ``lse = log(e^lse_a + e^lse_b)`` (-inf when both are empty), ``w_x = e^(lse_x - lse)``."""
    m, l, w_a, w_b = merge_rows(lse_a, lse_part(lse_a), lse_b, lse_part(lse_b))
    with np.errstate(divide="ignore"):  # l = 0 on a row with both parts empty: lse = -inf
        lse = m + np.log(l)
    return lse, w_a, w_b
