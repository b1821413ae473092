"""The one attention test grid every backend runs (kernel level and through functional).

A ``Case`` names a shape and a masking regime, and optionally the score terms (``softcap``,
``alibi``: ALiBi slopes per head, ``"heads"``, or per batch and head, ``"batch"``);
``make_inputs`` turns it into arrays and keyword arguments for
``scaled_dot_product_attention`` (or ``make_attention_spec``). Sizes are odd on purpose
(1, 7, 37, 113, 203) so no tile ever divides them evenly. ``SCORE_TERMS`` puts softcap and
ALiBi beside GQA, causal, windows, masks, dropout, empty rows and large logits; ``FEATURES``
does the same for the features beside the kernels' own maths: ``sinks`` (one logit per query
head, ``kernels/sinks.py``), packed sequences (``varlen``: ``cu_seqlens_q/k``,
``kernels/varlen.py``) and the user's mods (``mods``: ``mask_mod`` / ``score_mod`` /
``score_mod_grad``, ``kernels/mods.py``). ``grid()`` includes both, so every backend runs them.

A kernel module runs sinks and packed sequences the way ``functional.Attention`` does
(``run_kernel``: the module wrapped in ``varlen.Varlen``, the sinks folded in after its
forward); the oracle (``oracle``) computes them another way: packed sequences as the dense
call with the block-diagonal mask, sinks as one more column of the scores.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np

SIZES = (1, 7, 37, 113, 203)
UNEQUAL = ((7, 37), (37, 7), (1, 203), (203, 113), (113, 1), (37, 203))
HEADS = ((4, 4), (4, 2), (4, 1))  # (Hq, Hkv): MHA, GQA, MQA
WINDOWS = ((0, 0), (3, 0), (16, 16), (40, -1), (-1, 5))

MASKINGS = (
    "none", "causal", "window", "causal+window", "bool_mask", "float_mask",
    "padding_mask", "empty_rows", "dropout", "dropout+causal", "large_logits", "huge_mask",
)
HUGE = (-1e9, "finfo.min", -1e30)  # finite "forbid" values users put in float masks

# -- the user's mods of the grid (kernels/mods.py) --------------------------------------------
#
# One set, also tests/test_mods.py's NUMBA_SET: numba compiles its kernels once per set of mods
# (keyed by the functions themselves, 14-24 s), so every mods case and test_mods share one
# compile. Written with NumPy operators: the reference evaluates them on whole index arrays,
# numba and numba.cuda compile them as they are.

MOD_PREFIX, MOD_SHIFT, MOD_CAP = 4, 2, 2.0


def prefix_lm_holes(b, h, i, j):
    """prefix-LM: keys 0..3 for every query, causal (diagonal shifted by 2) after them; query
    1 + h of batch row 1 sees no key at all (rows that mask_mod alone leaves empty)."""
    return ((j < MOD_PREFIX) | (j <= i + MOD_SHIFT)) & ~((b == 1) & (i == 1 + h))


def capped_relative(score, b, h, i, j):
    """A relative-distance bias, capped: 2 tanh((s - 0.1 |i - j|) / 2)."""
    return MOD_CAP * np.tanh((score - 0.1 * np.abs(i - j)) / MOD_CAP)


def capped_relative_grad(score, b, h, i, j):
    """d capped_relative / d score."""
    return 1.0 - np.tanh((score - 0.1 * np.abs(i - j)) / MOD_CAP) ** 2


MODS = {  # Case.mods -> the sdpa keywords
    "prefix_relative": dict(mask_mod=prefix_lm_holes, score_mod=capped_relative,
                            score_mod_grad=capped_relative_grad),
}


@dataclass(frozen=True)
class Case:
    Nq: int
    Nk: int
    Hq: int = 4
    Hkv: int = 4
    D: int = 8
    Dv: int = 8
    B: int = 2
    masking: str = "none"
    window: tuple | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    softcap: float | None = None  # scaled scores become softcap * tanh(s / softcap)
    alibi: str | None = None  # ALiBi slopes: "heads" (Hq,) or "batch" (B, Hq)
    sinks: bool = False  # one sink logit per query head, (Hq,), one of them -inf (no sink)
    # packed sequences: (query lengths, key lengths), summing to Nq and Nk, with B = 1
    varlen: tuple | None = None
    mods: str | None = None  # a key of MODS: the mask_mod / score_mod / score_mod_grad

    def __post_init__(self):
        if self.varlen is not None:
            q_lengths, k_lengths = self.varlen
            if (sum(q_lengths), sum(k_lengths), self.B) != (self.Nq, self.Nk, 1):
                raise ValueError(f"varlen {self.varlen} must sum to Nq={self.Nq}, Nk={self.Nk}, with B=1")
        if self.mods is not None and self.mods not in MODS:
            raise ValueError(f"mods {self.mods!r} is not one of {sorted(MODS)}")

    @property
    def id(self) -> str:
        w = f"-w{self.window[0]}_{self.window[1]}" if self.window else ""
        terms = (f"-cap{self.softcap:g}" if self.softcap else "") + (
            f"-alibi_{self.alibi}" if self.alibi else "")
        features = ("-sinks" if self.sinks else "") + (
            "-varlen" + "_".join(map(str, self.varlen[0])) + "x" + "_".join(map(str, self.varlen[1]))
            if self.varlen else "") + (f"-mods_{self.mods}" if self.mods else "")
        return (f"{self.masking}{w}{terms}{features}-Nq{self.Nq}-Nk{self.Nk}-H{self.Hq}_{self.Hkv}"
                f"-D{self.D}_{self.Dv}")


# softcap and ALiBi, each beside the other axes (and together): a handful, CI time is budgeted.
# Scores are ~N(0, 1), so a cap of 1-2 bends them; 30 caps the large logits (~300 sqrt(D)).
SCORE_TERMS = (
    Case(37, 37, 4, 2, masking="none", softcap=2.0),
    Case(7, 37, 4, 1, 8, 5, masking="causal", alibi="heads"),
    Case(37, 7, 4, 4, 3, 16, masking="bool_mask", softcap=1.0, alibi="batch"),
    Case(113, 113, 4, 2, masking="window", window=(16, 16), softcap=2.0, alibi="heads"),
    Case(203, 113, 4, 1, 8, 5, masking="float_mask", alibi="batch"),
    Case(37, 37, 4, 2, 8, 5, masking="dropout+causal", softcap=2.0, alibi="heads"),
    Case(37, 7, 4, 2, masking="empty_rows", softcap=2.0, alibi="batch"),
    Case(1, 203, 4, 1, masking="causal+window", window=(40, -1), softcap=1.5, alibi="heads"),
    Case(113, 113, 4, 4, 3, 16, masking="large_logits", softcap=30.0),
)

# sinks, packed sequences and the user's mods, each beside GQA/MQA, causal, windows, bool and
# float masks (huge finite values too), dropout, empty rows and the odd lengths 1, 7, 37 (the
# lengths the CUDA simulator runs), and together. A dozen, small where the simulator paid most
# (it runs each on both rungs in both dtypes): CI time is budgeted, and every mods case uses
# the one set of mods (one numba compile, shared with tests/test_mods.py).
FEATURES = (
    Case(7, 37, 4, 2, 8, 5, masking="dropout+causal", sinks=True),
    Case(37, 7, 4, 1, masking="huge_mask", sinks=True),
    # rows with no key: out 0 and lse = the sink (-inf on the head without one)
    Case(37, 7, 4, 4, 3, 16, masking="empty_rows", sinks=True),
    # a KV prefix, a sequence of keys only, one of a query and no key, one with Nq > Nk
    Case(37, 37, 4, 2, B=1, masking="causal+window", window=(3, 0),
         varlen=((5, 0, 13, 1, 18), (7, 3, 13, 0, 14))),
    Case(7, 37, 4, 1, 8, 5, B=1, masking="dropout", varlen=((1, 2, 4), (12, 1, 24))),
    Case(37, 7, 4, 2, B=1, masking="huge_mask", varlen=((20, 17), (3, 4))),
    Case(37, 37, 2, 1, 8, 5, masking="bool_mask", mods="prefix_relative"),
    # the mods see packed positions: rows of the last sequence that mask_mod leaves empty
    Case(37, 37, 2, 1, B=1, masking="float_mask", varlen=((9, 0, 28), (9, 6, 22)),
         mods="prefix_relative"),
    # queries 0..13 see no key (the window lies left of key 0): out 0, lse = the sink
    Case(37, 7, 4, 1, masking="window", window=(16, 16), sinks=True, mods="prefix_relative"),
    # score_mod sees the capped score; ALiBi is added after it
    Case(7, 7, 4, 2, 3, 16, masking="causal", softcap=2.0, alibi="heads", mods="prefix_relative"),
    Case(37, 37, 4, 2, B=1, masking="causal", softcap=1.5, alibi="batch", sinks=True,
         varlen=((13, 24), (13, 24))),
    Case(1, 1, 4, 2, B=1, sinks=True, varlen=((1,), (1,)), mods="prefix_relative"),
)


def grid(sizes=SIZES, unequal=UNEQUAL, max_n=None) -> list[Case]:
    """The full grid: every length pair meets every masking regime and every window, and
    the ``SCORE_TERMS`` and ``FEATURES`` cases whose lengths are among the pairs.

    Heads, D/Dv and windows rotate through their values so the grid stays a few hundred
    cases while every value meets every other axis somewhere.
    """
    pairs = [(n, n) for n in sizes] + list(unequal)
    if max_n is not None:
        pairs = [(a, b) for a, b in pairs if max(a, b) <= max_n]
    heads = itertools.cycle(HEADS)
    dims = itertools.cycle(((8, 8), (8, 5), (3, 16)))
    cases = []
    for (nq, nk), masking in itertools.product(pairs, MASKINGS):
        windows = WINDOWS if "window" in masking else (None,)
        for window in windows:
            hq, hkv = next(heads)
            d, dv = next(dims)
            cases.append(Case(nq, nk, hq, hkv, d, dv, masking=masking, window=window))
    return cases + [case for case in SCORE_TERMS + FEATURES if (case.Nq, case.Nk) in pairs]


def unsupported(case: Case, module) -> str | None:
    """Why kernel ``module`` cannot run ``case`` at kernel level (None: it can). The one
    exclusion: the user's mods on a module without ``SUPPORTS_MODS`` (the ladder's teaching
    rungs, cpu/decode.py), which would ignore them; ``functional.attend`` never gives such a
    module mods (it runs numba's flash or the reference instead). Sinks and packed sequences
    run on every module (``run_kernel``)."""
    if case.mods and not getattr(module, "SUPPORTS_MODS", False):
        return f"{getattr(module, '__name__', module)} has no mask_mod / score_mod (no SUPPORTS_MODS)"
    return None


def make_inputs(case: Case, dtype=np.float64, seed=0):
    """q, k, v, dout arrays and the sdpa keyword arguments for one case."""
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, Nq, Nk, D, Dv = case.B, case.Hq, case.Hkv, case.Nq, case.Nk, case.D, case.Dv
    q = rng.standard_normal((B, Hq, Nq, D))
    k = rng.standard_normal((B, Hkv, Nk, D))
    v = rng.standard_normal((B, Hkv, Nk, Dv))
    dout = rng.standard_normal((B, Hq, Nq, Dv))
    kwargs: dict = {}
    m = case.masking
    if "causal" in m:
        kwargs["is_causal"] = True
    if "window" in m:
        kwargs["window"] = case.window
    if m == "bool_mask":
        # (B, 1, Nq, Nk): a random pattern, plus one query row allowed nothing at all
        mask = rng.random((B, 1, Nq, Nk)) < 0.7
        mask[0, 0, Nq // 2, :] = False
        kwargs["attn_mask"] = mask
    elif m == "float_mask":
        # (Nq, Nk) additive: finite values, some -inf, one row entirely -inf
        mask = rng.standard_normal((Nq, Nk)) * 2.0
        mask[rng.random((Nq, Nk)) < 0.2] = -np.inf
        mask[-1, :] = -np.inf
        kwargs["attn_mask"] = mask
    elif m == "padding_mask":
        # (B, 1, 1, Nk) key padding: batch 1 sees only its first half of the keys
        mask = np.ones((B, 1, 1, Nk), dtype=bool)
        mask[1, 0, 0, (Nk + 1) // 2:] = False
        kwargs["attn_mask"] = mask
    elif m == "empty_rows":
        # causal with Nq > Nk leaves the first Nq - Nk queries with no key; also a
        # window that lets no key through for rows on the far side
        kwargs["is_causal"] = True
        kwargs["attn_mask"] = np.broadcast_to(np.arange(Nk) % 3 != 1, (Nq, Nk))
    elif m == "huge_mask":
        # Hugging Face style padding masks: huge finite negatives instead of -inf, over whole
        # rows (the row must give the plain average of v, as softmax does) and parts of rows
        mask = rng.standard_normal((Nq, Nk))
        for r, big in enumerate(HUGE):
            value = np.finfo(dtype).min if big == "finfo.min" else big
            row = (r * Nq) // len(HUGE)
            mask[row, :] = value  # the whole row
            mask[(row + 1) % Nq, : (Nk + 1) // 2] = value  # part of the next row
        kwargs["attn_mask"] = mask.astype(dtype)
    if "dropout" in m:
        kwargs["dropout_p"] = 0.3
        kwargs["seed"] = 1234 + seed
    if m == "large_logits":
        q = q * 300.0  # scores of order 300 * sqrt(D): exp would overflow without max-subtraction
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if case.alibi:
        # slopes in (0.02, 0.6) (flash-attention's are 2**(-8h/H)): -slope * distance reaches
        # -100 at 200 keys; the (B, Hq) form has one negative slope (a bias rising with distance)
        slopes = rng.uniform(0.02, 0.6, (B, Hq) if case.alibi == "batch" else (Hq,))
        if case.alibi == "batch":
            slopes[-1, -1] = -0.1
        kwargs["alibi_slopes"] = slopes.astype(dtype)
    if case.sinks:
        sinks = rng.standard_normal(Hq)  # of the size of the scores: p_sink is neither 0 nor 1
        sinks[min(1, Hq - 1)] = -np.inf  # that head has no sink
        kwargs["sinks"] = sinks.astype(dtype)
    if case.varlen:
        kwargs["cu_seqlens_q"], kwargs["cu_seqlens_k"] = (
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) for lengths in case.varlen)
    if case.mods:
        kwargs.update(MODS[case.mods])
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(dout), kwargs


# -- the one error yardstick ------------------------------------------------------------------
#
# Every kernel module (reference rungs, flash variants, CUDA rungs) is judged the same way:
#
# * float64: within 1e-9 of the float64 reference, each output divided by
#   max(max |expected|, its natural scale) -- the size of the terms it is a sum of, so that
#   a result that cancels to ~0 (dq of a one-key row, large logits) is judged by the
#   rounding of its terms, not by its own tiny size;
# * float32: the float64 reference on the same (float32-rounded) inputs is the truth; the
#   kernel must be within 4x the float32 reference's own error, floored at 1e-6;
# * float32 with huge finite masks (-1e9, finfo.min): float64 keeps q.k beside -1e9 where
#   float32 rounds it away (the float32 row is uniform, the float64 row is not), so there is
#   no common truth; the float32 reference (the same rule: p = exp(s - m) / l) is the
#   oracle, within 2e-5;
# * lse: -inf exactly where the reference's is; empty rows give out 0 and dq 0; nothing is
#   NaN (the NaN-input tests below are the only place NaN is expected);
# * the expected values are the ``oracle``'s: the reference kernel, on the dense call with
#   the block-diagonal mask for packed sequences, and a sink column of the scores in plain
#   maths for sinks (whose gradient, dsinks, is judged like the others).

NAMES = ("out", "lse", "dq", "dk", "dv")
SINK_NAMES = NAMES + ("dsinks",)  # with sinks: their gradient (Hq,) too


def build(case: Case, dtype, seed=0):
    """q, k, v, dout and the AttentionSpec of one case."""
    from microattn.kernels.spec import make_attention_spec

    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=seed)
    return q, k, v, dout, make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kwargs)


def run_kernel(module, q, k, v, dout, spec, dlse=None) -> dict:
    """out, lse, dq, dk, dv of one kernel module (the protocol of kernels/protocol.py); its
    backward sees its own forward's out and stats, and ``dlse`` (B, Hq, Nq) or None, the
    gradient reaching lse. Device arrays come back as NumPy.

    As ``functional.attend`` and ``functional.Attention`` run it: packed sequences
    (``spec.cu_seqlens_q``) through ``varlen.Varlen(module)``, sinks folded into the
    forward's out and stats on the host (``sinks.fold``), and then also ``dsinks`` (Hq,)
    (``sinks.grad``)."""
    from microattn.kernels import sinks, varlen
    from microattn.kernels.protocol import lse_of

    kernel = varlen.Varlen(module) if spec.cu_seqlens_q is not None else module
    host = getattr(kernel, "to_host", lambda x: x)
    out, stats = kernel.forward(q, k, v, spec)
    if spec.sinks is not None:  # forward: out', stats' = fold(out, stats, sinks)
        out, stats, p_sink = sinks.fold(host(out), host(stats), spec.sinks)
        device = getattr(kernel, "to_device", lambda x: x)
        grads = kernel.backward(q, k, v, device(out), device(stats), dout, spec, dlse=dlse)
        dsinks = sinks.grad(out, dout, dlse, p_sink)
        return dict(zip(SINK_NAMES, (out, lse_of(stats)) + tuple(host(g) for g in grads) + (dsinks,)))
    grads = kernel.backward(q, k, v, out, stats, dout, spec, dlse=dlse)
    out, stats = host(out), host(stats)
    return dict(zip(NAMES, (out, lse_of(stats)) + tuple(host(g) for g in grads)))


def oracle(q, k, v, dout, spec, dlse=None) -> dict:
    """What ``run_kernel`` must give, computed another way: the NumPy reference on the
    equivalent dense call (packed sequences: :func:`dense_spec`), and with sinks the plain
    maths of a sink column (:func:`sink_maths`) instead of ``sinks.fold`` / ``sinks.grad``.
    The user's mods are the reference's own (evaluated on arrays, ``kernels/mods.py``)."""
    from microattn.kernels import reference

    if spec.cu_seqlens_q is not None:
        spec = dense_spec(spec)
    if spec.sinks is not None:
        return sink_maths(q, k, v, dout, spec, dlse)
    return run_kernel(reference, q, k, v, dout, spec, dlse)


def dense_spec(spec):
    """The dense call a packed one equals (tests/test_varlen.py's oracle): no cu_seqlens,
    every pair of different sequences forbidden, causal and the window bottom-right aligned
    per sequence, and ALiBi's distance each sequence's own -- all in the bias. Dropout and
    the mods see packed positions either way."""
    from microattn.kernels.masking import alibi_bias, in_band

    cu_q, cu_k = spec.cu_seqlens_q, spec.cu_seqlens_k
    terms = np.full((1, spec.Hq, spec.Nq, spec.Nk), -np.inf, dtype=spec.dtype)
    for s in range(len(cu_q) - 1):
        rows, cols = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        nq, nk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        band = (nk - nq, spec.window_left, spec.window_right)  # bottom-right in the sequence
        i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
        block = np.where(in_band(band, i, j), 0.0, -np.inf)  # (nq, nk)
        if spec.has_alibi:
            h = np.arange(spec.Hq)[:, None, None]
            block = block + alibi_bias(spec.alibi, band, 0, h, i, j)  # (Hq, nq, nk)
        terms[0, :, rows, cols] = block
    bias = terms if spec.bias is None else spec.bias + terms  # -inf + a finite value: -inf
    return dataclasses.replace(spec, bias=bias.astype(spec.dtype), causal=False, window_left=-1,
                               window_right=-1, alibi=None, cu_seqlens_q=None, cu_seqlens_k=None)


def sink_maths(q, k, v, dout, spec, dlse=None) -> dict:
    """out, lse, dq, dk, dv and dsinks with each head's sink one more column of the scores
    (value 0): a plain softmax over Nk + 1 columns and its backward written out; the scores
    and their slopes are the reference's (``reference.score_terms``), nothing of sinks.py."""
    from microattn.kernels.reference import dropout_multiplier, expand_kv, reduce_kv, score_terms

    s, slope = score_terms(q, k, spec)  # (B, Hq, Nq, Nk), -inf where forbidden
    sink = np.broadcast_to(spec.sinks[None, :, None, None], s.shape[:3] + (1,))
    scores = np.concatenate([s, sink], axis=-1)  # (B, Hq, Nq, Nk + 1)
    m = scores.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0, m)  # nothing at all in the row: subtract 0
    e = np.exp(scores - m)
    total = e.sum(axis=-1, keepdims=True)
    probs = e / np.where(total == 0, 1, total)  # (B, Hq, Nq, Nk + 1); an empty row: 0
    with np.errstate(divide="ignore"):
        lse = (m + np.log(total))[..., 0]  # -inf where the row has no key and no sink
    p, p_sink = probs[..., :-1], probs[..., -1]
    z = dropout_multiplier(spec)
    p_drop = p if z is None else p * z
    k_all, v_all = expand_kv(k, spec.group), expand_kv(v, spec.group)
    out = np.einsum("bhij,bhjd->bhid", p_drop, v_all)
    # backward: dv = p_drop^T dout; dp = (dout v^T) z; ds = p (dp - delta + dlse) on every
    # column, the sink's dp being 0 (its value is 0)
    dv = np.einsum("bhij,bhid->bhjd", p_drop, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, v_all)
    if z is not None:
        dp = dp * z
    delta = np.einsum("bhid,bhid->bhi", out, dout) - (0 if dlse is None else dlse)
    ds = p * (dp - delta[..., None])
    dsinks = (p_sink * -delta).sum(axis=(0, 2))
    if slope is not None:
        ds = ds * slope
    scale = spec.dtype.type(spec.scale)
    dq = np.einsum("bhij,bhjd->bhid", ds, k_all) * scale
    dk = np.einsum("bhij,bhid->bhjd", ds, q) * scale
    result = (out, lse, dq, reduce_kv(dk, spec.group), reduce_kv(dv, spec.group), dsinks)
    return {name: x.astype(spec.dtype, copy=False) for name, x in zip(SINK_NAMES, result)}


def natural_scales(q, k, v, dout, spec, dlse=None) -> dict:
    """The size of the terms each output is a sum of (ds = p * (dp - delta + dlse))."""
    aq, ak, av, ado = (float(np.abs(x).max()) for x in (q, k, v, dout))
    adlse = 0.0 if dlse is None else float(np.abs(dlse).max(initial=0.0))
    drop = spec.dropout_scale if spec.dropout_p > 0 else 1.0
    return {
        "out": drop * av,
        "lse": 1.0 + spec.scale * aq * ak,
        "dq": spec.scale * ak * (drop * ado * av + adlse),
        "dk": spec.scale * aq * (drop * ado * av + adlse),
        "dv": drop * ado,
        "dsinks": drop * ado * av + adlse,  # dsinks_h = sum p_sink (dlse - delta)
    }


def errors(got: dict, want: dict, scales: dict) -> dict:
    """Normalised max error per output (dsinks too where ``got`` has it); lse compared
    where finite, inf if -inf differs."""
    result = {}
    for name in SINK_NAMES if "dsinks" in got else NAMES:
        a = np.asarray(got[name], dtype=np.float64)
        e = np.asarray(want[name], dtype=np.float64)
        if np.isnan(a).any():
            result[name] = np.inf
            continue
        if name == "lse":
            if not np.array_equal(np.isneginf(a), np.isneginf(e)):
                result[name] = np.inf
                continue
            finite = np.isfinite(e)
            a, e = a[finite], e[finite]
        denominator = max(np.abs(e).max(initial=0.0), scales[name])
        result[name] = np.abs(a - e).max(initial=0.0) / denominator
    return result


def spec_in_float64(spec):
    """The same spec for float64 inputs (the bias goes in as a float64 float mask)."""
    from microattn.kernels.spec import make_attention_spec

    shapes = ((spec.B, spec.Hq, spec.Nq, spec.D), (spec.B, spec.Hkv, spec.Nk, spec.D),
              (spec.B, spec.Hkv, spec.Nk, spec.Dv))
    window = (spec.window_left, spec.window_right) if spec.has_band else None
    alibi = None
    if spec.has_alibi:  # (Ba, Hq) as stored; (1, Hq) was given as (Hq,)
        alibi = spec.alibi[0] if spec.alibi.shape[0] == 1 else spec.alibi
    return make_attention_spec(*shapes, (np.float64,) * 3,
                               attn_mask=None if spec.bias is None else spec.bias.astype(np.float64),
                               dropout_p=spec.dropout_p, seed=spec.seed, scale=spec.scale,
                               window=window, softcap=spec.softcap or None,
                               alibi_slopes=None if alibi is None else alibi.astype(np.float64),
                               sinks=None if spec.sinks is None else spec.sinks.astype(np.float64),
                               cu_seqlens_q=spec.cu_seqlens_q, cu_seqlens_k=spec.cu_seqlens_k,
                               mask_mod=spec.mask_mod, score_mod=spec.score_mod,
                               score_mod_grad=spec.score_mod_grad)


def random_dlse(spec, dtype, seed=0) -> np.ndarray:
    """A gradient reaching lse, (B, Hq, Nq), standard normal."""
    rng = np.random.default_rng(seed + 1000)
    return rng.standard_normal((spec.B, spec.Hq, spec.Nq)).astype(dtype)


# Cases a gradient reaching lse (dlse) is checked on, for every kernel module: GQA, Dv != D,
# masks with empty rows, windows, dropout, huge finite masks.
DLSE_CASES = [
    Case(7, 37, 4, 2, 8, 5, masking="float_mask"),
    Case(37, 37, 4, 1, 3, 16, masking="causal+window", window=(16, 16)),
    Case(37, 7, 4, 4, 8, 8, masking="empty_rows"),
    Case(37, 37, 4, 2, 8, 5, masking="dropout+causal"),
    Case(37, 37, 4, 4, 8, 8, masking="huge_mask"),
    Case(37, 37, 4, 2, 8, 5, masking="causal", sinks=True),  # dlse reaches dsinks too
]


def check_against_reference(module, case: Case, dtype, seed=0, with_dlse=False) -> dict:
    """Run ``module`` on ``case`` and hold it to the yardstick above; returns its errors.
    ``with_dlse``: the backward also gets a random gradient reaching lse (both sides)."""
    q, k, v, dout, spec = build(case, dtype, seed)
    dlse = random_dlse(spec, dtype, seed) if with_dlse else None
    got = run_kernel(module, q, k, v, dout, spec, dlse)
    for name in got:
        assert got[name].dtype == np.dtype(dtype), f"{name} is {got[name].dtype}, not {np.dtype(dtype)}"
    empty = np.isneginf(got["lse"])
    assert (got["out"][empty] == 0).all() and (got["dq"][empty] == 0).all(), \
        "a row that allows no key must give out 0 and dq 0"
    if dtype == np.float64:
        want = oracle(q, k, v, dout, spec, dlse)
        err = errors(got, want, natural_scales(q, k, v, dout, spec, dlse))
        assert max(err.values()) <= 1e-9, err
        return err
    if case.masking == "huge_mask":
        want = oracle(q, k, v, dout, spec, dlse)
        err = errors(got, want, natural_scales(q, k, v, dout, spec, dlse))
        assert max(err.values()) <= 2e-5, err
        return err
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    dlse64 = None if dlse is None else dlse.astype(np.float64)
    spec64 = spec_in_float64(spec)
    truth = oracle(q64, k64, v64, do64, spec64, dlse64)
    scales = natural_scales(q64, k64, v64, do64, spec64, dlse64)
    ours = errors(got, truth, scales)
    ref32 = errors(oracle(q, k, v, dout, spec, dlse), truth, scales)
    for name in ours:
        assert ours[name] <= 4 * max(ref32[name], 1e-6), (name, ours, ref32)
    return ours


def rel_err(actual, expected, floor=0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) (0 when both are 0).

    Linear attention's measure (its own family and protocol): softmax attention is judged
    by the yardstick above."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if np.isnan(actual).any():
        return np.inf
    scale = max(np.abs(expected).max(initial=0.0), floor)
    diff = np.abs(actual - expected).max(initial=0.0)
    if scale == 0.0:
        return diff
    return diff / scale


# -- NaN inputs ------------------------------------------------------------------------------

NAN_SOURCES = ("q", "k", "v")
NAN_CASES = [
    Case(37, 37, 2, 1, B=1),
    Case(37, 37, 2, 1, B=1, masking="causal"),
    Case(37, 37, 2, 2, B=1, masking="window", window=(3, 0)),
    Case(37, 37, 2, 1, B=1, masking="bool_mask"),
    Case(7, 37, 2, 1, B=1, masking="causal"),
    Case(37, 7, 2, 2, B=1, masking="causal"),
]


def nan_inputs(case: Case, dtype, source: str, seed=0):
    """make_inputs with ``source`` ("q", "k" or "v") NaN at one element of (batch 0, head 0,
    the middle row); returns q, k, v, dout, kwargs and that row."""
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=seed)
    x = {"q": q, "k": k, "v": v}[source]
    row = x.shape[2] // 2
    x[0, 0, row, 0] = np.nan
    return q, k, v, dout, kwargs, row


