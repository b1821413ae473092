"""The lean decoding step: one new token through a transformer block as one compiled call.

A decoding step through the modules is ~85 engine ops per token for the demo's 4-layer
model (norms, projections, reshapes, the attention call, residual adds), each a Python
call, a Tensor and often a NumPy temporary; at E = 256 that bookkeeping costs more than
the arithmetic (the matrix-vector products read the 12.6 MB of weights in ~0.4 ms; the
whole step took ~1.5 ms). Here one ``numba`` function runs a whole ``TransformerBlock``
for one token per sequence, in place on the residual stream::

    h = norm_1(x);  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv;  rope(q, k)
    cache[pos] = k, v;  a = attention(q, cache[:pos + 1]) Wo + bo   (kernels/cpu/decode.py)
    x += post_norm_1(a);  x += post_norm_2(mlp(norm_2(x)))          (post norms: Gemma 2)

reusing the library's own compiled pieces, so each rule is still written once: the norms
and activations are ``fused.py``'s forward kernels, the attention is the decode kernel's
``_decode`` with the spec's records (band, softcap, ...: ``masking.py``'s rules). What is
new here is only the matrix-vector product (``_matvec``: each weight row read once for
all the batch's rows) and the glue. The step runs on the calling thread: on these 2-core
VMs waking numba's workers costs ~0.1 ms per parallel region, more than a product.

When it runs (``applies``; ``lean.ENABLED = False`` switches it off): ``DecoderLM`` and
``models.CausalLM`` take this path for a forward of one token per sequence with KV caches,
no graph to record (``no_grad``), and blocks it understands (``block_reason``: the library's own ``TransformerBlock``,
``MultiHeadAttention`` with "flash" or "window" attention, ``MLP``, ``LayerNorm`` /
``RMSNorm``, no dropout in training mode, on the CPU kernels' backend). Anything else
takes the modules' path, which computes the same thing (tests/test_lean.py compares
the two on every option, and greedy tokens against PyTorch).

Shape legend: B batch, E embed_dim, H query heads, Hkv kv heads, hd head dim, F the MLP's
hidden width; the cache storage is (B, Hkv, capacity, hd) (``KVCache``).
"""

from __future__ import annotations

import numpy as np

from .. import fused
from ..autograd import is_grad_enabled
from ..kernels.cpu import decode
from ..kernels.cpu._compile import FASTMATH, numba
from ..kernels.spec import make_attention_spec
from . import transformer  # the blocks' classes; transformer.py imports this module
from .attention import MultiHeadAttention, _runs_on_cpu_kernels
from .layers import GELU, LayerNorm, ReLU, RMSNorm, SiLU
from .module import Module

ENABLED = True  # False: every forward takes the modules' path (to compare the two, or to debug)
RELU = 2  # beside fused.SILU (0) and fused.GELU (1)
ACTIVATION_KINDS = {SiLU: fused.SILU, GELU: fused.GELU, ReLU: RELU}
GATED_KINDS = {fused.swiglu: fused.SILU, fused.geglu: fused.GELU}
PAIRS = {"interleaved": 0, "halves": 1}  # RoPE's channel pairs (nn/rope.py)
_EMPTY_1D, _EMPTY_2D = {}, {}  # dtype -> (0,) and (0, 0) arrays standing for "absent"
# fused.py's forward kernels, their single-thread twins, as globals the compiled step calls
_layer_norm, _rms_norm = fused._layer_norm_forward.serial, fused._rms_norm_forward.serial
_activation, _gated = fused._activation_forward.serial, fused._gated_forward.serial
_attention = decode._decode_serial


# ----------------------------------------------------------------------------- when it applies


def block_reason(block) -> str | None:
    """None when ``block`` can take the lean step, else what stops it (for tests and docs)."""
    if type(block) is not transformer.TransformerBlock:
        return f"{type(block).__name__} is not a TransformerBlock"
    attn, mlp = block.attn, block.mlp
    if type(attn) is not MultiHeadAttention or attn.attention not in ("flash", "window"):
        return "the attention is not MultiHeadAttention with flash or window attention"
    if not _runs_on_cpu_kernels(attn.backend):
        return f"backend {attn.backend!r} does not run on the CPU kernels"
    if type(mlp) is not transformer.MLP or (mlp.gated is None and type(mlp.activation) not in ACTIVATION_KINDS):
        return "the MLP is not nn.MLP with gelu, silu, relu, swiglu or geglu"
    norms = (block.norm_1, block.norm_2, block.post_norm_1, block.post_norm_2)
    if any(norm is not None and type(norm) not in (LayerNorm, RMSNorm) for norm in norms):
        return "a norm is not nn.LayerNorm or nn.RMSNorm"
    return None


