"""Hugging Face checkpoints without PyTorch: Llama, Mistral, Qwen2, Gemma 2 and GPT-2.

``from_pretrained(directory, dtype=np.float32)`` reads a checkpoint directory (config.json
and safetensors) into a ``CausalLM`` built from ``microattn.nn`` parts; ``save_pretrained``
writes one back in the same format. See docs/models.md.
"""

from .checkpoint import from_pretrained, save_pretrained
from .families import FAMILIES, Architecture, Family, read_config
from .model import CausalLM

__all__ = [
           "FAMILIES",
           "Architecture",
           "CausalLM",
           "Family",
           "from_pretrained",
           "read_config",
           "save_pretrained",
]
