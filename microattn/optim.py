"""Optimizers (SGD, AdamW), gradient clipping and a warm-up + cosine learning-rate schedule.

PyTorch's semantics, on NumPy arrays, updating each parameter's ``.data`` in place.
State (``state_dict``) is plain Python numbers and NumPy array copies, keyed by the
parameter's index in ``params``, so a checkpoint restores a run exactly.

Every hyperparameter is checked where it enters, by the constructor and again by
``load_state_dict``: a NaN, an infinity or a value out of range (lr < 0, betas outside
[0, 1), ...) is a ValueError naming the argument and what was expected, instead of a run
that trains to NaN. As in PyTorch, lr = 0 is allowed (a no-op step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .fused import adamw_update
from .tensor import Tensor

FINITE_NON_NEGATIVE = "a finite number >= 0"


def check_number(owner: str, name: str, value, expected: str = FINITE_NON_NEGATIVE, ok=None) -> float:
    """``value`` as a float, checked: TypeError unless it is a real number, ValueError
    (``"AdamW: eps must be a finite number >= 0, got nan"``) unless ``ok(value)`` holds;
    ``ok`` defaults to finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r:.40} ({type(value).__name__})")
    value = float(value)
    if not (ok(value) if ok is not None else math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be {expected}, got {value}")
    return value


def check_count(owner: str, name: str, value) -> int:
    """``value`` as an int, checked: an integer >= 0 (TypeError, ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r:.40} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{owner}: {name} must be an integer >= 0, got {value}")
    return int(value)


def check_learning_rate(owner: str, lr) -> float:
    return check_number(owner, "lr", lr, f"{FINITE_NON_NEGATIVE} (the learning rate)")


class Optimizer:
    """Base class: ``params`` (a list of Tensors), ``lr``, per-parameter ``state``.

    Subclasses define ``update(index, param, grad, state)``; parameters whose ``.grad`` is
    None are skipped (their state does not advance), as in PyTorch. They also define
    ``check_hyperparameters(**values) -> dict`` (the checked values, the same names) and
    ``state_keys(hyperparameters)`` (what a per-parameter state entry holds: name -> int
    or np.ndarray), which ``load_state_dict`` checks a loaded state against.
    """

    hyperparameters: tuple[str, ...] = ("lr",)

    def __init__(self, params: Iterable[Tensor], lr: float, **hyperparameters):
        self.params = self._unique(params)
        for name, value in self.check_hyperparameters(lr=lr, **hyperparameters).items():
            setattr(self, name, value)
        self.state: dict[int, dict] = {}

    @classmethod
    def check_hyperparameters(cls, lr) -> dict:
        return {"lr": check_learning_rate(cls.__name__, lr)}

    def state_keys(self, hyperparameters: dict) -> dict:
        return {}

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

    def _check_state_entry(self, index, entry, keys: dict) -> None:
        owner = type(self).__name__
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.params):
            raise ValueError(f"{owner}: the state names parameter {index!r:.20}, but there are {len(self.params)}")
        if not isinstance(entry, dict) or set(entry) != set(keys):
            found = ", ".join(map(str, entry)) if isinstance(entry, dict) else repr(entry)
            raise ValueError(f"{owner}: the state of parameter {index} should hold {', '.join(keys) or 'nothing'}, "
                             f"found {found or 'nothing'}")
        param = self.params[index]
        for key, kind in keys.items():
            value = entry[key]
            if kind is int:
                check_count(owner, f"{key} of parameter {index}", value)
            elif not isinstance(value, np.ndarray):
                raise TypeError(f"{owner}: {key} of parameter {index} should be an array, found {value!r:.40}")
            elif value.shape != param.shape:
                raise ValueError(f"{owner}: {key} of parameter {index} has shape {value.shape}, "
                                 f"the parameter {param.shape}")
            elif value.dtype != param.dtype:
                raise ValueError(f"{owner}: {key} of parameter {index} is {value.dtype}, expected {param.dtype} "
                                 "(the parameter's dtype)")

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
        """Restore what :meth:`state_dict` returned. Everything is checked first (the
        hyperparameters as the constructor checks them; each state entry's keys, types,
        shapes and dtypes); on any error nothing has changed."""
        owner = type(self).__name__
        if not isinstance(state_dict, dict) or set(state_dict) != {"hyperparameters", "state"}:
            raise ValueError(f"{owner}: expected a state dict with the entries 'hyperparameters' and 'state'")
        given = state_dict["hyperparameters"]
        if not isinstance(given, dict) or set(given) != set(self.hyperparameters):
            found = ", ".join(map(str, given)) if isinstance(given, dict) else repr(given)
            raise ValueError(f"{owner}: expected the hyperparameters {', '.join(self.hyperparameters)}, "
                             f"found {found}")
        hyperparameters = self.check_hyperparameters(**given)
        if not isinstance(state_dict["state"], dict):
            raise ValueError(f"{owner}: expected a dict of per-parameter states, found {state_dict['state']!r:.40}")
        for index, entry in state_dict["state"].items():
            self._check_state_entry(index, entry, self.state_keys(hyperparameters))
        for name, value in hyperparameters.items():
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
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    @classmethod
    def check_hyperparameters(cls, lr, momentum, weight_decay, nesterov) -> dict:
        checked = {"lr": check_learning_rate("SGD", lr), "momentum": check_number("SGD", "momentum", momentum),
                   "weight_decay": check_number("SGD", "weight_decay", weight_decay), "nesterov": bool(nesterov)}
        if checked["nesterov"] and checked["momentum"] <= 0:
            raise ValueError("SGD: nesterov momentum needs momentum > 0")
        return checked

    def state_keys(self, hyperparameters):
        return {"momentum_buffer": np.ndarray} if hyperparameters["momentum"] else {}

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
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @classmethod
    def check_hyperparameters(cls, lr, betas, eps, weight_decay) -> dict:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r:.40}")
        in_range = "a number in [0, 1)"
        return {"lr": check_learning_rate("AdamW", lr),
                "betas": tuple(check_number("AdamW", "betas", beta, in_range, lambda b: 0 <= b < 1) for beta in betas),
                "eps": check_number("AdamW", "eps", eps),
                "weight_decay": check_number("AdamW", "weight_decay", weight_decay)}

    def state_keys(self, hyperparameters):
        return {"step": int, "exp_avg": np.ndarray, "exp_avg_sq": np.ndarray}

    def step(self) -> None:
        """Each parameter in one fused pass (``fused.adamw_update``); ``update`` below is
        the same step in NumPy, the readable twin the tests compare against."""
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            state = self.state.setdefault(index, {})
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = np.zeros_like(param.data)
                state["exp_avg_sq"] = np.zeros_like(param.data)
            arrays = (param.data, param.grad, state["exp_avg"], state["exp_avg_sq"])
            if not all(a.flags.c_contiguous and a.dtype == param.dtype for a in arrays):
                self.update(index, param, param.grad, state)  # a view would not update in place
                continue
            state["step"] += 1
            adamw_update(*arrays, step=state["step"], lr=self.lr, betas=self.betas, eps=self.eps,
                         weight_decay=self.weight_decay)

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
    ``max_norm = inf`` clips nothing; a NaN or negative ``max_norm`` is a ValueError.
    """
    check_number("clip_grad_norm_", "max_norm", max_norm, "a number >= 0 (inf: no clipping)", lambda m: m >= 0)
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
        self.optimizer = optimizer
        self._set(warmup_steps=warmup_steps, total_steps=total_steps, base_lr=optimizer.lr, min_lr=min_lr,
                  step_count=0)

    def _set(self, warmup_steps, total_steps, base_lr, min_lr, step_count) -> None:
        """Check every value, then set them all and the optimizer's lr for ``step_count``."""
        owner = "CosineSchedule"
        warmup, total = check_count(owner, "warmup_steps", warmup_steps), check_count(owner, "total_steps", total_steps)
        if not warmup <= total:
            raise ValueError(f"{owner}: need 0 <= warmup_steps <= total_steps, got {warmup}, {total}")
        checked = (warmup, total, check_number(owner, "base_lr", base_lr), check_number(owner, "min_lr", min_lr),
                   check_count(owner, "step_count", step_count))
        self.warmup_steps, self.total_steps, self.base_lr, self.min_lr, self.step_count = checked
        self.optimizer.lr = self.lr_at(self.step_count)

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
        """Restore what :meth:`state_dict` returned, every value checked first."""
        expected = ("warmup_steps", "total_steps", "base_lr", "min_lr", "step_count")
        if not isinstance(state, dict) or set(state) != set(expected):
            found = ", ".join(map(str, state)) if isinstance(state, dict) else repr(state)
            raise ValueError(f"CosineSchedule: expected the entries {', '.join(expected)}, found {found}")
        self._set(**state)
