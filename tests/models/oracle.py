"""Tiny random checkpoints of every family, made by Hugging Face transformers (the oracle).

transformers and torch are test oracles only (the ``oracle`` extra); the tests import this
module after ``require``-ing them, so without them they skip here and fail under CI.

float64: transformers computes RMSNorm, RoPE's frequencies and the softmax in float32 even
in a float64 model (explicit ``torch.float32`` casts), which alone differs from exact
float64 by ~1e-7. ``float64_oracle`` makes those casts float64 while the oracle's own code
runs (model construction and forward), so that its float64 is float64 throughout.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers

VOCAB = 100
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
WINDOW = 5  # sliding windows shorter than the test sequences

# case -> (config class, keyword arguments): every family, and the switches each one has
CASES = {
    "llama": (transformers.LlamaConfig, COMMON),
    "llama-options": (transformers.LlamaConfig, {  # biases everywhere, tied head, wide heads, MHA
        **COMMON, "num_key_value_heads": 4, "head_dim": 16, "attention_bias": True, "mlp_bias": True,
        "tie_word_embeddings": True, "rope_theta": 500.0}),
    "llama3": (transformers.LlamaConfig, {**COMMON, "num_key_value_heads": 1, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "mistral": (transformers.MistralConfig, {**COMMON, "sliding_window": WINDOW}),
    "qwen2": (transformers.Qwen2Config, {**COMMON, "use_sliding_window": True, "sliding_window": WINDOW,
                                         "max_window_layers": 1}),
    "gemma2": (transformers.Gemma2Config, {**COMMON, "head_dim": 16, "sliding_window": WINDOW,
                                           "query_pre_attn_scalar": 12, "attn_logit_softcapping": 0.5,
                                           "final_logit_softcapping": 10.0}),
    "gpt2": (transformers.GPT2Config, {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                       "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}),
    "gpt2-options": (transformers.GPT2Config, {  # untied head, relu, n_inner, per-layer scale
        "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 0,
        "eos_token_id": 0, "tie_word_embeddings": False, "activation_function": "relu", "n_inner": 48,
        "scale_attn_by_inverse_layer_idx": True}),
}


# Matrices are scaled up from transformers' N(0, 0.02^2) initialisation so that the logits
# spread and greedy decoding does not settle on one token (the generation tests check it
# does not); Gemma 2's tied head, fed sqrt(hidden)-scaled embeddings, settles beyond 2x,
# GPT-2 with ReLU and per-layer scales below 20x.
WEIGHT_SCALE = {"gemma2": 2.0, "gpt2-options": 20.0}


def hf_config(case: str, **overrides):
    config_class, kwargs = CASES[case]
    return config_class(**{**kwargs, **overrides})


@contextlib.contextmanager
def float64_oracle():
    """transformers' explicit float32 casts become float64 (and new tensors default to float64)."""
    saved = torch.float32, torch.float, torch.Tensor.float, torch.get_default_dtype()
    torch.float32 = torch.float = torch.float64
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.float32, torch.float, torch.Tensor.float, default = saved
        torch.set_default_dtype(default)


def hf_model(case: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A random transformers model of the case, in eval mode. Norm weights and biases (which
    transformers initialises to constants) are perturbed, so that e.g. Gemma's 1 + w and
    every bias matter; matrices are scaled by WEIGHT_SCALE (10 by default)."""
    torch.manual_seed(seed)
    with float64_oracle() if dtype == torch.float64 else contextlib.nullcontext():
        model = transformers.AutoModelForCausalLM.from_config(hf_config(case, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norms and biases
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(WEIGHT_SCALE.get(case, 10.0))
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad(), float64_oracle() if model.dtype == torch.float64 else contextlib.nullcontext():
        return model(torch.tensor(tokens)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' greedy generate, never stopping early (no end-of-sequence token)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad(), float64_oracle() if model.dtype == torch.float64 else contextlib.nullcontext():
        out = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0)
    return out.numpy()


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def tokens(batch: int = 2, length: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))
