"""The lean decoding step: new tokens through every transformer block as one compiled call.

A decoding step through the modules is ~85 engine ops per token for the demo's 4-layer
model (norms, projections, reshapes, the attention call, residual adds), each a Python
call, a Tensor and often a NumPy temporary; at E = 256 that bookkeeping costs more than
the arithmetic (the matrix-vector products read the 12.6 MB of weights in ~0.4 ms; the
whole step took ~1.5 ms). Here one ``numba`` function runs every ``TransformerBlock``, the
final norm and the LM head for T new tokens per sequence (a step, T = 1, or a short
prompt), in place on the residual stream::

    h = norm_1(x);  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv;  rope(q, k)
    cache[pos] = k, v;  a = attention(q, cache[:pos + 1]) Wo + bo   (kernels/cpu/decode.py)
    x += post_norm_1(a);  x += post_norm_2(mlp(norm_2(x)))          (post norms: Gemma 2)

reusing the library's own compiled pieces, so each rule is still written once: the norms
and activations are ``fused.py``'s forward kernels, the attention is the decode kernel's
``_decode`` with the spec's records (band, softcap, ...: ``masking.py``'s rules). What is
new here is the matrix-vector product (``_matvec_rows``: each weight row read once for
all the batch's rows), the glue, and how the products use both cores.

**Two cores without a parallel region.** The step is bound by reading the weights: one
core reads them from L3 at ~30 GB/s on the 2-core VM (12.6 MB a token for the demo's
model, ~0.42 ms), two at ~57 GB/s. numba's ``prange`` cannot share that work here: waking
the workqueue layer's workers costs ~0.12 ms per parallel region on a quiet VM, and the
step has ~30 products of 5-130 us. So each product is a job on a claim board
(``kernels/cpu/team.py``) cut into ``CHUNK`` weight rows: the calling thread publishes it
and claims chunks until none is left, and a helper thread (``_Helper``), spinning while
steps keep coming and asleep after ~1 ms without one, claims chunks too. Nobody waits for
a thread that is not there: a sleeping or descheduled helper claims nothing and the
caller does every chunk, with bit-identical results (each chunk is the same code
whoever claims it).

**A prompt** (T > 1) is the same call: its products are BLAS products of ``BLAS_CHUNK``
weight rows (SciPy's OpenBLAS on one thread, the chunks shared the same way), and its
attention the decode kernel with T queries, causal from the cache's end. That kernel is
one thread's and keeps a row of scores per query, so a prompt is lean only while T x
(cached + T) <= ``MAX_SCORES``; longer ones take the modules and the flash kernel.

**Greedy decoding** (``greedy``) runs the steps themselves in one compiled loop: the
argmax, the next token's embedding and the step, with no Python between tokens (a
Python step costs ~0.1 ms around its 0.4 ms of compiled work). ``generate`` takes it
when the pick is the argmax and nothing streams the tokens out (``on_token``).

When it runs (``applies``; ``lean.ENABLED = False`` switches it off): ``DecoderLM`` and
``models.CausalLM`` take this path for a forward with KV caches (one token per sequence,
or a short prompt), no graph to record (``no_grad``), no dropout active, and blocks it understands
(``block_reason``: the library's own ``TransformerBlock``, ``MultiHeadAttention`` with
"flash" or "window" attention, ``MLP``, ``LayerNorm`` / ``RMSNorm``, on the CPU kernels'
backend; all blocks of one set of widths). Anything else takes the modules' path, which
computes the same thing (tests/test_lean.py compares the two on every option;
benchmarks/compare_e2e.py checks greedy tokens against PyTorch).

Measured (docs/performance.md, "Stop 13" and "Stop 14"): a token of the issue's 4-layer
model after 64 cached tokens 0.54 ms (1.48x PyTorch 2.13's 0.80 ms on the same 2-core
VM), 1.46 ms through the modules; the compiled call alone 0.42 ms, 0.63 ms without the
helper. Its 64-token prompt 3.8 ms (7.8 ms through the modules). Greedy decoding of 64
tokens after it 29.8 ms, 1.83x PyTorch's 54.7 ms.

Shape legend: B batch, T new tokens per sequence, E embed_dim, H query heads, Hkv kv heads,
hd head dim, F the MLP's hidden width; the residual stream is (B * T, E), row b * T + i
for sequence b's token i; the cache storage is (B, Hkv, capacity, hd) (``KVCache``).
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
import time

import numpy as np

from .. import fused
from ..autograd import is_grad_enabled
from ..kernels import blas
from ..kernels.cpu import decode
from ..kernels.cpu._compile import FASTMATH, numba
from ..kernels.cpu.team import (
    ACTIVE,
    STOP,
    atomic_load,
    atomic_store,
    chunk_done,
    claim,
    new_board,
    next_job,
    publish,
    wait_done,
)
from ..kernels.spec import make_attention_spec
from . import transformer  # the blocks' classes; transformer.py imports this module
from .attention import MultiHeadAttention, _runs_on_cpu_kernels
from .layers import GELU, LayerNorm, ReLU, RMSNorm, SiLU
from .module import Module
from .rope import RotaryEmbedding

ENABLED = True  # False: every forward takes the modules' path (to compare the two, or to debug)
GREEDY_CHUNK = 64  # greedy steps per compiled call (Python, and Ctrl-C, between calls)
MAX_SCORES = 128 * 128  # T new tokens after a cache of n: lean while T * (n + T) is at most this
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
    if attn.rope is not None and (type(attn.rope) is not RotaryEmbedding or attn.rope.head_dim != attn.head_dim):
        return "the rope is not a RotaryEmbedding of the heads' head dim"
    if not _runs_on_cpu_kernels(attn.backend):
        return f"backend {attn.backend!r} does not run on the CPU kernels"
    if type(mlp) is not transformer.MLP or (mlp.gated is None and type(mlp.activation) not in ACTIVATION_KINDS):
        return "the MLP is not nn.MLP with gelu, silu, relu, swiglu or geglu"
    norms = (block.norm_1, block.norm_2, block.post_norm_1, block.post_norm_2)
    if any(norm is not None and type(norm) not in (LayerNorm, RMSNorm) for norm in norms):
        return "a norm is not nn.LayerNorm or nn.RMSNorm"
    return None


def applies(model, tokens: np.ndarray, kv_caches) -> bool:
    """Whether ``model(tokens, kv_caches)`` takes the lean step: caches, no graph to
    record, no dropout (eval mode, or p = 0), every block understood, and one new token
    per sequence or a short prompt: T new tokens after n cached ones with T * (n + T) at
    most ``MAX_SCORES`` (the step's attention is one thread's, without tiles; measured on
    the issue's model, a prompt of 128 tokens took 8.7 ms here and 10.7 ms through the
    modules, one of 256 took 28 ms here and 19 ms there)."""
    if not ENABLED or kv_caches is None or is_grad_enabled():
        return False
    T = tokens.shape[1]
    if T != 1 and not (T >= 1 and T * (kv_caches[0].length + T) <= MAX_SCORES):
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
        if self.usable:  # the helper's buffers are shared by the layers: one set of widths
            self.usable = len({_widths(block) for block in model.blocks}) == 1
        # the modules whose training flag turns a dropout with p > 0 on: a Dropout's own,
        # the attention's for its probabilities' dropout (MultiHeadAttention._attend)
        owners = [(getattr(model, "dropout", None),) * 2]
        owners += [pair for block in model.blocks
                   for pair in ((block.dropout, block.dropout), (block.attn.attn_dropout, block.attn))]
        self.dropouts = [owner for d, owner in owners if d is not None and d.p > 0]
        if self.usable:
            self.blocks = [_BlockPlan(block) for block in model.blocks]
            self.final = (model.norm, model.lm_head.weight, model.lm_head.bias)
            norms = [n for block in self.blocks for n in block.norms] + [model.norm]
            self.parameters = [p for p in (
                *(p for n in norms if n is not None for p in (n.weight, getattr(n, "bias", None))),
                *(p for block in self.blocks for p in (*block.matrices, *block.matrix_biases)),
                model.lm_head.weight, model.lm_head.bias) if p is not None]
            self.kept = self.kept_layers = None

    def layers(self, arrays, stores, B, T, length) -> tuple:
        """One ``_block_step`` argument tuple per block (after x, layer, team, board and
        where), kept while the arrays, the caches' storage and (B, T) stay the same and
        the RoPE tables reach ``length`` positions: a step then builds nothing in Python.
        The tables cover a power of two of positions (at least 64), one table for all the
        layers whose RoPE has the same frequencies."""
        kept = self.kept_layers
        flat = [a for pair in stores for a in pair]
        if (kept is None or kept[0] is not arrays or kept[1] != (B, T) or kept[3] < length
                or not all(map(operator.is_, flat, kept[2]))):
            dtype = arrays.dtype
            span = max(64, 1 << (length - 1).bit_length())
            specs, tables = {}, {}  # the layers usually share one spec and one RoPE table
            layers = []
            for block, norms, store in zip(self.blocks, arrays.norms, stores):
                if block.spec_key not in specs:
                    specs[block.spec_key] = block.spec(B, T, dtype)
                layers.append(block.records(norms, dtype, span, tables) + (store,) + specs[block.spec_key])
            reach = span if tables else float("inf")
            kept = self.kept_layers = (arrays, (B, T), flat, reach, tuple(layers))
        return kept[4]

    def arrays(self, dtype) -> _Arrays:
        """The step's weight arrays, kept from the last step while every Parameter's
        ``.data`` is still the same array (and nothing had to be derived from one)."""
        datas = [p.data for p in self.parameters]
        kept = self.kept
        if (kept is None or not kept.reusable or kept.dtype != dtype
                or not all(map(operator.is_, datas, kept.datas))):
            kept = self.kept = _Arrays(self, datas, dtype)
        return kept


class _Arrays:
    """A plan's arrays as the compiled step takes them: per block the norms' (weight, bias)
    pairs, the matrices and their biases; the final norm and the LM head. ``reusable``
    when each is a Parameter's ``.data`` itself (no contiguous copy, no RMSNorm offset
    added), so that an in-place update of a parameter is seen by the next step."""

    def __init__(self, plan, datas, dtype):
        self.datas, self.dtype = datas, dtype
        empty = _empty(dtype)
        self.weights = tuple(block.weights(dtype) for block in plan.blocks)
        self.biases = tuple(block.biases(dtype) for block in plan.blocks)
        self.embed_dim = E = self.weights[0][O].shape[0]  # _team checks the matrices against it
        self.norms = []
        for block in plan.blocks:
            pairs = []
            for norm in block.norms:
                pairs.extend(_norm_arrays(norm, empty, E))
            self.norms.append(tuple(pairs))
        norm, lm_weight, lm_bias = plan.final
        self.final = (*_norm_arrays(norm, empty, E), float(norm.eps))
        self.head = (_c(lm_weight, dtype), empty if lm_bias is None else _c(lm_bias, dtype))
        used = [a for group in (*self.norms, *self.weights, *self.biases, self.final[:2], self.head)
                for a in group if a.size]
        identities = {id(d) for d in datas}
        self.reusable = all(id(a) in identities for a in used)


def _widths(block) -> tuple:
    """The sizes a block's step buffers take (heads, kv heads, head dim, MLP width, gated)."""
    attn, mlp = block.attn, block.mlp
    return (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.embed_dim,
            mlp.fc_in.out_features, mlp.gated is not None)


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
        gate = mlp.fc_gate if mlp.gated is not None else None
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc_in, gate, mlp.fc_out)
        self.matrices = tuple(None if p is None else p.weight for p in linears)  # Q ... FC_OUT
        self.matrix_biases = tuple(None if p is None else p.bias for p in linears)
        self.rope = attn.rope
        activation = GATED_KINDS[mlp.gated] if mlp.gated is not None else ACTIVATION_KINDS[type(mlp.activation)]
        self.ints = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.kinds = (activation, 0 if attn.rope is None else PAIRS[attn.rope.pairs])
        self.spec_key = (attn.scale, attn._window(True), attn.softcap)

    def records(self, norms, dtype, span, tables):
        """The arguments of ``_block_step`` after ``where`` and before the cache: the
        norms' arrays (``_Arrays``), rope's (cos, sin) (span, hd/2) for positions 0 to
        span - 1 (from ``tables``, by frequencies, or added there), the integers."""
        if self.rope is not None:  # float64 angles, as RotaryEmbedding, then cast
            key = (self.rope.inv_freq.tobytes(), self.rope.inv_freq.shape)
            if key not in tables:
                theta = self.rope.angles(np.arange(span))
                tables[key] = (np.cos(theta).astype(dtype), np.sin(theta).astype(dtype))
            rope = tables[key]
        else:
            _empty(dtype)
            rope = (_EMPTY_2D[dtype], _EMPTY_2D[dtype])
        return norms, self.norm_eps, rope, self.ints + self.kinds

    def spec(self, B, T, dtype) -> tuple:
        """The attention's records (``AttentionSpec.pack``) for T queries against T keys,
        causal: an empty cache. After ``position`` cached keys the band's offset (the
        spec's Nk - Nq) grows by ``position``; ``_block_step`` adds it."""
        H, Hkv, hd = self.ints
        scale, window, softcap = self.spec_key
        return tuple(make_attention_spec(
            (B, H, T, hd), (B, Hkv, T, hd), (B, Hkv, T, hd), (dtype,) * 3, is_causal=True,
            scale=scale, window=window, softcap=softcap).pack())

    def weights(self, dtype):
        """The seven matrices in MATRICES order (an absent gate: a (0, 0) array)."""
        _empty(dtype)  # makes _EMPTY_2D[dtype]
        return tuple(_EMPTY_2D[dtype] if w is None else _c(w, dtype) for w in self.matrices)

    def biases(self, dtype):
        return tuple(_empty(dtype) if b is None else _c(b, dtype) for b in self.matrix_biases)


