"""A pre-norm transformer block and a small decoder-only language model.

Shape legend: B batch, N sequence length, E embed_dim, V vocab_size.
"""

from __future__ import annotations

import numpy as np

from .. import fused
from ..autograd import no_grad
from ..tensor import Tensor
from . import lean
from .attention import KVCache, MultiHeadAttention
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear, ReLU, RMSNorm, SiLU
from .module import Module, ModuleList

NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
ACTIVATIONS = {"gelu": GELU, "relu": ReLU, "silu": SiLU, "swiglu": None, "geglu": None}
GATED = {"swiglu": fused.swiglu, "geglu": fused.geglu}  # act(gate(x)) * fc_in(x), one fused op


def _choice(name, value, table):
    if value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


class MLP(Module):
    """Linear(E, hidden) -> activation -> Linear(hidden, E).

    The gated activations "swiglu" and "geglu" add a second input projection ``fc_gate``:
    ``fc_out(act(fc_gate(x)) * fc_in(x))`` with act SiLU or GELU (LLaMA's MLP is "swiglu").
    """

    def __init__(self, embed_dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True,
                 *, dtype=np.float32, rng=None):
        super().__init__()
        activation_class = _choice("activation", activation, ACTIVATIONS)
        self.gated = GATED.get(activation)
        if self.gated is not None:
            self.fc_gate = Linear(embed_dim, hidden_dim, bias, dtype=dtype, rng=rng)
        self.fc_in = Linear(embed_dim, hidden_dim, bias, dtype=dtype, rng=rng)
        if self.gated is None:
            self.activation = activation_class()
        self.fc_out = Linear(hidden_dim, embed_dim, bias, dtype=dtype, rng=rng)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated is not None:
            return self.fc_out(self.gated(self.fc_gate(x), self.fc_in(x)))
        return self.fc_out(self.activation(self.fc_in(x)))


class TransformerBlock(Module):
    """Pre-norm block::

        x = x + dropout(attention(norm_1(x)))
        x = x + dropout(mlp(norm_2(x)))

    ``norm``: "layernorm" or "rmsnorm"; ``activation``: "gelu" (tanh approximation),
    "relu", "silu", or the gated "swiglu" / "geglu" (see ``MLP``); the other keywords go to ``MultiHeadAttention`` (``dropout`` is used both on
    the attention probabilities and on the two residual branches).

    ``TransformerBlock.from_parts`` assembles a block from given layers instead, optionally
    with "sandwich" norms on each branch's output (Gemma 2)::

        x = x + dropout(post_norm_1(attention(norm_1(x))))
        x = x + dropout(post_norm_2(mlp(norm_2(x))))
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: int = 4, *,
                 num_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True,
                 attention: str = "flash", window: int | None = None, rope: bool = False,
                 norm: str = "layernorm", activation: str = "gelu", backend: str = "auto",
                 dtype=np.float32, rng: np.random.Generator | None = None):
        super().__init__()
        rng = np.random.default_rng() if rng is None else rng
        norm_class = _choice("norm", norm, NORMS)
        self.norm_1 = norm_class(embed_dim, dtype=dtype)
        self.attn = MultiHeadAttention(embed_dim, num_heads, num_kv_heads, dropout, bias, attention,
                                       window, rope, backend=backend, dtype=dtype, rng=rng)
        self.norm_2 = norm_class(embed_dim, dtype=dtype)
        self.mlp = MLP(embed_dim, mlp_ratio * embed_dim, activation, bias, dtype=dtype, rng=rng)
        self.dropout = Dropout(dropout, rng=rng)
        self.post_norm_1 = self.post_norm_2 = None

    @classmethod
    def from_parts(cls, norm_1: Module, attn: MultiHeadAttention, norm_2: Module, mlp: Module, *,
                   post_norm_1: Module | None = None, post_norm_2: Module | None = None,
                   dropout: Dropout | None = None) -> TransformerBlock:
        """A block of the given layers (``mlp`` any module (B, N, E) -> (B, N, E)); the
        post norms, when given, normalise each branch's output before the residual add."""
        block = cls.__new__(cls)
        Module.__init__(block)
        block.norm_1, block.attn, block.norm_2, block.mlp = norm_1, attn, norm_2, mlp
        block.dropout = Dropout(0.0) if dropout is None else dropout
        block.post_norm_1, block.post_norm_2 = post_norm_1, post_norm_2
        return block

    def forward(self, x, *, is_causal: bool = False, attn_mask=None,
                kv_cache: KVCache | None = None) -> Tensor:
        """x (B, N, E) -> (B, N, E)."""
        h = self.attn(self.norm_1(x), is_causal=is_causal, attn_mask=attn_mask, kv_cache=kv_cache)
        if self.post_norm_1 is not None:
            h = self.post_norm_1(h)
        x = x + self.dropout(h)
        h = self.mlp(self.norm_2(x))
        if self.post_norm_2 is not None:
            h = self.post_norm_2(h)
        return x + self.dropout(h)