def applies(model, tokens: np.ndarray, kv_caches) -> bool:
    """Whether ``model(tokens, kv_caches)`` takes the lean step: one token per sequence,
    caches, no graph to record, no dropout (eval mode, or p = 0), every block understood."""
    if not ENABLED or kv_caches is None or tokens.shape[1] != 1 or is_grad_enabled():
        return False
    plan = _plan(model)
    return plan.usable and not any(owner.training for owner in plan.dropouts)


class _Plan:
    """What a model's lean step needs besides the arrays' current contents, built once per
    ``Module.generation`` (any module attribute assigned anywhere rebuilds it): whether
    every block is understood, whether a dropout has p > 0, and per block the Parameters
    and numbers ``_BlockPlan.records`` reads. Parameters' ``.data`` are read at every step."""

    def __init__(self, model):
        self.generation = Module.generation
        self.usable = all(block_reason(block) is None for block in model.blocks)
        # the modules whose training flag turns a dropout with p > 0 on: a Dropout's own,
        # the attention's for its probabilities' dropout (MultiHeadAttention._attend)
        owners = [(getattr(model, "dropout", None),) * 2]
        owners += [pair for block in model.blocks
                   for pair in ((block.dropout, block.dropout), (block.attn.attn_dropout, block.attn))]
        self.dropouts = [owner for d, owner in owners if d is not None and d.p > 0]
        if self.usable:
            self.blocks = [_BlockPlan(block) for block in model.blocks]
            self.final = (model.norm, model.lm_head.weight, model.lm_head.bias)


def _plan(model) -> _Plan:
    plan = model.__dict__.get("_lean_plan")
    if plan is None or plan.generation != Module.generation:
        plan = _Plan(model)
        object.__setattr__(model, "_lean_plan", plan)  # not a module attribute: no generation bump
    return plan


class _BlockPlan:
    """One block's Parameters (None where absent) and numbers, in ``_block_step``'s order."""

    def __init__(self, block):
        attn, mlp = block.attn, block.mlp
        self.norms = (block.norm_1, block.norm_2, block.post_norm_1, block.post_norm_2)
        self.norm_eps = tuple(0.0 if n is None else float(n.eps) for n in self.norms)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)
        self.attn_weights = tuple(p.weight for p in projections)
        self.attn_biases = tuple(p.bias for p in projections)
        gate = mlp.fc_gate if mlp.gated is not None else None
        self.mlp_weights = (mlp.fc_in.weight, None if gate is None else gate.weight, mlp.fc_out.weight)
        self.mlp_biases = (mlp.fc_in.bias, None if gate is None else gate.bias, mlp.fc_out.bias)
        self.rope = attn.rope
        activation = GATED_KINDS[mlp.gated] if mlp.gated is not None else ACTIVATION_KINDS[type(mlp.activation)]
        self.ints = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.kinds = (activation, 0 if attn.rope is None else PAIRS[attn.rope.pairs])
        self.spec_key = (attn.scale, attn._window(True), attn.softcap)

    def records(self, dtype, position):
        """The arguments of ``_block_step`` after x and before the cache, for this step."""
        empty = _empty(dtype)
        norm_weights = []
        for norm in self.norms:
            norm_weights.extend(_norm_arrays(norm, empty))
        no_gate = self.mlp_weights[1] is None
        mlp_weights = (_c(self.mlp_weights[0]), _EMPTY_2D[dtype] if no_gate else _c(self.mlp_weights[1]),
                       _c(self.mlp_weights[2]))
        if self.rope is not None:
            theta = self.rope.angles(np.array([position]))[0]  # (hd/2,) float64, as RotaryEmbedding
            rope = (np.cos(theta).astype(dtype), np.sin(theta).astype(dtype))
        else:
            rope = (empty, empty)
        return (tuple(norm_weights), self.norm_eps, tuple(_c(w) for w in self.attn_weights),
                tuple(empty if b is None else _c(b) for b in self.attn_biases), mlp_weights,
                tuple(empty if b is None else _c(b) for b in self.mlp_biases), rope,
                self.ints + (position,) + self.kinds)


def _norm_arrays(norm, empty):
    """(weight, bias): a LayerNorm's own; an RMSNorm's scale (offset + weight) and an empty
    bias, which is how the kernel tells the two apart; no norm: two empty arrays."""
    if norm is None:
        return empty, empty
    if type(norm) is LayerNorm:
        return _c(norm.weight), _c(norm.bias)
    weight = _c(norm.weight)
    return (weight if norm.offset == 0.0 else weight + weight.dtype.type(norm.offset)), empty


# ----------------------------------------------------------------------------- the step


def decode_step(model, x: np.ndarray, caches) -> np.ndarray:
    """Logits (B, V) for one token per sequence, its embedding x (B, E): ``model.blocks``
    (extending ``caches``, one ``KVCache`` per block, all at the same length), then
    ``model.lm_head(model.norm(x))``. One compiled call; x is overwritten."""
    plan = _plan(model)
    position = caches[0].length
    dtype = x.dtype
    specs = {}  # one spec per (scale, window, softcap): the layers usually share one
    layers = []
    B = x.shape[0]
    for block, cache in zip(plan.blocks, caches):
        H, Hkv, hd = block.ints
        k_store, v_store, start = cache.make_room((B, Hkv, 1, hd), (B, Hkv, 1, hd), dtype)
        if start != position:
            raise ValueError(f"the KV caches hold different lengths ({position} and {start})")
        key = block.spec_key
        if key not in specs:
            q_shape, k_shape = (B, H, 1, hd), (B, Hkv, position + 1, hd)
            scale, window, softcap = key
            specs[key] = tuple(make_attention_spec(
                q_shape, k_shape, k_shape, (dtype,) * 3, is_causal=True, scale=scale,
                window=window, softcap=softcap).pack())
        layers.append(block.records(dtype, position) + ((k_store, v_store),) + specs[key])
    norm, lm_weight, lm_bias = plan.final
    norm_weight, norm_bias = _norm_arrays(norm, _empty(dtype))
    final = (norm_weight, norm_bias, float(norm.eps), _c(lm_weight),
             _empty(dtype) if lm_bias is None else _c(lm_bias))
    logits = _decode_step(x, tuple(layers), final)
    for cache in caches:
        cache.length = position + 1
    return logits


def _c(parameter) -> np.ndarray:
    """A Parameter's data as the compiled step takes it: C-contiguous (no copy when it is
    already; one layer's Fortran-order or strided weight would make the layers' tuple
    heterogeneous, which numba cannot index)."""
    return np.ascontiguousarray(parameter.data)


def _empty(dtype) -> np.ndarray:
    """A (0,) array of ``dtype``: an absent bias, post norm or rope table."""
    empty = _EMPTY_1D.get(dtype)
    if empty is None:
        empty = _EMPTY_1D[dtype] = np.empty(0, dtype=dtype)
        _EMPTY_2D[dtype] = np.empty((0, 0), dtype=dtype)
    return empty


# ----------------------------------------------------------------------------- compiled pieces


def _matvec(weight, bias, x, out):
    """out[b] = weight @ x[b] + bias for every row b: weight (n_out, n_in), x (B, n_in),
    out (B, n_out), bias (n_out,) or empty. Each weight row is read once for all B rows."""
    n_out, n_in = weight.shape
    t = x.dtype.type
    for o in range(n_out):
        w = weight[o]
        for b in range(x.shape[0]):
            xb = x[b]
            acc = t(0)
            for i in range(n_in):
                acc += w[i] * xb[i]
            out[b, o] = acc + bias[o] if bias.size else acc


def _norm(x, weight, bias, eps, out):
    """out = the norm of each row of x (B, E): LayerNorm with a bias, RMSNorm without
    (``_norm_arrays``), by ``fused.py``'s forward kernels."""
    rows = x.shape[0]
    stats = np.empty(rows, dtype=x.dtype)
    if bias.size:
        _layer_norm(x, weight, bias, eps, out, np.empty(rows, dtype=x.dtype), stats)
    else:
        _rms_norm(x, weight, eps, out, stats)


def _rope(x, cos, sin, pairs):
    """Rotate each head's channel pairs of x (B, heads, hd) in place, as ``nn.Rotary``."""
    half = cos.shape[0]
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            row = x[b, h]
            for i in range(half):
                ia, ib = (2 * i, 2 * i + 1) if pairs == 0 else (i, i + half)
                xa, xb = row[ia], row[ib]
                row[ia] = xa * cos[i] - xb * sin[i]
                row[ib] = xa * sin[i] + xb * cos[i]