def _norm_arrays(norm, empty, E):
    """(weight, bias): a LayerNorm's own; an RMSNorm's scale (offset + weight) and an empty
    bias, which is how the kernel tells the two apart; no norm: two empty arrays.
    ValueError unless each is (E,) (the compiled norms read them unchecked)."""
    if norm is None:
        return empty, empty
    for name in ("weight", "bias") if type(norm) is LayerNorm else ("weight",):
        shape = getattr(norm, name).shape
        if shape != (E,):
            raise ValueError(f"{type(norm).__name__}'s {name} of shape {shape} does not fit "
                             f"embed_dim {E}: expected shape ({E},)")
    if type(norm) is LayerNorm:
        return _c(norm.weight, empty.dtype), _c(norm.bias, empty.dtype)
    weight = _c(norm.weight, empty.dtype)
    return (weight if norm.offset == 0.0 else weight + weight.dtype.type(norm.offset)), empty


# ----------------------------------------------------------------------------- the step


def decode_step(model, x: np.ndarray, caches) -> np.ndarray:
    """Logits (B, T, V) for T new tokens per sequence, their embeddings x (B, T, E):
    ``model.blocks`` (causal, after what ``caches`` hold, extending them: one ``KVCache``
    per block, all at the same length), then ``model.lm_head(model.norm(x))``. One
    compiled call; x is overwritten."""
    plan = _plan(model)
    position = caches[0].length
    dtype = x.dtype
    B, T, E = x.shape
    arrays = plan.arrays(dtype)
    if E != arrays.embed_dim:
        raise ValueError(f"embeddings of shape {x.shape} do not fit embed_dim {arrays.embed_dim}")
    layers = plan.layers(arrays, _room(plan, caches, B, T, dtype), B, T, position + T)
    rows = x.reshape(B * T, E)  # a view: x is contiguous
    blas_pin = blas.single_threaded() if B * T > MATVEC_ROWS else contextlib.nullcontext()
    with _HELPER.step(arrays.weights, arrays.biases, arrays.head, B * T, dtype) as (team, board), blas_pin:
        logits = _decode_step(rows, layers, arrays.final, team, board, (position, T))
    for cache in caches:
        cache.length = position + T
    return logits.reshape(B, T, -1)


