"""Looking inside a trained model: held-out accuracy, greedy predictions, prompts for
sampling, attention maps and head ablation. Nothing here changes a model for longer than a
call: evaluation modes, ablated heads and wrapped ``forward`` methods are all put back.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import nn
from ..autograd import no_grad
from .tasks import IGNORE, Task, heldout_batches, make_batch


def predict(model, inputs: np.ndarray, *, use_cache: bool = False) -> np.ndarray:
    """Greedy next-token predictions at every position, (B, N) int64, no graph built.

    With ``use_cache`` the sequence goes through the model's KV cache one token at a time,
    as generation does; without, in one causal forward pass. Both read the true inputs
    (teacher forcing), so they must agree: a check of the cache.
    """
    with _eval_mode(model), no_grad():
        if not use_cache:
            return np.asarray(model(inputs).data).argmax(axis=-1)
        caches = model.make_caches()
        steps = [np.asarray(model(inputs[:, i : i + 1], kv_caches=caches).data).argmax(axis=-1)
                 for i in range(inputs.shape[1])]
        return np.concatenate(steps, axis=1)


def evaluate(model, task: Task, seed: int = 0, num_examples: int = 512, *, use_cache: bool = False) -> float:
    """Held-out accuracy: the fraction of answer tokens predicted exactly (greedy)."""
    correct = total = 0
    for batch in heldout_batches(task, seed, num_examples):
        scored = batch.targets != IGNORE
        predictions = predict(model, batch.inputs, use_cache=use_cache)
        correct += int((predictions[scored] == batch.targets[scored]).sum())
        total += int(scored.sum())
    return correct / total


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def first_answer_prompt(task: Task, seed: int, index: int = 0):
    """A held-out example cut just before its first answer: (prompt tokens (1, P), the
    expected continuation: the run of answer tokens that follows)."""
    batch = make_batch(task, seed, index, 1, split="heldout")
    scored = np.flatnonzero(batch.targets[0] != IGNORE)
    first = scored[0]
    run_length = 1
    while first + run_length < task.seq_len and batch.targets[0, first + run_length] != IGNORE:
        run_length += 1
    answer = batch.targets[0, first : first + run_length]
    return batch.inputs[:, : first + 1], answer


@contextlib.contextmanager
def ablate_head(model, layer: int, head: int):
    """Zero one attention head's output for the duration of the ``with`` block.

    Head ``h`` of a layer writes to columns ``h*Dh:(h+1)*Dh`` of the concatenated head
    outputs, which the output projection (weight (out, in), y = x @ W.T) reads through
    the same columns of its weight: zeroing those columns is exactly zeroing the head.
    """
    attention = attention_layers(model)[layer]
    weight = attention.out_proj.weight
    head_dim = weight.shape[1] // attention.num_heads
    saved = weight.data.copy()
    weight.data[:, head * head_dim : (head + 1) * head_dim] = 0
    try:
        yield
    finally:
        weight.data = saved


def attention_layers(model) -> list:
    """The model's MultiHeadAttention modules, first layer first."""
    return [module for module in model.modules() if isinstance(module, nn.MultiHeadAttention)]


def head_ablation(model, task: Task, seed: int = 0, num_examples: int = 512) -> tuple[float, np.ndarray]:
    """(baseline accuracy, drops (layers, heads)): the accuracy lost by zeroing each head."""
    baseline = evaluate(model, task, seed, num_examples)
    layers = attention_layers(model)
    drops = np.zeros((len(layers), layers[0].num_heads))
    for layer in range(len(layers)):
        for head in range(layers[layer].num_heads):
            with ablate_head(model, layer, head):
                drops[layer, head] = baseline - evaluate(model, task, seed, num_examples)
    return baseline, drops


def attention_maps(model, inputs: np.ndarray) -> list[np.ndarray]:
    """Attention weights of every layer for one forward pass: a list of (B, Hq, N, N).

    Each MultiHeadAttention is asked for its weights (``need_weights=True``) by wrapping
    its ``forward`` for this one call.
    """
    maps = []
    originals = []
    for attention in attention_layers(model):
        original = attention.forward

        def capturing(*args, _original=original, **kwargs):
            out, weights = _original(*args, **{**kwargs, "need_weights": True})
            maps.append(np.asarray(weights))
            return out  # what the block expects when it did not ask for weights

        originals.append((attention, original))
        object.__setattr__(attention, "forward", capturing)
    try:
        with _eval_mode(model), no_grad():
            model(inputs)
    finally:
        for attention, _ in originals:
            del attention.__dict__["forward"]
    return maps
