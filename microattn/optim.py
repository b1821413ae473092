"""Optimizers (SGD, AdamW), gradient clipping and a warm-up + cosine learning-rate schedule.

PyTorch's semantics, on NumPy arrays, updating each parameter's ``.data`` in place.
State (``state_dict``) is plain Python numbers and NumPy array copies, keyed by the
parameter's index in ``params``, so a checkpoint restores a run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .tensor import Tensor


class Optimizer:
    """Base class: ``params`` (a list of Tensors), ``lr``, per-parameter ``state``.

    Subclasses define ``update(index, param, grad, state)``; parameters whose ``.grad`` is
    None are skipped (their state does not advance), as in PyTorch.
    """

    hyperparameters: tuple[str, ...] = ("lr",)

    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = self._unique(params)
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[int, dict] = {}

    @staticmethod
    def _unique(params) -> list[Tensor]:
        if isinstance(params, Tensor):
            params = [params]
        unique, seen = [], set()
        for param in params:
            if not isinstance(param, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(param).__name__}")
            if not param.requires_grad:
                raise ValueError("optimizer was given a tensor that does not require grad")
            if id(param) not in seen:
                seen.add(id(param))
                unique.append(param)
        if not unique:
            raise ValueError("optimizer got an empty parameter list")
        return unique

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self.update(index, param, param.grad, self.state.setdefault(index, {}))

    def update(self, index: int, param: Tensor, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Hyperparameters and a copy of every per-parameter state array."""
        return {
            "hyperparameters": {name: getattr(self, name) for name in self.hyperparameters},
            "state": {
                index: {key: (value.copy() if isinstance(value, np.ndarray) else value)
                        for key, value in entry.items()}
                for index, entry in self.state.items()
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for index, entry in state_dict["state"].items():
            if not 0 <= int(index) < len(self.params):
                raise ValueError(f"optimizer state names parameter {index}, but there are {len(self.params)}")
            for key, value in entry.items():
                if isinstance(value, np.ndarray) and value.shape != self.params[int(index)].shape:
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {index} has shape {value.shape}, "
                        f"the parameter {self.params[int(index)].shape}"
                    )
        for name, value in state_dict["hyperparameters"].items():
            setattr(self, name, value)
        self.state = {
            int(index): {key: (np.array(value, copy=True) if isinstance(value, np.ndarray) else value)
                         for key, value in entry.items()}
            for index, entry in state_dict["state"].items()
        }


class SGD(Optimizer):
    """PyTorch's SGD (dampening 0)::

        g = grad + weight_decay * p
        buf = g                      (first step)   else  buf = momentum * buf + g
        g = g + momentum * buf       (nesterov)     else  g = buf      (when momentum > 0)
        p -= lr * g
    """

    hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)

    def update(self, index, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if self.momentum:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = np.array(grad, dtype=param.dtype, copy=True)
            else:
                state["momentum_buffer"] *= self.momentum
                state["momentum_buffer"] += grad
            buf = state["momentum_buffer"]
            grad = grad + self.momentum * buf if self.nesterov else buf
        param.data -= (self.lr * grad).astype(param.dtype, copy=False)


class AdamW(Optimizer):
    """PyTorch's AdamW (amsgrad off), step t counted per parameter::

        p -= lr * weight_decay * p                 (decoupled decay, before the Adam step)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr)
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)

    def update(self, index, param, grad, state):
        beta1, beta2 = self.betas
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param.data)
            state["exp_avg_sq"] = np.zeros_like(param.data)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        param.data *= 1 - self.lr * self.weight_decay
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = self.lr / bias_correction1
        denom = np.sqrt(v) / math.sqrt(bias_correction2) + self.eps
        param.data -= (step_size * m / denom).astype(param.dtype, copy=False)


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients in place so their joint L2 norm is at most ``max_norm``.

    PyTorch's rule: ``coef = max_norm / (total_norm + 1e-6)``, gradients multiplied by
    ``min(coef, 1)``. Returns the total norm before clipping (a Python float).
    """
    if isinstance(params, Tensor):
        params = [params]
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return 0.0
    total_norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    coef = min(max_norm / (total_norm + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total_norm


class CosineSchedule:
    """Linear warm-up to the optimizer's initial ``lr``, then cosine decay to ``min_lr``.

    ``lr_at(step)`` for step = 0, 1, ...::

        step < warmup_steps:        base_lr * (step + 1) / warmup_steps
        warmup_steps <= step < total_steps:
            min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
        step >= total_steps:        min_lr

    Worked example: base_lr 1.0, warmup 2, total 6, min_lr 0: steps 0..6 give
    0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0. The optimizer's ``lr`` is set to ``lr_at(0)``
    on construction; call ``step()`` after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.base_lr, self.min_lr = optimizer.lr, float(min_lr)
        self.step_count = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self) -> float:
        """Advance one step; set and return the optimizer's new ``lr``."""
        self.step_count += 1
        self.optimizer.lr = self.lr_at(self.step_count)
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "base_lr": self.base_lr, "min_lr": self.min_lr, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps, self.total_steps = state["warmup_steps"], state["total_steps"]
        self.base_lr, self.min_lr, self.step_count = state["base_lr"], state["min_lr"], state["step_count"]
        self.optimizer.lr = self.lr_at(self.step_count)
