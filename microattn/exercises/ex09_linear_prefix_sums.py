"""Exercise 9: linear attention's causal form by prefix sums.

With a positive feature map phi in place of exp, ``out_i = phi(q_i)^T S_i / (phi(q_i) . z_i
+ eps)`` where ``S_i = sum_{j <= i} phi(k_j) v_j^T`` and ``z_i = sum_{j <= i} phi(k_j)``: the
causal sums are prefix sums over keys, so the cost is linear in N. The learner writes the
states and the output; the grader compares the states with the library's
(``kernels/linear_reference.prefix_states``) and the output with the quadratic masked form
``sum_j (qf_i . kf_j) v_j / (sum_j qf_i . kf_j + eps)`` over the pairs ``masking.in_band``
allows.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from ..kernels import linear_reference
from ..kernels.linear_reference import allowed_pairs, feature_map
from ..kernels.reference import expand_kv
from ..kernels.spec import make_linear_spec
from .grading import Failure, call, compare

NUMBER = 9
SLUG = "linear_prefix_sums"
TITLE = "Linear attention, causal: the key-value state as prefix sums"
FILE = "linear_prefix_sums.py"
READ = "docs/linear-attention.md (\"The maths\")"
HINTS = [
    "Start with the non-causal case: S = np.einsum('bhjd,bhje->bhde', kf, v) and z = kf.sum(axis=2) "
    "are the same for every query. Causal, query i needs the sum over the first keys_seen(spec)[i] "
    "keys only: a prefix sum.",
    "np.cumsum(np.einsum('bhjd,bhje->bhjde', kf, v), axis=2) holds at index t the keys 0..t "
    "(inclusive). Prepend a zero state (index 0: no key) and query i reads index keys_seen(spec)[i]; "
    "that also covers queries that see no key.",
    "Bottom-right alignment: with Nq != Nk, query i sees keys j <= i + (Nk - Nq); keys_seen does that "
    "arithmetic. GQA: expand_kv(S_per_kv_head, spec.group) gives every query head its kv head's state.",
    "out = np.einsum('bhid,bhide->bhie', qf, S) / (np.einsum('bhid,bhid->bhi', qf, z) + spec.eps)"
    "[..., None], with qf = feature_map(q): the denominator is the normaliser, not optional.",
]

# (Hq, Hkv, Nq, Nk, causal)
CASES = [(2, 2, 6, 6, True), (2, 2, 4, 7, True), (2, 2, 7, 4, True), (2, 2, 5, 5, False), (4, 2, 5, 5, True)]
D, DV = 3, 4


def solution():
    return types.SimpleNamespace(prefix_states=linear_reference.prefix_states,
                                 linear_attention=linear_reference.forward)


def check(ns) -> list[str]:
    rng = np.random.default_rng(9)
    done = []
    for Hq, Hkv, Nq, Nk, causal in CASES:
        q = rng.standard_normal((1, Hq, Nq, D))
        k = rng.standard_normal((1, Hkv, Nk, D))
        v = rng.standard_normal((1, Hkv, Nk, DV))
        spec = make_linear_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, causal=causal)
        name = f"Hq={Hq}, Hkv={Hkv}, Nq={Nq}, Nk={Nk}, {'causal' if causal else 'not causal'}"
        kf = feature_map(k)
        S, z = linear_reference.prefix_states(kf, v, spec)
        got = call(ns, "prefix_states", kf.copy(), v.copy(), spec)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failure(f"prefix_states({name}) returned {type(got).__name__}: return the pair (S, z)")
        mistakes = _state_mistakes(kf, v, spec)
        compare(f"S ({name})", got[0], S, rtol=1e-9, atol=1e-12, meaning=mistakes("S"))
        compare(f"z ({name})", got[1], z, rtol=1e-9, atol=1e-12, meaning=mistakes("z"))
        out = call(ns, "linear_attention", q.copy(), k.copy(), v.copy(), spec)
        compare(f"out ({name})", out, _quadratic(q, k, v, spec, allowed_pairs(spec)), rtol=1e-9, atol=1e-12,
                meaning=_out_mistakes(q, k, v, spec))
        done.append(f"S, z and out, {name}")
    return done


def _states_over(kf, v, spec, allowed):
    """(S, z) summed over the pairs of ``allowed`` (Nq, Nk): the quadratic way, O(N^2)."""
    kf_q, v_q = expand_kv(kf, spec.group), expand_kv(v, spec.group)
    S = np.einsum("ij,bhjd,bhje->bhide", allowed.astype(kf.dtype), kf_q, v_q)
    z = np.einsum("ij,bhjd->bhid", allowed.astype(kf.dtype), kf_q)
    return S, z


def _other_masks(spec):
    """(explanation, allowed pairs) of the usual wrong masks."""
    i, j = np.arange(spec.Nq)[:, None], np.arange(spec.Nk)[None, :]
    offset = spec.Nk - spec.Nq
    return [
        ("you summed over every key (total sums): causal query i sees only keys j <= i + (Nk - Nq), "
         "a prefix sum (np.cumsum along the key axis)", np.ones((spec.Nq, spec.Nk), bool)),
        ("off by one: query i does not see its own key (j < i). The prefix of query i includes key "
         "i + (Nk - Nq): an inclusive cumulative sum, or an exclusive one read one index later",
         j < i + offset),
        ("off by one the other way: query i sees one key too many (j <= i + 1)", j <= i + offset + 1),
        ("causal is bottom-right aligned: query i sees keys j <= i + (Nk - Nq), not j <= i", j <= i),
    ]


def _state_mistakes(kf, v, spec):
    def mistakes(which):
        found = []
        for explanation, allowed in _other_masks(spec):
            S, z = _states_over(kf, v, spec, allowed)
            other = S if which == "S" else z
            found.append((lambda got, expected, other=other:
                          np.shape(got) == other.shape and np.allclose(got, other), explanation))
        found.append((lambda got, expected: np.shape(got)[1] == spec.Hkv != spec.Hq,
                      "one state per kv head: every query head needs its own (expand_kv(x, spec.group))"))
        return found
    return mistakes


def _quadratic(q, k, v, spec, allowed, *, features=feature_map, normalise=True):
    """The closed form: out_i = sum_j w_ij v_j / (sum_j w_ij + eps), w_ij = phi(q_i) . phi(k_j)."""
    w = np.einsum("bhid,bhjd->bhij", features(q), expand_kv(features(k), spec.group)) * allowed
    num = np.einsum("bhij,bhje->bhie", w, expand_kv(v, spec.group))
    if not normalise:
        return num
    return num / (w.sum(axis=-1) + spec.eps)[..., None]


def _out_mistakes(q, k, v, spec):
    allowed = allowed_pairs(spec)
    with np.errstate(all="ignore"):
        no_eps = _quadratic(q, k, v, dataclasses.replace(spec, eps=0.0), allowed)

    def same(other):
        return lambda got, expected: np.shape(got) == other.shape and np.allclose(got, other)

    found = [(same(_quadratic(q, k, v, spec, allowed, normalise=False)),
              "you forgot the normaliser: divide phi(q_i)^T S_i by phi(q_i) . z_i + eps"),
             (same(_quadratic(q, k, v, spec, allowed, features=lambda x: x)),
              "q and k went in raw: apply the feature map phi = feature_map to both first")]
    found += [(same(_quadratic(q, k, v, spec, other)), explanation) for explanation, other in _other_masks(spec)]
    found.append((lambda got, expected: bool(np.isnan(got).any()) and bool(np.isnan(no_eps).any()),
                  "a query that sees no key has phi(q_i) . z_i = 0: add spec.eps to the denominator, "
                  "so its out is 0 / eps = 0, not 0 / 0"))
    return found