def greedy(model, first: np.ndarray, caches, count: int, embedding) -> np.ndarray:
    """The ``count`` greedy tokens (B, count) int64 after ``first`` (B, 1): ``count``
    lean steps in compiled calls of ``GREEDY_CHUNK`` steps (between them Python runs, so
    Ctrl-C stops a long generation, the caches holding what was decoded), each feeding
    the last token and taking the argmax of its logits (first index of the maximum, as
    ``np.argmax``), extending ``caches`` by ``count``. ``embedding`` = (table (vocab, E),
    positions (max_len, E) or None, scale): a token's input is table[token] * scale +
    positions[its position]. The caller checks ``applies`` and that positions and ids
    stay in range; the logits are the ones ``decode_step`` gives, so the tokens are
    those of ``count`` calls of it."""
    plan = _plan(model)
    table, positions, scale = embedding
    position, dtype = caches[0].length, table.dtype
    if positions is None:
        _empty(dtype)
        positions = _EMPTY_2D[dtype]
    positions = np.ascontiguousarray(positions, dtype=dtype)  # no copy when it is already
    B, E = first.shape[0], table.shape[1]
    arrays = plan.arrays(dtype)
    if E != arrays.embed_dim or positions.shape[1:] not in ((0,), (E,)):
        raise ValueError(f"an embedding table of shape {table.shape} (positions {positions.shape}) "
                         f"does not fit embed_dim {arrays.embed_dim}")
    layers = plan.layers(arrays, _room(plan, caches, B, count, dtype), B, 1, position + count)
    tokens = np.empty((B, count + 1), dtype=np.int64)
    tokens[:, 0] = first[:, 0]
    x = np.empty((B, E), dtype=dtype)
    done = 0
    with _HELPER.step(arrays.weights, arrays.biases, arrays.head, B, dtype) as (team, board):
        while done < count:
            n = min(GREEDY_CHUNK, count - done)
            _greedy(x, layers, arrays.final, team, board, position + done, table, positions,
                    dtype.type(scale), tokens[:, done : done + n + 1])
            done += n
            for cache in caches:
                cache.length = position + done
    return tokens[:, 1:]


