"""``CausalLM``: one decoder built from ``microattn.nn`` parts for every family.

Shape legend: B batch, N sequence length, E hidden size, V vocabulary.

    tokens (B, N) -> embed_tokens (x sqrt(E) for Gemma; + learned positions for GPT-2)
                  -> blocks: TransformerBlock.from_parts(norm_1, MultiHeadAttention, norm_2,
                     MLP[, post norms]), causal, windowed where the config says
                  -> norm -> lm_head (tied to embed_tokens or not)
                  -> final softcap (Gemma 2) -> logits (B, N, V)
"""

from __future__ import annotations

import numpy as np

from ..nn import lean
from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Embedding, LayerNorm, Linear, RMSNorm
from ..nn.module import Module, ModuleList
from ..nn.rope import RotaryEmbedding
from ..nn.transformer import (
    MLP,
    TransformerBlock,
    check_decoder_input,
    check_sampling,
    generate_tokens,
    sample_next_token,
)
from ..tensor import Tensor
from .families import Architecture, read_config


class CausalLM(Module):
    """A decoder-only language model of a Hugging Face family, from its config.json (a dict).

    ``CausalLM(config)`` builds a randomly initialised model (``rng``: a
    ``np.random.Generator``, for initialisation only); ``from_pretrained`` fills one from
    a checkpoint. ``config`` is kept (``model.config``) for ``save_pretrained``; its
    resolved numbers are ``model.arch`` (``families.Architecture``). ``backend`` goes to
    every attention layer (see ``microattn.functional``).
    """

    def __init__(self, config: dict, *, dtype=np.float32, backend: str = "auto",
                 rng: np.random.Generator | None = None):
        super().__init__()
        arch = read_config(config)
        rng = np.random.default_rng() if rng is None else rng
        self.config, self.arch = dict(config), arch
        E, V = arch.hidden_size, arch.vocab_size
        self.embed_tokens = Embedding(V, E, std=0.02, dtype=dtype, rng=rng)
        self.position_embedding = (Embedding(arch.max_positions, E, std=0.02, dtype=dtype, rng=rng)
                                   if arch.max_positions is not None else None)
        self.blocks = ModuleList(_block(arch, i, backend, dtype, rng) for i in range(arch.num_layers))
        self.norm = _norm(arch, dtype)
        self.lm_head = Linear(E, V, bias=False, dtype=dtype, rng=rng)
        if arch.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, two uses

    @property
    def dtype(self) -> np.dtype:
        return self.embed_tokens.weight.dtype

    def make_caches(self, capacity: int | None = None) -> list[KVCache]:
        """One empty KVCache per layer, each allocating ``capacity`` positions on first use."""
        return [KVCache(capacity=capacity) for _ in self.blocks]

    def forward(self, tokens, kv_caches: list[KVCache] | None = None) -> Tensor:
        """tokens (B, N) int -> logits (B, N, V), causal.

        With ``kv_caches`` (from ``make_caches``), ``tokens`` are the next N tokens after
        what the caches hold (positions continue from there), and the caches are extended.
        """
        tokens = check_decoder_input(tokens, kv_caches, len(self.blocks))
        arch = self.arch
        N = tokens.shape[1]
        start = kv_caches[0].length if kv_caches else 0
        if self.position_embedding is not None and start + N > arch.max_positions:
            raise ValueError(f"sequence length {start + N} exceeds the {arch.max_positions} "
                             f"learned positions (n_positions)")
        if lean.applies(self, tokens, kv_caches):  # a step or a short prompt: one compiled call
            return Tensor(self._lean_step(tokens, kv_caches, start))  # (B, N, V)
        x = self.embed_tokens(tokens)  # (B, N, E)
        if arch.embed_scale is not None:
            x = x * arch.embed_scale  # a Python float: stays in x's dtype
        if self.position_embedding is not None:
            x = x + self.position_embedding(np.arange(start, start + N))  # (N, E) broadcast
        caches = kv_caches if kv_caches is not None else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, is_causal=True, kv_cache=cache)  # (B, N, E)
        logits = self.lm_head(self.norm(x))  # (B, N, V)
        if arch.final_softcap is not None:
            logits = (logits / arch.final_softcap).tanh() * arch.final_softcap
        return logits

    def _lean_step(self, tokens, kv_caches, start) -> np.ndarray:
        """forward's maths on ``nn.lean``'s compiled step: logits (B, N, V)."""
        arch = self.arch
        x = self.embed_tokens.weight.data[self.embed_tokens.check_tokens(tokens)]  # (B, N, E)
        if arch.embed_scale is not None:
            x *= x.dtype.type(arch.embed_scale)
        if self.position_embedding is not None:  # forward checked start + N <= max_positions
            x += self.position_embedding.weight.data[start:start + tokens.shape[1]]
        logits = lean.decode_step(self, x, kv_caches)
        if arch.final_softcap is not None:
            logits = np.tanh(logits / logits.dtype.type(arch.final_softcap)) * logits.dtype.type(arch.final_softcap)
        return logits

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, on_token=None) -> np.ndarray:
        """Extend the prompt (B, N) or (N,) by ``max_new_tokens`` tokens, decoding with KV caches.

        ``temperature=0`` is greedy (the argmax, as transformers' ``do_sample=False``);
        otherwise tokens are sampled after ``top_k`` and ``top_p`` filtering
        (``nn.sample_next_token``), from ``np.random.default_rng(seed)``: one seed, one
        sequence. ``on_token(tokens (B,))`` is called with each step's new tokens as soon
        as they are chosen, for streaming (``nn.generate_tokens``). Returns the prompt
        followed by the new tokens, int64, in the prompt's layout.
        """
        check_sampling(temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        return generate_tokens(
            self, prompt, max_new_tokens,
            pick=lambda logits: sample_next_token(logits, temperature=temperature, top_k=top_k,
                                                  top_p=top_p, rng=rng),
            make_caches=self.make_caches, on_token=on_token,
            greedy_rest=self._greedy_rest if temperature == 0 else None)

    def _greedy_rest(self, first, caches, count):
        """``count`` greedy tokens after ``first`` on the lean step (``lean.greedy``), or
        None where it does not apply (the caller then steps through ``forward``). Not with
        a final softcap: tanh can round two logits to one value, and the argmax is taken
        after it."""
        arch, start = self.arch, caches[0].length
        if (arch.final_softcap is not None or not lean.applies(self, first, caches)
                or self.lm_head.weight.shape[0] > self.embed_tokens.weight.shape[0]
                or (self.position_embedding is not None and start + count > arch.max_positions)):
            return None
        positions = None if self.position_embedding is None else self.position_embedding.weight.data
        scale = 1.0 if arch.embed_scale is None else arch.embed_scale
        return lean.greedy(self, first, caches, count, (self.embed_tokens.weight.data, positions, scale))

    def extra_repr(self):
        arch = self.arch
        return (f"{arch.family.model_type}, vocab={arch.vocab_size}, hidden={arch.hidden_size}, "
                f"layers={arch.num_layers}, dtype={self.dtype}")


def _norm(arch: Architecture, dtype) -> Module:
    if arch.family.norm == "layernorm":
        return LayerNorm(arch.hidden_size, eps=arch.norm_eps, dtype=dtype)
    return RMSNorm(arch.hidden_size, eps=arch.norm_eps, offset=arch.family.norm_offset, dtype=dtype)


def _block(arch: Architecture, i: int, backend: str, dtype, rng) -> TransformerBlock:
    """Layer i: Hugging Face's sliding window w (key j seen iff i - w < j) is the band
    (w - 1, 0) of ``attention="window"``."""
    rope = False
    if arch.rope_theta is not None:
        rope = RotaryEmbedding(arch.head_dim, base=arch.rope_theta, pairs="halves", scaling=arch.rope_scaling)
    window = arch.windows[i]
    attn = MultiHeadAttention(
        arch.hidden_size, arch.num_heads, arch.num_kv_heads, bias=arch.qkv_bias,
        attention="flash" if window is None else "window", window=None if window is None else window - 1,
        rope=rope, backend=backend, head_dim=arch.head_dim, scale=arch.scales[i], out_bias=arch.out_bias,
        softcap=arch.attn_softcap, dtype=dtype, rng=rng)
    mlp = MLP(arch.hidden_size, arch.mlp_hidden, arch.activation, arch.mlp_bias, dtype=dtype, rng=rng)
    post = arch.family.post_norms
    return TransformerBlock.from_parts(
        _norm(arch, dtype), attn, _norm(arch, dtype), mlp,
        post_norm_1=_norm(arch, dtype) if post else None, post_norm_2=_norm(arch, dtype) if post else None)
