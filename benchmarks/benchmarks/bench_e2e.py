"""A whole model, and the fused ops it is made of (issue 12).

* ``TrainingStep``  one AdamW step of the issue's GPT-style model (vocab 256, E=256, 4
                    layers, 8 heads, learned positions, LayerNorm, GELU MLP, float32),
                    batch 8 x N tokens: ``time_step``, ``peakmem_step``.
* ``DecodeStep``    one greedy decoding step (one token in) after a KV cache of ``cache``
                    tokens, on the lean step or through the modules (``path``):
                    ``time_step``; the cache is rewound after each call, so every
                    call sees the same length. The issue asks for a flat per-token time
                    from 64 to 2048, apart from the attention read itself.
* ``Generate``      ``DecoderLM.generate``: 64 new tokens after a 64-token prompt.
* ``FusedOp``       each op of ``microattn/fused.py`` on (2048, width) float32, forward
                    and forward+backward, against its teaching twin built from Tensor
                    ops (``impl="composed"``; AdamW: the NumPy ``AdamW.update``).

PyTorch's figures for the same shapes come from ``benchmarks/compare_e2e.py`` (torch is
no dependency of the suite).
"""

from __future__ import annotations

import numpy as np

import microattn as ma
from microattn import fused, nn, optim
from microattn.nn import layers, lean

from .common import BACKWARD, FORWARD

VOCAB, EMBED, LAYERS, HEADS, BATCH = 256, 256, 4, 8, 8
MAX_LEN = 2048 + 64


def gpt(seed=0):
    return nn.DecoderLM(VOCAB, MAX_LEN, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                        rope=False, rng=np.random.default_rng(seed))