def _room(plan, caches, B, T, dtype) -> list:
    """Every cache's (k, v) storage with room for T more tokens (``KVCache.make_room``);
    ValueError if the caches hold different lengths."""
    _, Hkv, hd = plan.blocks[0].ints  # every block's (_Plan: one set of widths)
    position = caches[0].length
    stores = []
    for cache in caches:
        k_store, v_store, start = cache.make_room((B, Hkv, T, hd), (B, Hkv, T, hd), dtype)
        if start != position:
            raise ValueError(f"the KV caches hold different lengths ({position} and {start})")
        stores.append((k_store, v_store))
    return stores


class _Helper:
    """The second thread of the lean step: it joins the products through a claim board
    (``kernels/cpu/team.py``) while steps keep coming, and sleeps after ``IDLE_SPINS``
    spin steps (about a millisecond: ~10 ns a step here; longer than the gaps between a
    prompt's products, ~0.25 ms for its attention) without a job. The step never waits for it: a
    sleeping helper is woken at the start of a step and joins whatever jobs are left.

    It works on one ``team``: the weights, biases, LM head and the buffers the two threads
    share. A step whose arrays differ (another model, new parameter arrays, another batch
    size) first asks the helper out (STOP), then hands it the new team. One step at a time
    uses it; a step from another thread meanwhile runs alone on a board of its own.
    """

    IDLE_SPINS = 100_000

    def __init__(self):
        self.board = new_board()
        self.lock = threading.Lock()  # guards team and the helper's entry
        self.busy = threading.Lock()  # one step at a time
        self.wake = threading.Event()
        self.team = None
        self.thread = None

    @contextlib.contextmanager
    def step(self, weights, biases, head, rows, dtype):
        """(team, board) for one step; the helper is woken if it sleeps."""
        if numba.get_num_threads() < 2 or not self.busy.acquire(blocking=False):
            yield _team(weights, biases, head, rows, dtype), new_board()
            return
        try:
            with self.lock:
                if self.team is None or not _same_arrays(self.team, weights, biases, head, rows):
                    self._stop()
                    self.team = _team(weights, biases, head, rows, dtype)
                team = self.team
                if self.thread is None:
                    self.thread = threading.Thread(target=self._serve, name="microattn-lean-helper",
                                                   daemon=True)
                    self.thread.start()
                if not self.board[ACTIVE]:
                    self.wake.set()
            yield team, self.board
        finally:
            self.busy.release()

    def _stop(self):
        """Ask the helper out of its compiled loop and wait until it is out (with the lock
        held: it does not take the lock to leave)."""
        self.board[STOP] = 1
        while self.board[ACTIVE]:
            time.sleep(0)
        self.board[STOP] = 0

    def _serve(self):
        while True:
            self.wake.wait()
            with self.lock:
                self.wake.clear()
                team = self.team
                if team is None:
                    continue
                self.board[ACTIVE] = 1
            try:
                _serve(self.board, team, self.IDLE_SPINS)  # returns with ACTIVE = 0
            except BaseException:  # e.g. numba cannot compile it for these arrays: leave, and
                with self.lock:  # let a later step start a helper (nobody waits for this one)
                    self.board[ACTIVE] = 0
                    self.team = self.thread = None
                raise
            with self.lock:
                if not self.wake.is_set():
                    self.team = None  # asleep: hold no model's arrays
            team = None


