"""Parameter, Module and ModuleList: the bookkeeping every layer shares.

A ``Module`` registers what is assigned to it: a ``Parameter`` becomes a parameter, a
``Module`` a submodule, and ``register_buffer`` adds a non-trainable NumPy array that is
still part of the state (e.g. a dropout counter). Everything is kept in insertion order,
so ``named_parameters()`` and ``state_dict()`` are deterministic::

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(3, 2)
    >>> [name for name, _ in Net().named_parameters()]
    ['fc.weight', 'fc.bias']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..tensor import Tensor


class Parameter(Tensor):
    """A trainable Tensor: a copy of ``data`` with ``requires_grad=True``."""

    def __init__(self, data):
        array = np.array(data.data if isinstance(data, Tensor) else data, copy=True)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"a Parameter must be floating point, got dtype {array.dtype}")
        super().__init__(array, requires_grad=True)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class of every layer. Subclasses call ``super().__init__()`` first, assign
    parameters and submodules as attributes, and define ``forward``.

    ``Module.generation`` counts attribute assignments (parameters, submodules, settings
    such as a dropout's ``p``) to any module: whoever caches what a model is made of
    (``nn/lean.py``'s decoding plans) rebuilds when it moves. Not covered: a parameter's
    ``.data`` (read it afresh each time) and ``training`` (``train()``/``eval()``).
    """

    generation = 0

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist already
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"call super().__init__() in {type(self).__name__}.__init__ first")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = np.asarray(value)  # e.g. self.step = self.step + 1
            return
        for registry in (self._parameters, self._modules, self._buffers):
            registry.pop(name, None)  # re-assigning a name replaces what it was
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        Module.generation += 1
        # Also an ordinary attribute: reading self.weight is then a plain lookup, not a
        # failed one followed by __getattr__ (~1 us, ~130 times per decoded token).
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        Module.generation += 1
        removed = [registry.pop(name, None) for registry in (self._parameters, self._modules, self._buffers)]
        if name in self.__dict__:
            object.__delattr__(self, name)
        elif not any(entry is not None for entry in removed):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getattr__(self, name):  # only called when normal lookup fails (buffers, list items)
        for registry in ("_parameters", "_modules", "_buffers"):
            entries = self.__dict__.get(registry, {})
            if name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name: str, array) -> None:
        """A non-trainable array saved in ``state_dict`` (read it as ``self.<name>``)."""
        self.__dict__.pop(name, None)
        self._buffers[name] = np.array(array, copy=True)

    # ------------------------------------------------------------------ traversal

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (name ``prefix``) and every submodule, depth first, dotted names."""
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) in registration order; a shared Parameter appears once."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, param in module._parameters.items():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self) -> list[Parameter]:
        return [param for _, param in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        for prefix, module in self.named_modules():
            for name, buffer in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), buffer

    def num_parameters(self) -> int:
        return sum(param.size for param in self.parameters())

    # ------------------------------------------------------------------ modes and grads

    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> a copy of every parameter's data and every buffer, in a fixed order."""
        state = {name: param.data.copy() for name, param in self.named_parameters()}
        state.update((name, buffer.copy()) for name, buffer in self.named_buffers())
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays from ``state`` into this module's parameters and buffers.

        Every entry must match the existing one's shape (ValueError) and dtype (TypeError);
        nothing is changed unless all entries match. With ``strict``, a missing or an
        unexpected name raises KeyError listing them; otherwise returns
        ``(missing, unexpected)``.
        """
        targets = dict(self.named_parameters())
        buffer_owners = {}
        for prefix, module in self.named_modules():
            for name in module._buffers:
                buffer_owners[f"{prefix}.{name}" if prefix else name] = (module, name)
        expected = list(targets) + list(buffer_owners)
        missing = [name for name in expected if name not in state]
        unexpected = [name for name in state if name not in targets and name not in buffer_owners]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        updates = []
        for name in expected:
            if name not in state:
                continue
            value = np.asarray(state[name])
            if name in targets:
                current = targets[name].data
            else:
                module, attr = buffer_owners[name]
                current = module._buffers[attr]
            if value.shape != current.shape:
                raise ValueError(
                    f"load_state_dict: {name!r} has shape {value.shape} in the state, "
                    f"but {current.shape} in the model"
                )
            if value.dtype != current.dtype:
                raise TypeError(
                    f"load_state_dict: {name!r} has dtype {value.dtype} in the state, "
                    f"but {current.dtype} in the model"
                )
            updates.append((name, value))
        for name, value in updates:  # all checked: now change things
            if name in targets:
                targets[name].data = value.copy()
            else:
                module, attr = buffer_owners[name]
                module._buffers[attr] = value.copy()
        return missing, unexpected

    # ------------------------------------------------------------------ calling

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"  ({name}): " + repr(module).replace("\n", "\n  ")
                 for name, module in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(lines) + "\n)" if lines else ")")


class ModuleList(Module):
    """A list of modules, registered under the names "0", "1", ..."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._modules[str(len(self._modules))] = module
        Module.generation += 1
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index])
        return list(self._modules.values())[index]
