"""Neural-network layers on the microattn autograd engine (``import microattn.nn as nn``).

See docs/nn.md for the layers, the KV cache and the documented choices.
"""

from ..fused import cross_entropy
from .attention import KVCache, MultiHeadAttention
from .layers import (
    GELU,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    SiLU,
    gelu,
    silu,
    skip_init,
)
from .module import Module, ModuleList, Parameter
from .rope import Rotary, RotaryEmbedding, llama3_scaling
from .transformer import (
    MLP,
    DecoderLM,
    TransformerBlock,
    generate_tokens,
    sample_next_token,
)

__all__ = [
    "GELU",
    "MLP",
    "DecoderLM",
    "Dropout",
    "Embedding",
    "KVCache",
    "LayerNorm",
    "Linear",
    "Module",
    "ModuleList",
    "MultiHeadAttention",
    "Parameter",
    "RMSNorm",
    "ReLU",
    "Rotary",
    "RotaryEmbedding",
    "SiLU",
    "TransformerBlock",
    "cross_entropy",
    "gelu",
    "generate_tokens",
    "llama3_scaling",
    "sample_next_token",
    "silu",
    "skip_init",
]
