"""Neural-network layers on the microattn autograd engine (``import microattn.nn as nn``).

See docs/nn.md for the layers, the KV cache and the documented choices.
"""

from ..fused import cross_entropy
from .attention import KVCache, MultiHeadAttention
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear, ReLU, RMSNorm, SiLU, gelu, silu
from .module import Module, ModuleList, Parameter
from .rope import Rotary, RotaryEmbedding
from .transformer import MLP, DecoderLM, TransformerBlock

__all__ = [
    "Parameter", "Module", "ModuleList",
    "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout", "GELU", "ReLU", "SiLU", "gelu", "silu",
    "Rotary", "RotaryEmbedding", "KVCache", "MultiHeadAttention",
    "MLP", "TransformerBlock", "DecoderLM", "cross_entropy",
]