_HELPER = _Helper()


def _forget_helper_after_fork():
    """A forked child has no helper thread, whatever the parent's board says: start over."""
    global _HELPER
    _HELPER = _Helper()


os.register_at_fork(after_in_child=_forget_helper_after_fork)


def _team(weights, biases, head, rows, dtype):
    """(weights, biases, lm_weight, lm_bias, bufs): the arrays the compiled step and the
    helper share; bufs are the step's buffers (see the compiled pieces). ValueError when
    the layers' matrices do not fit one another (the compiled loops trust the shapes)."""
    w = weights[0]
    E, F = w[O].shape[0], w[FC_IN].shape[0]
    expected = {Q: (w[Q].shape[0], E), K: (w[K].shape[0], E), V: (w[K].shape[0], E),
                O: (E, w[Q].shape[0]), FC_IN: (F, E), FC_GATE: (F, E), FC_OUT: (E, F)}
    for layer, (matrices, vectors) in enumerate(zip(weights, biases)):
        for m, shape in expected.items():
            if m == FC_GATE and matrices[m].size == 0:
                continue
            if matrices[m].shape != shape or vectors[m].size not in (0, shape[0]):
                raise ValueError(f"layer {layer}: matrix {m} of shape {matrices[m].shape} (bias "
                                 f"{vectors[m].shape}) does not fit the model's {shape}")
    if head[0].ndim != 2 or head[0].shape[1] != E or head[1].size not in (0, head[0].shape[0]):
        raise ValueError(f"lm_head of shape {head[0].shape} does not fit embed_dim {E}")
    widths = {H_BUF: E, Q_BUF: w[Q].shape[0], K_BUF: w[K].shape[0], V_BUF: w[V].shape[0],
              A_BUF: w[O].shape[1], O_BUF: E, UP_BUF: F, GATE_BUF: F, HIDDEN_BUF: F, MLP_BUF: E,
              LOGITS_BUF: head[0].shape[0]}
    bufs = tuple(np.empty((rows, widths[i]), dtype=dtype) for i in range(len(widths)))
    return weights, biases, head[0], head[1], bufs