def _block_step(x, norm_weights, norm_eps, attn_weights, attn_biases, mlp_weights, mlp_biases,
                rope, ints, cache, bias, band, dropout, reals, alibi):
    """One token per sequence through one block, x (B, E) updated in place; writes this
    token's k, v at ``position`` of the cache storage (B, Hkv, capacity, hd)."""
    H, Hkv, hd, position, activation, pairs = ints
    B = x.shape[0]
    t = x.dtype.type
    wq, wk, wv, wo = attn_weights
    bq, bk, bv, bo = attn_biases
    k_store, v_store = cache
    h = np.empty_like(x)
    _norm(x, norm_weights[0], norm_weights[1], norm_eps[0], h)
    q = np.empty((B, H * hd), dtype=x.dtype)
    k = np.empty((B, Hkv * hd), dtype=x.dtype)
    v = np.empty((B, Hkv * hd), dtype=x.dtype)
    _matvec(wq, bq, h, q)
    _matvec(wk, bk, h, k)
    _matvec(wv, bv, h, v)
    q4, k3, v3 = q.reshape(B, H, 1, hd), k.reshape(B, Hkv, hd), v.reshape(B, Hkv, hd)
    if rope[0].size:
        _rope(q.reshape(B, H, hd), rope[0], rope[1], pairs)
        _rope(k3, rope[0], rope[1], pairs)
    k_store[:, :, position] = k3
    v_store[:, :, position] = v3
    # attention of the one query per head over the cache's position + 1 keys (one split)
    m_part = np.empty((1, B, H, 1), dtype=x.dtype)
    l_part = np.empty((1, B, H, 1), dtype=x.dtype)
    acc_part = np.empty((1, B, H, 1, hd), dtype=x.dtype)
    _attention(q4, k_store, v_store, position + 1, bias, band, dropout, reals, alibi, 1,
                          m_part, l_part, acc_part)
    a = np.empty((B, H * hd), dtype=x.dtype)
    for b in range(B):
        for head in range(H):
            norm = l_part[0, b, head, 0]
            norm = norm if norm != t(0) else t(1)  # a row with no key: 0, as merge_partials
            for e in range(hd):
                a[b, head * hd + e] = acc_part[0, b, head, 0, e] / norm
    out = np.empty_like(x)
    _matvec(wo, bo, a, out)
    _residual(x, out, norm_weights[4], norm_weights[5], norm_eps[2])
    # the MLP
    _norm(x, norm_weights[2], norm_weights[3], norm_eps[1], h)
    w_in, w_gate, w_out = mlp_weights
    b_in, b_gate, b_out = mlp_biases
    up = np.empty((B, w_in.shape[0]), dtype=x.dtype)
    _matvec(w_in, b_in, h, up)
    hidden = np.empty_like(up)
    if w_gate.size:
        gate = np.empty_like(up)
        _matvec(w_gate, b_gate, h, gate)
        _gated(gate.reshape(-1), up.reshape(-1), activation, hidden.reshape(-1))
    elif activation == RELU:
        for b in range(B):
            for i in range(up.shape[1]):
                hidden[b, i] = max(up[b, i], t(0))
    else:
        _activation(up.reshape(-1), activation, hidden.reshape(-1))
    _matvec(w_out, b_out, hidden, out)
    _residual(x, out, norm_weights[6], norm_weights[7], norm_eps[3])


def _residual(x, branch, post_weight, post_bias, post_eps):
    """x += branch, or x += post_norm(branch) when the block has that post norm."""
    if post_weight.size:
        normed = np.empty_like(branch)
        _norm(branch, post_weight, post_bias, post_eps, normed)
        branch = normed
    for b in range(x.shape[0]):
        for e in range(x.shape[1]):
            x[b, e] += branch[b, e]


def _decode_step(x, layers, final):
    """Every block (``layers``: one ``_block_step`` argument tuple per block, after x),
    then the final norm and the LM head: logits (B, V)."""
    for i in range(len(layers)):
        _block_step(x, *layers[i])
    norm_weight, norm_bias, eps, lm_weight, lm_bias = final
    h = np.empty_like(x)
    _norm(x, norm_weight, norm_bias, eps, h)
    logits = np.empty((x.shape[0], lm_weight.shape[0]), dtype=x.dtype)
    _matvec(lm_weight, lm_bias, h, logits)
    return logits


if numba is not None:
    _compiled = numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
    _matvec, _norm, _rope, _residual = (_compiled(f) for f in (_matvec, _norm, _rope, _residual))
    _block_step, _decode_step = _compiled(_block_step), _compiled(_decode_step)