class TrainingStep:
    """Forward, cross-entropy, backward and AdamW, batch 8 x N tokens."""

    params = [[64, 256]]
    param_names = ["N"]
    timeout = 300.0

    def setup(self, N):
        self.model = gpt()
        self.optimizer = optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        tokens = np.random.default_rng(1).integers(0, VOCAB, (BATCH, N + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self._step()  # compiles every kernel this step needs

    def _step(self):
        self.optimizer.zero_grad()
        nn.cross_entropy(self.model(self.inputs), self.targets).backward()
        self.optimizer.step()

    def time_step(self, N):
        self._step()

    def peakmem_step(self, N):
        self._step()


class DecodeStep:
    """One token in, one logit row out, after ``cache`` cached tokens (batch 1), on the
    lean step (``nn/lean.py``, one compiled call) or through the modules."""

    params = [[64, 512, 2048], ["lean", "modules"]]
    param_names = ["cache", "path"]

    def setup(self, cache, path):
        lean.ENABLED = path == "lean"
        self.model = gpt()
        self.caches = self.model.make_caches()
        prompt = np.random.default_rng(2).integers(0, VOCAB, (1, cache))
        self.token, self.length = prompt[:, -1:], cache
        with ma.no_grad():
            self.model(prompt, kv_caches=self.caches)
            self.time_step(cache, path)  # compiles the decode path

    def teardown(self, cache, path):
        lean.ENABLED = True

    def time_step(self, cache, path):
        with ma.no_grad():
            self.model(self.token, kv_caches=self.caches)
        for kv_cache in self.caches:
            kv_cache.length = self.length  # rewind: every call sees `cache` tokens


class Prompt:
    """A 64-token prompt's forward into empty KV caches (batch 1): one lean call
    (``nn/lean.py``; its products are BLAS chunks) or the modules and the flash kernel."""

    params = [["lean", "modules"]]
    param_names = ["path"]

    def setup(self, path):
        lean.ENABLED = path == "lean"
        self.model = gpt()
        self.prompt = np.random.default_rng(3).integers(0, VOCAB, (1, 64))
        self.time_prompt(path)  # compiles

    def teardown(self, path):
        lean.ENABLED = True

    def time_prompt(self, path):
        with ma.no_grad():
            self.model(self.prompt, kv_caches=self.model.make_caches())


class Generate:
    """Greedy decoding of 64 tokens after a 64-token prompt, KV caches preallocated: the
    lean path (the prompt in one call, the tokens in one compiled loop, ``lean.greedy``),
    the lean step once per token (``on_token`` given, as when streaming), or the modules."""

    params = [["lean", "lean-steps", "modules"]]
    param_names = ["path"]

    def setup(self, path):
        lean.ENABLED = path != "modules"
        self.on_token = (lambda tokens: None) if path == "lean-steps" else None
        self.model = gpt()
        self.prompt = np.random.default_rng(3).integers(0, VOCAB, (1, 64))
        self.model.generate(self.prompt, 2, on_token=self.on_token)

    def teardown(self, path):
        lean.ENABLED = True

    def time_generate(self, path):
        self.model.generate(self.prompt, 64, on_token=self.on_token)


def _cross_entropy_composed(logits, targets):
    return -logits.log_softmax(axis=-1)[np.arange(len(targets)), targets].mean()


OPS = {  # name -> (fused, composed), each called with the inputs of _inputs
    "linear": (lambda x, u, w, b, m, t, y: fused.Linear.apply(x, m, b),
               lambda x, u, w, b, m, t, y: layers.linear_composed(x, m, b)),
    "layer_norm": (lambda x, u, w, b, m, t, y: fused.LayerNorm.apply(x, w, b, eps=1e-5),
                   lambda x, u, w, b, m, t, y: layers.layer_norm_composed(x, w, b, 1e-5)),
    "rms_norm": (lambda x, u, w, b, m, t, y: fused.RMSNorm.apply(x, w, eps=1e-6),
                 lambda x, u, w, b, m, t, y: layers.rms_norm_composed(x, w, 1e-6)),
    "gelu": (lambda x, u, w, b, m, t, y: fused.gelu(x),
             lambda x, u, w, b, m, t, y: layers.gelu_composed(x)),
    "silu": (lambda x, u, w, b, m, t, y: fused.silu(x),
             lambda x, u, w, b, m, t, y: layers.silu_composed(x)),
    "swiglu": (lambda x, u, w, b, m, t, y: fused.swiglu(x, u),
               lambda x, u, w, b, m, t, y: layers.swiglu_composed(x, u)),
    "geglu": (lambda x, u, w, b, m, t, y: fused.geglu(x, u),
              lambda x, u, w, b, m, t, y: layers.geglu_composed(x, u)),
    "embedding": (lambda x, u, w, b, m, t, y: fused.Embedding.apply(t, tokens=y),
                  lambda x, u, w, b, m, t, y: layers.embedding_composed(t, y)),
    "cross_entropy": (lambda x, u, w, b, m, t, y: fused.cross_entropy(x, y % x.shape[1]),
                      lambda x, u, w, b, m, t, y: _cross_entropy_composed(x, y % x.shape[1])),
}


class FusedOp:
    """Each fused op against its Tensor-op twin, (2048, width) float32."""

    params = [sorted(OPS) + ["adamw"], ["fused", "composed"], [256, 1024], [FORWARD, BACKWARD]]
    param_names = ["op", "impl", "width", "pass"]
    ROWS = 2048

    def setup(self, op, impl, width, which):
        rng = np.random.default_rng(4)
        if op == "adamw":
            if which == FORWARD:
                raise NotImplementedError("AdamW is an update: one pass only")
            self._adamw_setup(rng, impl, width)
            return
        x, u, g = (rng.standard_normal((self.ROWS, width)).astype(np.float32) for _ in range(3))
        w, b = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
        m = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        t = rng.standard_normal((VOCAB, width)).astype(np.float32)
        y = rng.integers(0, VOCAB, self.ROWS)
        self.inputs = [ma.tensor(a, requires_grad=True) for a in (x, u, w, b, m, t)] + [y]
        self.fn = OPS[op][0 if impl == "fused" else 1]
        self.cotangent = None if op == "cross_entropy" else g
        self.which = which
        self.time_op(op, impl, width, which)  # compiles

    def _adamw_setup(self, rng, impl, width):
        params = [ma.tensor(rng.standard_normal((width, 4 * width)).astype(np.float32), requires_grad=True)
                  for _ in range(2)]
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        self.optimizer = optim.AdamW(params)
        self.which = "adamw"
        self.adamw_step = self.optimizer.step if impl == "fused" else lambda: optim.Optimizer.step(self.optimizer)
        self.adamw_step()

    def time_op(self, op, impl, width, which):
        if self.which == "adamw":
            self.adamw_step()
        elif self.which == FORWARD:
            with ma.no_grad():
                self.fn(*self.inputs)
        else:
            for x in self.inputs[:-1]:
                x.grad = None
            self.fn(*self.inputs).backward(self.cotangent)