def _same_arrays(team, weights, biases, head, rows) -> bool:
    old_weights, old_biases, lm_weight, lm_bias, bufs = team
    if bufs[0].shape[0] != rows or lm_weight is not head[0] or lm_bias is not head[1]:
        return False
    if old_weights is weights and old_biases is biases:  # a plan's kept arrays (_Arrays)
        return True
    return (len(old_weights) == len(weights)
            and all(a is b for old, new in zip(old_weights, weights) for a, b in zip(old, new))
            and all(a is b for old, new in zip(old_biases, biases) for a, b in zip(old, new)))


def _c(parameter, dtype) -> np.ndarray:
    """A Parameter's data as the compiled step takes it: C-contiguous and of the step's
    dtype (no copy when it is already; one layer's Fortran-order or strided weight would
    make the layers' tuple heterogeneous, which numba cannot index, and the step is
    compiled for one dtype: a float32 LM head in a float64 model is cast, as NumPy
    promotes it on the modules' path)."""
    return np.ascontiguousarray(parameter.data, dtype=dtype)


def _empty(dtype) -> np.ndarray:
    """A (0,) array of ``dtype``: an absent bias, post norm or rope table."""
    empty = _EMPTY_1D.get(dtype)
    if empty is None:
        empty = _EMPTY_1D[dtype] = np.empty(0, dtype=dtype)
        _EMPTY_2D[dtype] = np.empty((0, 0), dtype=dtype)
    return empty


# ----------------------------------------------------------------------------- compiled pieces
#
# The products are jobs on a claim board (kernels/cpu/team.py), cut into CHUNK weight rows:
# the step's own thread does every chunk nobody else claims; the helper thread, when it is
# awake, claims chunks too. A job is ``layer * 8 + matrix``; the team tuple holds
# (weights, biases) per layer in MATRICES order, the LM head, and the step's buffers, which
# both threads read and write: matrix m reads bufs[READS[m]] and writes bufs[WRITES[m]].

Q, K, V, O, FC_IN, FC_GATE, FC_OUT, HEAD = range(8)  # the matrices
H_BUF, Q_BUF, K_BUF, V_BUF, A_BUF, O_BUF, UP_BUF, GATE_BUF, HIDDEN_BUF, MLP_BUF, LOGITS_BUF = range(11)
READS = (H_BUF, H_BUF, H_BUF, A_BUF, H_BUF, H_BUF, HIDDEN_BUF, H_BUF)
WRITES = (Q_BUF, K_BUF, V_BUF, O_BUF, UP_BUF, GATE_BUF, MLP_BUF, LOGITS_BUF)
CHUNK = 32  # weight rows per chunk: 32 KB of a 256-wide float32 matrix, a few microseconds
MATVEC_ROWS = 8  # up to this many input rows (B * T) a chunk is matrix-vector products ...
BLAS_CHUNK = 128  # ... beyond, one BLAS product of this many weight rows (a prompt's)


def _chunk_rows(rows):
    """Weight rows per chunk for a product of ``rows`` input rows."""
    return CHUNK if rows <= MATVEC_ROWS else BLAS_CHUNK


def _matvec_rows(weight, bias, x, out, lo, hi):
    """out[b, o] = weight[o] . x[b] + bias[o] for rows lo <= o < hi and every b: weight
    (n_out, n_in), x (B, n_in), out (B, n_out), bias (n_out,) or empty. Each weight row is
    read once for all B rows."""
    t = x.dtype.type
    for o in range(lo, hi):
        w = weight[o]
        for b in range(x.shape[0]):
            xb = x[b]
            acc = t(0)
            for i in range(w.shape[0]):
                acc += w[i] * xb[i]
            out[b, o] = acc + bias[o] if bias.size else acc