class DecoderLM(Module):
    """A decoder-only (GPT-style) language model: tokens (B, N) -> logits (B, N, V).

    token embedding (+ learned positions when ``rope=False``) -> dropout ->
    ``num_layers`` causal ``TransformerBlock``s -> final norm -> ``lm_head`` (no bias,
    not tied to the embedding). Embeddings are initialised N(0, 0.02^2) (GPT-2).
    Sequences (cache included) may not exceed ``max_len``.
    """

    def __init__(self, vocab_size: int, max_len: int, embed_dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int | None = None, attention: str = "flash",
                 window: int | None = None, rope: bool = True, dropout: float = 0.0, *,
                 mlp_ratio: int = 4, norm: str = "layernorm", activation: str = "gelu",
                 backend: str = "auto", dtype=np.float32, rng: np.random.Generator | None = None):
        super().__init__()
        rng = np.random.default_rng() if rng is None else rng
        self.vocab_size, self.max_len, self.embed_dim = vocab_size, max_len, embed_dim
        self.token_embedding = Embedding(vocab_size, embed_dim, std=0.02, dtype=dtype, rng=rng)
        self.position_embedding = (
            None if rope else Embedding(max_len, embed_dim, std=0.02, dtype=dtype, rng=rng)
        )
        self.dropout = Dropout(dropout, rng=rng)
        self.blocks = ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_ratio, num_kv_heads=num_kv_heads,
                             dropout=dropout, attention=attention, window=window, rope=rope,
                             norm=norm, activation=activation, backend=backend, dtype=dtype, rng=rng)
            for _ in range(num_layers)
        )
        self.norm = _choice("norm", norm, NORMS)(embed_dim, dtype=dtype)
        self.lm_head = Linear(embed_dim, vocab_size, bias=False, dtype=dtype, rng=rng)

    def make_caches(self) -> list[KVCache]:
        """One empty KVCache per layer, for ``forward(tokens, kv_caches=...)``; each holds
        ``max_len`` positions once used, so decoding never copies the past."""
        return [KVCache(capacity=self.max_len) for _ in self.blocks]

    def forward(self, tokens, kv_caches: list[KVCache] | None = None) -> Tensor:
        """tokens (B, N) int -> logits (B, N, V), causal.

        With ``kv_caches`` (from ``make_caches``), ``tokens`` are the next N tokens after
        what the caches hold, and the caches are extended in place.
        """
        tokens = check_decoder_input(tokens, kv_caches, len(self.blocks))
        N = tokens.shape[1]
        start = kv_caches[0].length if kv_caches else 0
        if start + N > self.max_len:
            raise ValueError(f"sequence length {start + N} exceeds max_len {self.max_len}")
        if lean.applies(self, tokens, kv_caches):  # a step or a short prompt: one compiled call
            x = self.token_embedding.weight.data[self.token_embedding.check_tokens(tokens)]  # (B, N, E)
            if self.position_embedding is not None:
                x += self.position_embedding.weight.data[start:start + N]
            return Tensor(lean.decode_step(self, x, kv_caches))  # (B, N, V)
        x = self.token_embedding(tokens)  # (B, N, E)
        if self.position_embedding is not None:
            x = x + self.position_embedding(np.arange(start, start + N))  # (N, E) broadcast
        x = self.dropout(x)
        caches = kv_caches if kv_caches is not None else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, is_causal=True, kv_cache=cache)  # (B, N, E)
        return self.lm_head(self.norm(x))  # (B, N, V)

    def generate(self, prompt_tokens, max_new_tokens: int, greedy: bool = True, *,
                 temperature: float = 1.0, rng: np.random.Generator | None = None,
                 on_token=None) -> np.ndarray:
        """Extend the prompt (B, N) or (N,) by ``max_new_tokens`` tokens using KV caches.

        ``greedy`` takes the argmax; otherwise samples from softmax(logits / temperature)
        with ``rng``. Runs in eval mode without a graph (the mode is restored afterwards).
        ``on_token(tokens (B,))`` is called with each step's new tokens as soon as they are
        chosen (see ``generate_tokens``). Returns the prompt and the new tokens, int64, in
        the prompt's layout.
        """
        rng = np.random.default_rng() if rng is None else rng
        return generate_tokens(self, prompt_tokens, max_new_tokens,
                               pick=lambda logits: self._pick(logits, greedy, temperature, rng),
                               make_caches=lambda total: self.make_caches(), on_token=on_token,
                               greedy_rest=self._greedy_rest if greedy else None)

    def _greedy_rest(self, first, caches, count):
        """``count`` greedy tokens after ``first`` on the lean step (``lean.greedy``), or
        None where it does not apply (the caller then steps through ``forward``)."""
        start = caches[0].length
        if (not lean.applies(self, first, caches) or start + count > self.max_len
                or self.lm_head.weight.shape[0] > self.token_embedding.weight.shape[0]):
            return None
        positions = None if self.position_embedding is None else self.position_embedding.weight.data
        return lean.greedy(self, first, caches, count, (self.token_embedding.weight.data, positions, 1.0))

    @staticmethod
    def _pick(logits: np.ndarray, greedy: bool, temperature: float, rng) -> np.ndarray:
        if greedy:
            return np.argmax(logits, axis=-1)[:, None].astype(np.int64)
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([[rng.choice(probs.shape[-1], p=row)] for row in probs], dtype=np.int64)


def check_decoder_input(tokens, kv_caches, num_layers: int) -> np.ndarray:
    """tokens as an array (B, N) with N >= 1, and kv_caches None or one distinct KVCache
    per layer (one cache object for two layers would mix their keys); ValueError before
    any work otherwise. The token ids are the embedding's to check."""
    tokens = np.asarray(getattr(tokens, "data", tokens))
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (B, N) with N >= 1, got shape {tokens.shape}")
    if kv_caches is not None:
        if len(kv_caches) != num_layers:
            raise ValueError(f"need one KVCache per layer ({num_layers}), got {len(kv_caches)}")
        if len({id(cache) for cache in kv_caches}) != num_layers:
            raise ValueError("kv_caches holds one KVCache object for several layers: each layer "
                             "needs its own (model.make_caches())")
    return tokens


def generate_tokens(model: Module, prompt_tokens, max_new_tokens: int, *, pick, make_caches,
                    on_token=None, greedy_rest=None) -> np.ndarray:
    """The decoding loop that ``generate`` methods share.

    ``model(tokens, kv_caches=caches)`` maps tokens (B, n) to logits (B, n, V), extending
    the caches; ``make_caches(total)`` gives empty caches for ``total`` positions;
    ``pick(logits (B, V))`` chooses the next tokens (B, 1). ``greedy_rest(first (B, 1),
    caches, count)``, when ``pick`` is the argmax, may return the ``count`` tokens after
    ``first`` (B, count) in one go (``lean.greedy``), or None. ``on_token(tokens)``, if
    given, is called with each step's new tokens, (B,) int64, as soon as they are chosen
    and before the next forward pass: the hook for streaming them out. An exception it
    raises stops decoding and propagates. Runs in eval mode without a graph (the mode is
    restored afterwards). Returns the prompt followed by ``max_new_tokens`` tokens, int64,
    in the prompt's layout ((B, N) or (N,)).
    """
    prompt = np.asarray(getattr(prompt_tokens, "data", prompt_tokens))
    if prompt.size and not np.issubdtype(prompt.dtype, np.integer):  # as forward: 1.7 is no token id
        raise TypeError(f"prompt_tokens must be integer token ids, got dtype {prompt.dtype}")
    prompt = prompt.astype(np.int64, copy=False)
    squeeze = prompt.ndim == 1
    tokens = prompt[None] if squeeze else prompt  # (B, N)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be (B, N) or (N,) with N >= 1, got shape {prompt.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            caches = make_caches(tokens.shape[1] + max_new_tokens)
            logits = model(tokens, kv_caches=caches).data[:, -1]  # (B, V)
            generated = [tokens]
            for step in range(max_new_tokens):
                next_token = pick(logits)  # (B, 1)
                generated.append(next_token)
                if on_token is not None:
                    on_token(next_token[:, 0].copy())
                if step + 1 < max_new_tokens and on_token is None and greedy_rest is not None:
                    rest = greedy_rest(next_token, caches, max_new_tokens - step - 1)
                    if rest is not None:
                        generated.append(rest)
                        break
                if step + 1 < max_new_tokens:
                    logits = model(next_token, kv_caches=caches).data[:, -1]
    finally:
        model.train(was_training)
    out = np.concatenate(generated, axis=1)  # (B, N + max_new_tokens)
    return out[0] if squeeze else out


def sample_next_token(logits: np.ndarray, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """The next tokens (B, 1) int64 from logits (B, V), as Hugging Face's ``generate`` picks them.

    ``temperature == 0``: the argmax (greedy; ``top_k``/``top_p`` change nothing then).
    Otherwise, in this order: the logits are divided by ``temperature``; ``top_k`` keeps
    the k largest (ties with the k-th kept too); ``top_p`` keeps the most likely tokens
    whose probabilities, summed before each one in decreasing order, are below ``top_p``
    (the smallest set holding at least ``top_p`` of the mass; always the most likely
    token); then one token per row is drawn from the renormalised softmax with ``rng``.
    """
    check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits)
    if temperature == 0:
        return np.argmax(logits, axis=-1)[:, None].astype(np.int64)
    rng = np.random.default_rng() if rng is None else rng
    scaled = logits.astype(np.float64) / temperature  # (B, V)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]  # (B, 1)
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
        ranked = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(ranked, axis=-1) - ranked  # (B, V)
        dropped = np.empty_like(mass_before, dtype=bool)
        np.put_along_axis(dropped, order, mass_before >= top_p, axis=-1)
        probs = np.where(dropped, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = np.cumsum(probs, axis=-1)  # (B, V); inverse-CDF draw, one uniform per row
    draws = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    chosen = (cumulative <= draws).sum(axis=-1)  # first index whose cumulative exceeds the draw
    return np.minimum(chosen, probs.shape[-1] - 1)[:, None].astype(np.int64)


def check_sampling(temperature, top_k, top_p) -> None:
    """ValueError for a temperature, top_k or top_p that ``sample_next_token`` cannot use."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
