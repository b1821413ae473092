"""The demo's checkpoint file: format, atomic save, load, and the checks on what it holds.

Format: one ``.npz`` (a zip of ``.npy`` files) holding every NumPy array of the state,
plus ``__skeleton__``, a JSON record of the nesting and of every plain scalar. No pickle
is involved either way, so loading a file from elsewhere runs no code. Tagged nodes keep
the types JSON would lose: dict keys that are not strings, tuples, NumPy scalars (stored
as 0-d arrays, dtype intact)::

    {"dict": [[{"value": "step"}, {"value": 7}],
              [{"value": "losses"}, {"array": "a0", "scalar": false}], ...]}

Atomic save: ``np.savez`` into a temporary file next to the target
(``checkpoint.npz.<8 characters>.tmp``), ``fsync``, then ``os.replace`` over the old
checkpoint: a crash at any moment leaves either the old checkpoint or the new one, never a
partial file. A save killed outright (``kill -9``, power loss) can still leave its
temporary file behind; the next save or load of the same checkpoint removes such leftovers.
A save holds an exclusive ``flock`` on its temporary file until it is renamed, so the
cleanup can tell a leftover (nobody holds it: its writer is dead, and the kernel drops
the locks of a dead process) from a save in progress in another process, which it leaves
alone. Only names of exactly that pattern, for that checkpoint, are ever touched. (Where
``fcntl`` does not exist, i.e. on Windows, no leftovers are removed.)

Loading checks everything before anything is used: a file that is not a checkpoint, or
whose contents are not what a run needs, raises :class:`CheckpointError`, whose message
names the file, what was wrong and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import zipfile
import zlib
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: saves are still atomic; leftovers are not cleaned up
    fcntl = None

CHECKPOINT_NAME = "checkpoint.npz"
SKELETON = "__skeleton__"


class CheckpointError(ValueError):
    """A file that is not a usable microattn checkpoint; the message says what is wrong."""


def checkpoint_path(path) -> Path:
    """``path`` itself if it is a file or names a ``.npz``, else ``path/checkpoint.npz``."""
    path = Path(path)
    return path if path.is_file() or path.suffix == ".npz" else path / CHECKPOINT_NAME


# ----------------------------------------------------------------------------- save


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of arrays, numbers, strings, None) to
    ``path`` atomically: a temporary file next to it, fsync, then os.replace."""
    path = Path(path)
    arrays = {}
    skeleton = _pack(state, arrays)
    arrays[SKELETON] = np.array(json.dumps(skeleton))
    remove_stale_temp_files(path)
    handle, temp_path = _create_locked_temp_file(path)
    try:
        with os.fdopen(handle, "wb") as file:  # closing it releases the lock, after the rename
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return path


def _temp_name_pattern(path: Path) -> re.Pattern:
    """``checkpoint.npz.<8 of [a-z0-9_]>.tmp``: this module's temporary names for ``path``
    (and those of ``tempfile.mkstemp``, which earlier versions used)."""
    return re.compile(re.escape(path.name) + r"\.[a-z0-9_]{8}\.tmp")


def _create_locked_temp_file(path: Path) -> tuple[int, Path]:
    """A new temporary file for ``path``, opened for writing and exclusively locked:
    (file descriptor, its path)."""
    while True:
        temp_path = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is None:
            return handle, temp_path
        fcntl.flock(handle, fcntl.LOCK_EX)
        # A cleanup in another process may have taken the lock first and unlinked the
        # file between our open and our lock; then the name is gone, and we try again.
        try:
            if os.stat(temp_path).st_ino == os.fstat(handle).st_ino:
                return handle, temp_path
        except FileNotFoundError:
            pass
        os.close(handle)