def _weight(team, job):
    weights, biases, lm_weight, lm_bias, _ = team
    layer, m = job // 8, job % 8
    if m == HEAD:
        return lm_weight, lm_bias
    return weights[layer][m], biases[layer][m]


def _take_chunks(board, team, seq, n, job):
    """Claim and compute chunks of job ``seq`` until none is left (owner and helper)."""
    bufs = team[4]
    weight, bias = _weight(team, job)
    m = job % 8
    x, out = bufs[READS[m]], bufs[WRITES[m]]
    size = _chunk_rows(x.shape[0])
    while True:
        chunk = claim(board, seq, n)
        if chunk < 0:
            return
        lo, hi = chunk * size, min((chunk + 1) * size, weight.shape[0])
        if x.shape[0] <= MATVEC_ROWS:
            _matvec_rows(weight, bias, x, out, lo, hi)
        else:  # (rows, E) @ (E, hi - lo): BLAS (SciPy's OpenBLAS, pinned to one thread)
            part = np.dot(x, weight[lo:hi].T)
            for r in range(x.shape[0]):
                for o in range(lo, hi):
                    out[r, o] = part[r, o - lo] + bias[o] if bias.size else part[r, o - lo]
        chunk_done(board)


def _product(board, team, layer, m):
    """bufs[WRITES[m]] = matrix m of ``layer`` applied to bufs[READS[m]], with whoever joins."""
    job = layer * 8 + m
    rows, size = _weight(team, job)[0].shape[0], _chunk_rows(team[4][READS[m]].shape[0])
    n = (rows + size - 1) // size
    seq = publish(board, n, job)
    _take_chunks(board, team, seq, n, job)
    wait_done(board, n)


def _serve(board, team, idle_spins):
    """The helper: take chunks of every new job until STOP, or ``idle_spins`` spin steps
    without one; then leave (ACTIVE = 0)."""
    seen, idle = -1, 0
    while atomic_load(board, STOP) == 0 and idle < idle_spins:
        seq, n, job = next_job(board, seen, idle)
        if seq < 0:
            idle += 1
            continue
        seen, idle = seq, 0
        _take_chunks(board, team, seq, n, job)
    atomic_store(board, ACTIVE, 0)


def _norm(x, weight, bias, eps, out):
    """out = the norm of each row of x (B, E): LayerNorm with a bias, RMSNorm without
    (``_norm_arrays``), by ``fused.py``'s forward kernels."""
    rows = x.shape[0]
    stats = np.empty(rows, dtype=x.dtype)
    if bias.size:
        _layer_norm(x, weight, bias, eps, out, np.empty(rows, dtype=x.dtype), stats)
    else:
        _rms_norm(x, weight, eps, out, stats)


def _rope(x, cos, sin, pairs, position, T):
    """Rotate each head's channel pairs of x (B * T, heads, hd) in place, as ``nn.Rotary``;
    cos, sin (positions, hd/2): row r is token r % T of its sequence, at position
    ``position + r % T``."""
    half = cos.shape[1]
    for r in range(x.shape[0]):
        c, s = cos[position + r % T], sin[position + r % T]
        for h in range(x.shape[1]):
            row = x[r, h]
            for i in range(half):
                ia, ib = (2 * i, 2 * i + 1) if pairs == 0 else (i, i + half)
                xa, xb = row[ia], row[ib]
                row[ia] = xa * c[i] - xb * s[i]
                row[ib] = xa * s[i] + xb * c[i]