def nan_dependents(allowed, group: int, source: str, row: int) -> dict:
    """Which rows of each output depend on the NaN of :func:`nan_inputs`: those must be NaN.

    allowed (B, Hq, Nq, Nk): the pairs the mask lets through (``reference.allowed_pairs``);
    ``group`` = Hq // Hkv. Returns out, lse, dq as (B, Hq, Nq) and dk, dv as (B, Hkv, Nk)
    boolean arrays. A NaN query or key poisons the softmax of every row that sees it (its
    out, lse and dq, and the dk and dv of every key such a row sees); a NaN value reaches
    the out and dq of the rows that see it and, through delta = rowsum(dO * O), their dk.
    """
    B, Hq, Nq, Nk = allowed.shape
    softmax = np.zeros((B, Hq, Nq), dtype=bool)  # rows whose softmax sees the NaN
    values = np.zeros((B, Hq, Nq), dtype=bool)  # rows whose weighted sum sees it
    if source == "q":
        softmax[0, 0, row] = allowed[0, 0, row].any()
    elif source == "k":
        softmax[0, :group] = allowed[0, :group, :, row]
    else:
        values[0, :group] = allowed[0, :group, :, row]
    out = softmax | values

    def keys_seen_by(rows):  # (B, Hq, Nq) -> (B, Hkv, Nk)
        seen = (allowed & rows[..., None]).any(axis=2)
        return seen.reshape(B, Hq // group, group, Nk).any(axis=2)

    return {"out": out, "lse": softmax, "dq": out, "dk": keys_seen_by(out), "dv": keys_seen_by(softmax)}


def check_nan_propagation(got: dict, clean: dict, must: dict, rtol, source, row):
    """``got`` (name -> array: out, lse, dq, dk, dv, or a subset) from NaN inputs, ``clean``
    from the same inputs with the NaN replaced by 0, ``must`` from :func:`nan_dependents`.

    Every dependent row is NaN (never a silent finite answer). A row that does not depend on
    the NaN may still be NaN (a tile product multiplies it by a probability of 0, as a dense
    matmul does), otherwise it equals the clean result. A NaN query row reaches no other
    row's forward output in any backend: there, the other rows must be finite.
    """
    others = np.ones(must["out"].shape, dtype=bool)  # for a NaN query: every other query row
    if source == "q":
        others[0, 0, row] = False
    for name, x in got.items():
        want = clean[name]
        rows = np.isnan(x).reshape(x.shape[:3] + (-1,)).any(axis=-1)
        missing = must[name] & ~rows
        assert not missing.any(), f"{name}: rows {np.argwhere(missing).tolist()} depend on the NaN but are not NaN"
        finite = ~rows
        np.testing.assert_allclose(x[finite], want[finite], rtol=rtol, atol=rtol, err_msg=name)
        if source == "q" and name in ("out", "lse"):
            assert not (rows & others).any(), f"{name}: a NaN query row reached another row"
