"""Hugging Face checkpoint directories: ``from_pretrained`` and ``save_pretrained``.

A directory holds ``config.json`` and the weights as safetensors: one ``model.safetensors``,
or shards named by ``model.safetensors.index.json`` (its ``weight_map``: tensor name ->
file). Tensors are read through the ``safetensors`` package's NumPy API (the ``models``
extra), never through torch; bfloat16, which NumPy lacks, is widened to float32 from its
bits (exact). Every weight is converted to the requested dtype as it is read.

``save_pretrained`` writes ``config.json`` and one ``model.safetensors`` with
transformers' names and layouts, so transformers (or ``from_pretrained``) loads the result.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from ..nn.layers import skip_init
from ..nn.module import Module
from .families import Architecture, Weights, read_config
from .model import CausalLM

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError("reading and writing checkpoints needs the safetensors package: "
                          "pip install 'microattn[models]'") from exc
    return safetensors


def from_pretrained(directory, dtype=np.float32, *, backend: str = "auto") -> CausalLM:
    """Load a Hugging Face checkpoint directory into a ``CausalLM`` of ``dtype`` (float32
    or float64). ValueError for a config the families do not support (naming the field) and
    for missing, unexpected or wrongly shaped tensors (naming them)."""
    directory = pathlib.Path(directory)
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG}: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a {type(config).__name__}; expected a JSON object")  # noqa: TRY004
    read_config(config)  # unsupported fields fail here, before any weight is read
    with skip_init():  # every weight is overwritten below: drawing random ones would cost seconds
        model = CausalLM(config, dtype=dtype, backend=backend)
    with _Tensors(directory) as tensors:
        _load(model, tensors)
    return model.eval()


def save_pretrained(model: CausalLM, directory) -> None:
    """Write ``model`` as a Hugging Face checkpoint: config.json and model.safetensors.

    Each file is written under a temporary name and renamed into place, so a reader never
    sees half a file; a new directory appears whole (written beside it, then renamed). In
    an existing directory, a sharded checkpoint left there (index and shards) is removed
    after the new weights are in place, so the directory holds one checkpoint.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_pretrained takes a microattn.models.CausalLM, got {type(model).__name__}")
    safetensors = _safetensors()
    tensors = {name: array for name, array in _theirs(model)}
    config = dict(model.config)
    config.pop("torch_dtype", None)
    config["dtype"] = np.dtype(model.dtype).name
    directory = pathlib.Path(directory)
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            safetensors.numpy.save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
            (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    stale_shards = _shards(directory) if (directory / INDEX).is_file() else []
    _replace(directory / WEIGHTS,
             lambda path: safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"}))
    _replace(directory / CONFIG,
             lambda path: pathlib.Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    for name in [INDEX, *stale_shards]:
        if name != WEIGHTS:
            (directory / name).unlink(missing_ok=True)


def _replace(target: pathlib.Path, write) -> None:
    """Write through ``write(temporary path)`` beside ``target``, then rename over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _shards(directory: pathlib.Path) -> list[str]:
    weight_map = json.loads((directory / INDEX).read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{directory / INDEX} has no weight_map (a dict: tensor name -> file)")  # noqa: TRY004
    return sorted(set(weight_map.values()))


# ----------------------------------------------------------------------------- reading


class _Tensors(contextlib.ExitStack):
    """The tensors of a checkpoint directory by name, read on demand (``get(name)``)."""

    def __init__(self, directory: pathlib.Path):
        super().__init__()
        self.directory = directory
        if (directory / INDEX).is_file():
            files = _shards(directory)
        elif (directory / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            found = sorted(path.name for path in directory.iterdir())
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS} nor {INDEX} (found {found}); "
                                    f"only safetensors checkpoints are read")
        self.files = files

    def __enter__(self):
        super().__enter__()
        safetensors = _safetensors()
        self.file_of, self.handles = {}, {}
        for name in self.files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.directory / INDEX} names {name}, which is missing")
            try:
                handle = self.enter_context(safetensors.safe_open(str(path), framework="numpy"))
            except safetensors.SafetensorError as error:
                raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
            self.handles[name] = handle
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                self.file_of[key] = name
        return self

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        handle = self.handles[self.file_of[name]]
        try:
            if handle.get_slice(name).get_dtype() == "BF16":
                return _read_bfloat16(self.directory / self.file_of[name], name)
            return handle.get_tensor(name)
        except (_safetensors().SafetensorError, TypeError) as error:  # TypeError: a dtype NumPy lacks
            raise ValueError(f"{self.directory / self.file_of[name]}: tensor {name!r} cannot be read: {error}") from None


def _read_bfloat16(path: pathlib.Path, name: str) -> np.ndarray:
    """A bfloat16 tensor as float32: its 16 bits are the top half of the float32 (exact).

    The safetensors layout: 8 bytes little-endian header length, a JSON header giving each
    tensor's dtype, shape and data_offsets, then the data."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        entry = json.loads(file.read(header_length))[name]
    start, end = entry["data_offsets"]
    bits = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_length + start)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


# ----------------------------------------------------------------------------- name mapping


def _entries(arch: Architecture) -> list[tuple[Weights, str, str]]:
    """(entry, our module prefix, their name prefix) for every global and per-layer entry."""
    family = arch.family
    entries = [(w, "", "") for w in family.global_names
               if not (w.ours == ("lm_head",) and arch.tie_embeddings)
               and not (w.ours == ("position_embedding",) and arch.max_positions is None)]
    for i in range(arch.num_layers):
        entries += [(w, f"blocks.{i}.", family.layer_prefix.format(i=i)) for w in family.layer_names]
    return entries


def _tensor_pairs(model: CausalLM):
    """(their tensor name, our Parameters, stored (in, out)) for every checkpoint tensor."""
    for entry, ours_prefix, theirs_prefix in _entries(model.arch):
        modules = [_submodule(model, ours_prefix + path) for path in entry.ours]
        for kind in ("weight", "bias"):
            params = [getattr(module, kind, None) for module in modules]
            if all(param is None for param in params):
                continue
            yield f"{theirs_prefix}{entry.theirs}.{kind}", params, entry.conv1d and kind == "weight"


def _submodule(model: Module, path: str):
    for name in path.split("."):
        model = getattr(model, name)
    return model


def _load(model: CausalLM, tensors: _Tensors) -> None:
    family = model.arch.family
    available = tensors.names()
    prefix = family.layer_prefix.split(".")[0] + "."  # "model." / "transformer."
    used, missing, updates = set(), [], []
    for name, params, conv1d in _tensor_pairs(model):
        found = name if name in available else name.removeprefix(prefix)  # base-model checkpoints
        if found not in available:
            missing.append(name)
            continue
        used.add(found)
        array = tensors.get(found)
        if conv1d:
            array = array.T  # (in, out) -> (out, in)
        expected = (sum(p.shape[0] for p in params), *params[0].shape[1:])
        if array.shape != expected:
            raise ValueError(f"checkpoint tensor {found!r} has shape {array.shape} (as (out, in)); "
                             f"this config needs {expected}")
        parts = np.split(array, np.cumsum([p.shape[0] for p in params])[:-1], axis=0)
        updates += [(param, part) for param, part in zip(params, parts)]
    unexpected = sorted(name for name in available - used
                        if not any(f".{name}".endswith(f".{suffix}") for suffix in family.ignored_weights)
                        and not (model.arch.tie_embeddings and name == "lm_head.weight"))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config.json ({family.model_type}): "
                         f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for param, part in updates:
        param.data = np.ascontiguousarray(part, dtype=param.dtype)


def _theirs(model: CausalLM):
    """(their name, array) for every checkpoint tensor, in their layout."""
    for name, params, conv1d in _tensor_pairs(model):
        array = np.concatenate([param.data for param in params], axis=0) if len(params) > 1 else params[0].data
        yield name, np.ascontiguousarray(array.T if conv1d else array)