def _block_step(x, layer, team, board, where, norm_weights, norm_eps, rope, ints, cache, bias,
                band, dropout, reals, alibi):
    """T new tokens per sequence through block ``layer``, x (B * T, E) updated in place
    (row b * T + i: sequence b's token i); writes their k, v at ``position + i`` of the
    cache storage (B, Hkv, capacity, hd)."""
    H, Hkv, hd, activation, pairs = ints
    position, T = where
    B = x.shape[0] // T
    t = x.dtype.type
    bufs = team[4]
    h, q, k, v, a, o = bufs[H_BUF], bufs[Q_BUF], bufs[K_BUF], bufs[V_BUF], bufs[A_BUF], bufs[O_BUF]
    k_store, v_store = cache
    _norm(x, norm_weights[0], norm_weights[1], norm_eps[0], h)
    _product(board, team, layer, Q)
    _product(board, team, layer, K)
    _product(board, team, layer, V)
    q4 = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd), a view
    k3, v3 = k.reshape(B * T, Hkv, hd), v.reshape(B * T, Hkv, hd)
    if rope[0].size:
        _rope(q.reshape(B * T, H, hd), rope[0], rope[1], pairs, position, T)
        _rope(k3, rope[0], rope[1], pairs, position, T)
    for b in range(B):
        for i in range(T):
            k_store[b, :, position + i] = k3[b * T + i]
            v_store[b, :, position + i] = v3[b * T + i]
    # attention of the T queries per head over the cache's position + T keys (one split);
    # the spec's band is for an empty cache: its diagonal moves by the position keys before
    band = (band[0] + position, band[1], band[2])
    m_part = np.empty((1, B, H, T), dtype=x.dtype)
    l_part = np.empty((1, B, H, T), dtype=x.dtype)
    acc_part = np.empty((1, B, H, T, hd), dtype=x.dtype)
    _attention(q4, k_store, v_store, position + T, bias, band, dropout, reals, alibi, 1,
               m_part, l_part, acc_part)
    for b in range(B):
        for head in range(H):
            for i in range(T):
                norm = l_part[0, b, head, i]
                norm = norm if norm != t(0) else t(1)  # a row with no key: 0, as merge_partials
                for e in range(hd):
                    a[b * T + i, head * hd + e] = acc_part[0, b, head, i, e] / norm
    _product(board, team, layer, O)
    _residual(x, o, norm_weights[4], norm_weights[5], norm_eps[2])
    # the MLP
    _norm(x, norm_weights[2], norm_weights[3], norm_eps[1], h)
    up, gate, hidden = bufs[UP_BUF], bufs[GATE_BUF], bufs[HIDDEN_BUF]
    _product(board, team, layer, FC_IN)
    if team[0][layer][FC_GATE].size:
        _product(board, team, layer, FC_GATE)
        _gated(gate.reshape(-1), up.reshape(-1), activation, hidden.reshape(-1))
    elif activation == RELU:
        for r in range(up.shape[0]):
            for i in range(up.shape[1]):
                hidden[r, i] = max(up[r, i], t(0))
    else:
        _activation(up.reshape(-1), activation, hidden.reshape(-1))
    _product(board, team, layer, FC_OUT)
    _residual(x, bufs[MLP_BUF], norm_weights[6], norm_weights[7], norm_eps[3])


def _residual(x, branch, post_weight, post_bias, post_eps):
    """x += branch, or x += post_norm(branch) when the block has that post norm."""
    if post_weight.size:
        normed = np.empty_like(branch)
        _norm(branch, post_weight, post_bias, post_eps, normed)
        branch = normed
    for b in range(x.shape[0]):
        for e in range(x.shape[1]):
            x[b, e] += branch[b, e]


def _decode_step(x, layers, final, team, board, where):
    """Every block (``layers``: one ``_block_step`` argument tuple per block, after x,
    layer, team, board and where = (position, T)), then the final norm and the LM head:
    logits (B * T, V)."""
    for i in range(len(layers)):
        _block_step(x, i, team, board, where, *layers[i])
    norm_weight, norm_bias, eps = final
    _norm(x, norm_weight, norm_bias, eps, team[4][H_BUF])
    _product(board, team, 0, HEAD)
    return team[4][LOGITS_BUF].copy()


def _greedy(x, layers, final, team, board, position, table, positions, scale, tokens):
    """tokens (B, count + 1): column 0 given; column s + 1 the argmax of the logits of
    a step on column s, at position ``position + s``."""
    B, E = x.shape
    for s in range(tokens.shape[1] - 1):
        for b in range(B):
            row = table[tokens[b, s]]
            for e in range(E):
                x[b, e] = row[e] * scale
            if positions.size:
                for e in range(E):
                    x[b, e] += positions[position + s, e]
        logits = _decode_step(x, layers, final, team, board, (position + s, 1))
        for b in range(B):
            tokens[b, s + 1] = np.argmax(logits[b])


if numba is not None:
    _compiled = numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
    _chunk_rows, _matvec_rows, _weight, _take_chunks, _product = (
        _compiled(f) for f in (_chunk_rows, _matvec_rows, _weight, _take_chunks, _product))
    _serve, _norm, _rope, _residual = (_compiled(f) for f in (_serve, _norm, _rope, _residual))
    _block_step, _decode_step, _greedy = _compiled(_block_step), _compiled(_decode_step), _compiled(_greedy)
