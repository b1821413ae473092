"""The autograd engine's own cost: graph building and backward on small problems, where
Python overhead per op (not arithmetic) decides the time."""

from __future__ import annotations

import numpy as np

import microattn as ma

from . import common


class ElementwiseChain:
    """100 elementwise Tensor ops in a chain, then backward: the engine's per-op overhead.
    At 8 elements the arithmetic is free, so time / 100 is the cost of one graph node."""

    params = [[8, 65536]]
    param_names = ["size"]
    OPS = 100  # 25 rounds of 4 ops

    def setup(self, size):
        rng = np.random.default_rng(0)
        self.x = ma.tensor(rng.standard_normal(size), requires_grad=True)

    def _chain(self):
        y = self.x
        for _ in range(self.OPS // 4):
            y = (y * 0.9 + 0.1).tanh() - y  # mul, add, tanh, sub
        return y.sum()

    def time_forward(self, size):
        with ma.no_grad():
            self._chain()

    def time_forward_backward(self, size):
        self.x.grad = None
        self._chain().backward()


class MLPStep:
    """One training step of a 4-layer MLP written in raw Tensor ops (matmul, add, relu,
    log_softmax, indexing, mean) with a hand-written SGD update: batch 64, 10 classes."""

    params = [[32, 256], ["float32", "float64"]]
    param_names = ["width", "dtype"]
    BATCH, DEPTH, CLASSES, LR = 64, 4, 10, 1e-2

    def setup(self, width, dtype):
        rng = np.random.default_rng(0)
        sizes = [width] * self.DEPTH + [self.CLASSES]
        self.layers = [
            (ma.tensor(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), requires_grad=True, dtype=dtype),
             ma.tensor(np.zeros(n_out), requires_grad=True, dtype=dtype))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])
        ]
        self.x = ma.tensor(rng.standard_normal((self.BATCH, width)), dtype=dtype)
        self.targets = rng.integers(0, self.CLASSES, self.BATCH)

    def _step(self):
        h = self.x
        for depth, (w, b) in enumerate(self.layers):
            h = h @ w + b  # (BATCH, n_out)
            if depth < len(self.layers) - 1:
                h = h.relu()
        log_p = h.log_softmax(axis=-1)  # (BATCH, CLASSES)
        loss = -log_p[np.arange(self.BATCH), self.targets].mean()
        for w, b in self.layers:
            w.grad = b.grad = None
        loss.backward()
        for w, b in self.layers:
            w.data -= self.LR * w.grad
            b.data -= self.LR * b.grad
        return loss

    def time_step(self, width, dtype):
        self._step()


class DecoderLMStep:
    """One AdamW step of a tiny causal DecoderLM (2 layers, 4 heads, embed 64, vocab 64,
    batch 4): embedding, attention through F.scaled_dot_product_attention on the given
    backend, MLP, norm, cross-entropy, backward, optimizer. Skipped until microattn.nn,
    microattn.optim and microattn.losses exist."""

    params = [["reference", "numba"], [64, 256]]
    param_names = ["backend", "N"]
    BATCH, VOCAB = 4, 64

    def setup(self, backend, N):
        try:
            from microattn import nn, optim
            from microattn.losses import cross_entropy
        except ImportError as exc:
            raise NotImplementedError(f"the nn/optim/losses modules are not here yet: {exc}")
        common.require_backend(backend)
        rng = np.random.default_rng(0)
        self.model = nn.DecoderLM(vocab_size=self.VOCAB, max_len=N, embed_dim=64, num_layers=2,
                                  num_heads=4, backend=backend, rng=rng)
        self.optimizer = optim.AdamW(self.model.parameters(), lr=1e-3)
        self.cross_entropy = cross_entropy
        tokens = rng.integers(0, self.VOCAB, (self.BATCH, N + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]  # (BATCH, N) each
        self._step()  # warm-up: compiles the attention kernels for this model

    def _step(self):
        self.optimizer.zero_grad()
        logits = self.model(self.inputs)  # (BATCH, N, VOCAB)
        loss = self.cross_entropy(logits, self.targets)
        loss.backward()
        self.optimizer.step()
        return loss

    def time_step(self, backend, N):
        self._step()

    def peakmem_step(self, backend, N):
        self._step()
