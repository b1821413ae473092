"""Hugging Face checkpoints (issue 15): loading one, and one ``generate`` call.

* ``LoadCheckpoint``  ``models.from_pretrained`` of a small Llama checkpoint (vocab 4096,
                      hidden 256, 4 layers, 8 query and 4 key/value heads, MLP 688, untied
                      head: 5.0M parameters, 20 MB float32) that setup writes with
                      ``save_pretrained`` to a temporary directory. Small, so that asv's
                      quick pass stays fast; what it tracks is the loader's own cost (header,
                      reads, name mapping, building the model), which scales with the bytes.
                      The ~100M-parameter figure against transformers comes from
                      ``benchmarks/compare_models.py``.
* ``GenerateLlama``   ``CausalLM.generate`` on the same model: 32 new tokens after a
                      32-token prompt, batch 1, greedy or sampled (temperature 0.8, top-k 50,
                      top-p 0.95, seeded), KV caches throughout.

Skipped (n/a) where the ``models`` extra (safetensors) is not installed.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import ClassVar

import numpy as np

from microattn import models

CONFIG = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
          "tie_word_embeddings": False}
PROMPT, NEW = 32, 32


def _model():
    return models.CausalLM(CONFIG, rng=np.random.default_rng(0))


class LoadCheckpoint:
    """from_pretrained of a 5M-parameter Llama checkpoint (one model.safetensors)."""

    def setup(self):
        try:
            import safetensors  # noqa: F401
        except ImportError:
            raise NotImplementedError("needs safetensors: pip install 'microattn[models]'") from None
        self.directory = tempfile.mkdtemp(prefix="microattn-bench-")
        models.save_pretrained(_model(), f"{self.directory}/llama")
        models.from_pretrained(f"{self.directory}/llama")  # first read: page cache, imports

    def teardown(self):
        if hasattr(self, "directory"):  # setup may have stopped early (NotImplementedError)
            shutil.rmtree(self.directory, ignore_errors=True)

    def time_from_pretrained(self):
        models.from_pretrained(f"{self.directory}/llama")

    def peakmem_from_pretrained(self):
        models.from_pretrained(f"{self.directory}/llama")


class GenerateLlama:
    """32 new tokens after a 32-token prompt, batch 1."""

    params: ClassVar = [["greedy", "sampled"]]
    param_names: ClassVar = ["decoding"]

    def setup(self, decoding):
        self.model = _model()
        self.prompt = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], PROMPT)
        self.options = {} if decoding == "greedy" else {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}
        self.model.generate(self.prompt, 2, **self.options)  # compiles the decode path

    def time_generate(self, decoding):
        self.model.generate(self.prompt, NEW, **self.options)