def remove_stale_temp_files(path) -> list[Path]:
    """Delete the temporary files that killed saves of checkpoint ``path`` left behind
    (names matching its own pattern, locked by no live process); returns those deleted."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern = _temp_name_pattern(path)
    removed = []
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or candidate.is_symlink() or not candidate.is_file():
            continue
        try:
            handle = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone already, or not ours to open
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a save in progress holds it
            os.close(handle)
            continue
        try:
            if os.stat(candidate).st_ino == os.fstat(handle).st_ino:
                candidate.unlink()
                removed.append(candidate)
        except OSError:  # renamed meanwhile, or a read-only directory: leave it
            pass
        finally:
            os.close(handle)
    return removed


# ----------------------------------------------------------------------------- load


def load_checkpoint(path) -> dict:
    """The state that :func:`save_checkpoint` wrote, from a file or a directory holding
    ``checkpoint.npz``. FileNotFoundError if there is none; CheckpointError if the file is
    not a microattn checkpoint or is corrupt."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    remove_stale_temp_files(path)

    def broken(reason):
        return CheckpointError(f"{path} is not a microattn checkpoint, or it is corrupt: {reason}")

    if not zipfile.is_zipfile(path):
        raise broken("it is not an .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "pickle" in str(error):  # NumPy refuses object arrays; a checkpoint never holds any
            raise broken("it holds Python objects (pickled data), which a microattn checkpoint never does") from None
        raise broken(f"an entry cannot be read ({error})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise broken(f"an entry cannot be read ({error})") from None
    skeleton = arrays.pop(SKELETON, None)
    if skeleton is None:
        raise broken(f"it has no {SKELETON} entry (the layout record every checkpoint holds)")
    if skeleton.shape != () or skeleton.dtype.kind != "U":
        raise broken(f"its {SKELETON} entry is not a JSON string")
    try:
        return _unpack(json.loads(str(skeleton)), arrays)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise broken(f"its {SKELETON} record is malformed ({type(error).__name__}: {error})") from None


# ----------------------------------------------------------------------------- the format


def _pack(node, arrays: dict):
    if isinstance(node, (np.ndarray, np.generic)):
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(node)
        return {"array": key, "scalar": isinstance(node, np.generic)}
    if isinstance(node, dict):
        return {"dict": [[_pack(k, arrays), _pack(v, arrays)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        return {type(node).__name__: [_pack(v, arrays) for v in node]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint")


def _unpack(node, arrays: dict):
    """The inverse of :func:`_pack`; ValueError/KeyError/TypeError on a malformed record."""
    if not isinstance(node, dict) or not node:
        raise ValueError(f"expected a tagged node, got {node!r:.60}")
    tag, payload = next(iter(node.items()))
    if tag == "array":
        array = arrays[payload]  # KeyError: it names an array the file does not hold
        return array[()] if node.get("scalar") else array
    if tag == "dict":
        return {_unpack(k, arrays): _unpack(v, arrays) for k, v in payload}
    if tag == "list":
        return [_unpack(v, arrays) for v in payload]
    if tag == "tuple":
        return tuple(_unpack(v, arrays) for v in payload)
    if tag == "value" and (payload is None or isinstance(payload, (bool, int, float, str))):
        return payload
    raise ValueError(f"unknown node {node!r:.60}")


# ----------------------------------------------------------------------------- a run's state


# What a training run's checkpoint holds (demo.loop.Run.state), and the type of each entry.
RUN_STATE = {"config": str, "model": dict, "optimizer": dict, "schedule": dict, "step": int, "losses": np.ndarray}


def check_run_state(state, path) -> None:
    """CheckpointError unless ``state`` has exactly the entries of a run, of the right
    types: the config a JSON string, the step a non-negative integer, one loss per step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected the state of a run (a dict), found a {type(state).__name__}")
    missing = [name for name in RUN_STATE if name not in state]
    extra = [repr(name) for name in state if name not in RUN_STATE]
    if missing or extra:
        raise CheckpointError(f"{path}: expected the entries {', '.join(RUN_STATE)}; "
                              + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                        extra and f"unexpected {', '.join(extra)}"])))
    for name, kind in RUN_STATE.items():
        value = state[name]
        if kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = "a non-negative integer" if kind is int else f"a {kind.__name__}"
            raise CheckpointError(f"{path}: its {name!r} entry should be {expected}, found {value!r:.60}")
    losses = state["losses"]
    if losses.ndim != 1 or losses.dtype.kind != "f" or len(losses) != state["step"]:
        raise CheckpointError(f"{path}: expected one float loss per step taken ({state['step']}), found an array "
                              f"of shape {losses.shape}, dtype {losses.dtype}")


def check_parameters(expected: dict, found: dict, path) -> None:
    """CheckpointError unless ``found`` (name -> array, from a checkpoint) has exactly the
    names of ``expected`` (a model's state_dict), each with its shape and dtype. Arrays of
    another dtype are refused, not cast: a float64 copy of a float32 model would not
    resume bit for bit, and nothing this program writes holds one."""
    missing = [name for name in expected if name not in found]
    extra = [repr(name) for name in found if name not in expected]
    if missing or extra:
        def some(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        raise CheckpointError(f"{path}: its parameters do not fit the model its config describes: "
                              + "; ".join(filter(None, [missing and f"missing {some(missing)}",
                                                        extra and f"unexpected {some(extra)}"])))
    for name, want in expected.items():
        have = found[name]
        if not isinstance(have, np.ndarray):
            raise CheckpointError(f"{path}: parameter {name} should be an array, found {have!r:.60}")
        if have.shape != want.shape:
            raise CheckpointError(f"{path}: parameter {name} has shape {have.shape}, expected {want.shape}")
        if have.dtype != want.dtype:
            raise CheckpointError(f"{path}: parameter {name} is {have.dtype}, expected {want.dtype} "
                                  f"(the demo's models are {want.dtype}; arrays are not cast on load)")
