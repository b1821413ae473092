"""Losses. ``cross_entropy`` is one fused Function: log-softmax and the negative
log-likelihood together, so the backward is the familiar ``softmax - one_hot``."""

from __future__ import annotations

import numpy as np

from .autograd import Function
from .tensor import Tensor

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Function):
    """logits (M, C), targets (M,) int -> per-row loss (M,) or its mean / sum.

    Rows whose target is ``ignore_index`` contribute 0 and are not counted by "mean"
    (PyTorch's rule; if every row is ignored, "mean" is 0/0 = NaN, as in PyTorch).
    """

    @staticmethod
    def forward(ctx, logits, *, targets, ignore_index, reduction):
        valid = targets != ignore_index  # (M,)
        safe_targets = np.where(valid, targets, 0)
        row_max = logits.max(axis=-1, keepdims=True)  # (M, 1), shift for stability
        shifted = logits - row_max
        lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (M, 1)
        log_probs = shifted - lse  # (M, C)
        picked = np.take_along_axis(log_probs, safe_targets[:, None], axis=-1)[:, 0]  # (M,)
        losses = np.where(valid, -picked, 0).astype(logits.dtype)
        count = valid.sum()
        ctx.save_for_backward(log_probs, safe_targets, valid)
        ctx.reduction, ctx.count = reduction, count
        return reduce_losses(losses, count, reduction)

    @staticmethod
    def backward(ctx, grad):
        log_probs, safe_targets, valid = ctx.saved_tensors
        # forward: loss_m = -(log_softmax(logits_m))[t_m] = lse_m - logits_m[t_m]
        #   -> dlogits_m = softmax(logits_m) - one_hot(t_m), times the row's upstream grad
        # 1. the row's upstream gradient by reduction: grad_m, grad, or grad / count
        if ctx.reduction == "none":
            row_grad = grad
        elif ctx.reduction == "sum":
            row_grad = np.full(valid.shape, grad, dtype=log_probs.dtype)
        else:
            row_grad = np.full(valid.shape, grad / max(ctx.count, 1), dtype=log_probs.dtype)
        row_grad = np.where(valid, row_grad, 0)  # ignored rows get no gradient
        # 2. softmax - one_hot, scaled per row
        dlogits = np.exp(log_probs)
        dlogits[np.arange(len(safe_targets)), safe_targets] -= 1
        return dlogits * row_grad[:, None]


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy of integer class targets under softmax(logits), PyTorch's semantics.

    logits (..., C) Tensor, targets (...) int array -> a scalar ("mean", "sum") or the
    per-element losses (...) ("none"). ``ignore_index`` targets are skipped.

    Example::

        >>> logits = ma.tensor(np.zeros((2, 3)), requires_grad=True)
        >>> float(cross_entropy(logits, np.array([0, 2])).data)  # log 3
        1.0986122886681098
    """
    return apply_cross_entropy(CrossEntropy, logits, targets, ignore_index, reduction)


def reduce_losses(losses, count, reduction):
    """Per-row losses (M,) as the reduction asks: as they are, their sum, or their sum over
    the ``count`` rows not ignored (0/0 = NaN when every row is ignored, as in PyTorch)."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / losses.dtype.type(count)).astype(losses.dtype)


def apply_cross_entropy(function, logits, targets, ignore_index, reduction) -> Tensor:
    """Validate cross-entropy's arguments (before any work), flatten to (M, C) and apply
    ``function`` (this module's CrossEntropy, or the fused one in ``fused.py``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = logits if isinstance(logits, Tensor) else Tensor(np.asarray(logits))
    targets = np.asarray(getattr(targets, "data", targets))
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have the shape of logits without the class axis: logits "
            f"{logits.shape} needs targets {logits.shape[:-1]}, got {targets.shape}"
        )
    num_classes = logits.shape[-1]
    live = targets[targets != ignore_index]
    if live.size and (live.min() < 0 or live.max() >= num_classes):
        raise ValueError(
            f"targets must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got values in [{live.min()}, {live.max()}]"
        )
    flat_logits = logits.reshape(-1, num_classes)  # (M, C)
    loss = function.apply(flat_logits, targets=targets.reshape(-1),
                          ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss
