"""Synthetic tasks that a model can only solve by attending to the right earlier token.

Every task makes next-token-prediction batches: ``inputs`` (B, N) int64 token ids and
``targets`` (B, N) int64, where ``targets[b, i]`` is the token the model should predict
after reading ``inputs[b, :i + 1]``, or ``IGNORE`` (-100) where nothing is scored. Only
the answer tokens are scored: the rest of a sequence is random and unpredictable.

Batches are a pure function of ``(seed, split, step)`` (:func:`make_batch`): no generator
state lives anywhere, so a resumed training run sees exactly the data it would have seen,
and the held-out split is a separate stream that training never draws from.

The tasks, each shown as a decoded example (``task.decode``)::

    recall   a3 k7 c0 p5 ... ? k 7 c 0 p 5 a
             16 key-value pairs, one token each, then "?" and 4 of the keys in a shuffled
             order; after each key, predict its value. Needs content-based lookup.
    copy     d h b a l ... | d h b a l ...
             a random string, a separator, then the string again; predict every copied
             token. Needs attention to a fixed relative position.
    needle   . . ! 7 . . . . (30 fillers) . . ?  -> 7
             a marked digit (the needle) near the start, fillers, then "?": predict the
             digit. The needle sits at least ``min_distance`` tokens before the query, so
             a sliding window of ``window`` tokens over ``num_layers`` layers (reach
             ``window * num_layers``) cannot see it when that reach is shorter.
    induction  a 3 k 9 c 0 ... ? k 9 c 0 ...
             recall with key and value as separate tokens: needs an induction head (two
             attention hops), which takes a small model thousands of steps to form.

Beside them, ``text`` (:class:`TextFile`, not one of the synthetic ``TASKS``): any file's
bytes as a language-modelling corpus, every position scored (``microattn train --text``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100  # the target id that cross_entropy skips (its ignore_index)

SPLITS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # (B, N) int64
    targets: np.ndarray  # (B, N) int64, IGNORE except at answer positions


class Task:
    """One synthetic task: its vocabulary, its sequence length, and a generator.

    Subclasses set ``name``, ``summary``, ``seq_len`` (the model's input length),
    ``token_names`` (one printable name per token id) and implement ``_generate`` and
    ``solve``.
    """

    name: str
    summary: str
    seq_len: int
    token_names: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.token_names)

    def _generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(sequences (B, N + 1), answer mask (B, N + 1) bool): the full token strings and
        which of their tokens are answers to be predicted."""
        raise NotImplementedError

    def solve(self, inputs: np.ndarray) -> np.ndarray:
        """The ground truth, recomputed from the inputs alone by a plain program: (B, N)
        int64, the correct next token at each answer position, IGNORE elsewhere.
        Tests check that it agrees with ``targets``, i.e. every answer is recoverable."""
        raise NotImplementedError

    def batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._as_batch(*self._generate(rng, batch_size))

    @staticmethod
    def _as_batch(sequences: np.ndarray, is_answer: np.ndarray) -> Batch:
        """Inputs and targets from full sequences (B, N + 1) and their answer mask."""
        inputs = sequences[:, :-1]
        targets = np.where(is_answer[:, 1:], sequences[:, 1:], IGNORE)
        return Batch(np.ascontiguousarray(inputs, dtype=np.int64), targets.astype(np.int64))

    def decode(self, tokens) -> str:
        return " ".join(self.token_names[int(t)] for t in tokens)

    def config(self) -> dict:
        """The constructor arguments, for checkpoints (``make_task(**config)`` rebuilds it)."""
        raise NotImplementedError


class AssociativeRecall(Task):
    """``a3 p0 k7 ... ? k 7 a 3 ...``: key-value pairs, then keys -> predict each key's value.

    Each pair is one token (key letter and value digit, e.g. ``k7``): the context binds
    ``num_pairs`` distinct keys to values; after "?" come ``num_queries`` distinct keys in
    random order, each followed by its value, which is scored. One token per pair keeps
    recall a single content lookup (the query key against the pairs), which exact attention
    learns in about a hundred steps; with key and value as separate tokens (``induction``)
    a causal model needs a two-hop induction head, which takes thousands of steps.

    What it measures: softmax attention can put all its weight on the one matching pair
    however many there are; linear attention must read every pair through one fixed-size
    state (D x Dv per head), and with ``num_pairs`` at or above its head dimension the
    bindings interfere.
    """

    name = "recall"

    def __init__(self, num_pairs: int = 16, num_queries: int = 4, num_keys: int = 16, num_values: int = 8):
        if not 1 <= num_queries <= num_pairs <= num_keys:
            raise ValueError(
                f"recall needs 1 <= num_queries <= num_pairs <= num_keys, got "
                f"num_queries={num_queries}, num_pairs={num_pairs}, num_keys={num_keys}"
            )
        if num_keys > 26 or not 1 <= num_values <= 10:
            raise ValueError(f"recall supports at most 26 keys and 1 to 10 values, got {num_keys}, {num_values}")
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values = num_keys, num_values
        keys, digits = string.ascii_lowercase[:num_keys], "0123456789"[:num_values]
        # token ids: pairs (key * num_values + value), then bare keys, bare values, "?"
        self.first_key = num_keys * num_values
        self.first_value = self.first_key + num_keys
        self.query_token = self.first_value + num_values
        self.token_names = [k + d for k in keys for d in digits] + list(keys) + list(digits) + ["?"]
        self.seq_len = num_pairs + 2 * num_queries  # pairs, "?", (key, value) per query, less the last value
        self.summary = f"{num_pairs} key-value pairs (one token each), then {num_queries} keys to recall"

    def _generate(self, rng, batch_size):
        P, Q = self.num_pairs, self.num_queries
        keys = rng.permuted(np.tile(np.arange(self.num_keys), (batch_size, 1)), axis=1)[:, :P]  # (B, P)
        values = rng.integers(0, self.num_values, size=(batch_size, P))  # (B, P)
        asked = rng.permuted(np.tile(np.arange(P), (batch_size, 1)), axis=1)[:, :Q]  # (B, Q) pair indices
        rows = np.arange(batch_size)[:, None]

        sequences = np.empty((batch_size, P + 1 + 2 * Q), dtype=np.int64)
        sequences[:, :P] = keys * self.num_values + values
        sequences[:, P] = self.query_token
        sequences[:, P + 1 :: 2] = self.first_key + keys[rows, asked]
        sequences[:, P + 2 :: 2] = self.first_value + values[rows, asked]
        is_answer = np.zeros(sequences.shape, dtype=bool)
        is_answer[:, P + 2 :: 2] = True
        return sequences, is_answer

    def solve(self, inputs):
        P = self.num_pairs
        answers = np.full(inputs.shape, IGNORE, dtype=np.int64)
        for b, row in enumerate(inputs):
            lookup = {int(pair) // self.num_values: int(pair) % self.num_values for pair in row[:P]}
            for i in range(P + 1, len(row), 2):  # the query keys
                answers[b, i] = self.first_value + lookup[int(row[i]) - self.first_key]
        return answers

    def config(self):
        return {"name": self.name, "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "num_keys": self.num_keys, "num_values": self.num_values}


class InductionRecall(Task):
    """``k1 v1 k2 v2 ... kP vP ? kq1 vq1 kq2 ... kqQ`` -> predict each ``vq`` after its ``kq``.

    Recall with key and value as separate tokens. Keys are distinct letters, values are
    drawn (with repeats) from a separate alphabet of hex digits; the queried keys are
    distinct, in random order. A causal model needs two attention hops here (a
    previous-token head, then a content match: an induction head), and the small demo
    model does not form one within its budget: after 600 steps (8 pairs) or 1,000 steps
    (4 pairs) it still guessed among the values in its context. Train it for thousands of
    steps, or see ``recall``.
    """

    name = "induction"

    def __init__(self, num_pairs: int = 8, num_queries: int = 4, num_keys: int = 16, num_values: int = 16):
        if not 1 <= num_queries <= num_pairs <= num_keys:
            raise ValueError(
                f"induction needs 1 <= num_queries <= num_pairs <= num_keys, got "
                f"num_queries={num_queries}, num_pairs={num_pairs}, num_keys={num_keys}"
            )
        if num_keys > 26 or not 1 <= num_values <= 16:
            raise ValueError(f"induction supports at most 26 keys and 1 to 16 values, got {num_keys}, {num_values}")
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values = num_keys, num_values
        self.query_token = num_keys + num_values
        self.token_names = (
            list(string.ascii_lowercase[:num_keys]) + list("0123456789ABCDEF"[:num_values]) + ["?"]
        )
        # pairs, "?", then (key, value) per query; the last value is never an input
        self.seq_len = 2 * num_pairs + 1 + 2 * num_queries - 1
        self.summary = f"{num_pairs} key-value pairs as separate tokens, then {num_queries} keys to recall"

    def _generate(self, rng, batch_size):
        P, Q = self.num_pairs, self.num_queries
        keys = rng.permuted(np.tile(np.arange(self.num_keys), (batch_size, 1)), axis=1)[:, :P]  # (B, P)
        values = self.num_keys + rng.integers(0, self.num_values, size=(batch_size, P))  # (B, P)
        asked = rng.permuted(np.tile(np.arange(P), (batch_size, 1)), axis=1)[:, :Q]  # (B, Q) pair indices
        rows = np.arange(batch_size)[:, None]

        sequences = np.empty((batch_size, 2 * P + 1 + 2 * Q), dtype=np.int64)
        sequences[:, 0 : 2 * P : 2] = keys
        sequences[:, 1 : 2 * P : 2] = values
        sequences[:, 2 * P] = self.query_token
        sequences[:, 2 * P + 1 :: 2] = keys[rows, asked]
        sequences[:, 2 * P + 2 :: 2] = values[rows, asked]
        is_answer = np.zeros(sequences.shape, dtype=bool)
        is_answer[:, 2 * P + 2 :: 2] = True
        return sequences, is_answer

    def solve(self, inputs):
        P = self.num_pairs
        answers = np.full(inputs.shape, IGNORE, dtype=np.int64)
        for b, row in enumerate(inputs):
            lookup = dict(zip(row[0 : 2 * P : 2].tolist(), row[1 : 2 * P : 2].tolist()))
            for i in range(2 * P + 1, len(row), 2):  # the query keys
                answers[b, i] = lookup[int(row[i])]
        return answers

    def config(self):
        return {"name": self.name, "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "num_keys": self.num_keys, "num_values": self.num_values}


class Copy(Task):
    """``s1 ... sL | s1 ... sL`` -> predict every token of the second copy."""

    name = "copy"

    def __init__(self, length: int = 10, num_symbols: int = 16):
        if length < 1 or not 2 <= num_symbols <= 26:
            raise ValueError(f"copy needs length >= 1 and 2 <= num_symbols <= 26, got {length}, {num_symbols}")
        self.length, self.num_symbols = length, num_symbols
        self.separator = num_symbols
        self.token_names = list(string.ascii_lowercase[:num_symbols]) + ["|"]
        self.seq_len = 2 * length  # L symbols, "|", L - 1 copied symbols as inputs
        self.summary = f"copy a {length}-token string"

    def _generate(self, rng, batch_size):
        L = self.length
        text = rng.integers(0, self.num_symbols, size=(batch_size, L))
        separator = np.full((batch_size, 1), self.separator)
        sequences = np.concatenate([text, separator, text], axis=1)  # (B, 2L + 1)
        is_answer = np.zeros(sequences.shape, dtype=bool)
        is_answer[:, L + 1 :] = True
        return sequences, is_answer

    def solve(self, inputs):
        L = self.length
        answers = np.full(inputs.shape, IGNORE, dtype=np.int64)
        answers[:, L:] = inputs[:, :L]  # after "|" (position L) comes s1, after s_t comes s_t+1
        return answers

    def config(self):
        return {"name": self.name, "length": self.length, "num_symbols": self.num_symbols}


class Needle(Task):
    """Fillers with one marked digit near the start, then ``?`` -> predict the digit.

    Layout (input positions 0..N-1): the marker "!" at a random position in
    ``[0, N - 2 - min_distance]``, the needle digit right after it, fillers everywhere
    else, and "?" as the last input. The needle is thus ``>= min_distance`` tokens before
    the "?" that asks for it.
    """

    name = "needle"

    def __init__(self, seq_len: int = 40, min_distance: int = 32, num_fillers: int = 16, num_values: int = 10):
        if not 1 <= min_distance <= seq_len - 2:
            raise ValueError(f"needle needs 1 <= min_distance <= seq_len - 2, got {min_distance}, {seq_len}")
        if not (1 <= num_fillers <= 26 and 1 <= num_values <= 10):
            raise ValueError(f"needle supports 1 to 26 fillers and 1 to 10 values, got {num_fillers}, {num_values}")
        self.seq_len, self.min_distance = seq_len, min_distance
        self.num_fillers, self.num_values = num_fillers, num_values
        self.marker = num_fillers + num_values
        self.query_token = self.marker + 1
        self.token_names = list(string.ascii_lowercase[:num_fillers]) + list("0123456789"[:num_values]) + ["!", "?"]
        self.summary = f"recall a digit seen {min_distance}+ tokens earlier"

    def _generate(self, rng, batch_size, seq_len=None, marker_at=None):
        """As Task._generate; ``seq_len`` (default the task's) and ``marker_at`` (B,) (default
        drawn as the layout says) let :meth:`batch_at` place the needle."""
        N = self.seq_len if seq_len is None else seq_len
        sequences = rng.integers(0, self.num_fillers, size=(batch_size, N + 1))
        rows = np.arange(batch_size)
        # the needle value sits at marker + 1 <= N - 1 - min_distance, the query at N - 1
        if marker_at is None:
            marker_at = rng.integers(0, N - 1 - self.min_distance, size=batch_size)
        needle = self.num_fillers + rng.integers(0, self.num_values, size=batch_size)
        sequences[rows, marker_at] = self.marker
        sequences[rows, marker_at + 1] = needle
        sequences[:, N - 1] = self.query_token
        sequences[:, N] = needle
        is_answer = np.zeros(sequences.shape, dtype=bool)
        is_answer[:, N] = True
        return sequences, is_answer

    def needle_position(self, depth: float, seq_len: int | None = None) -> int:
        """Where :meth:`batch_at` puts the needle digit for ``depth`` in [0, 1]: position
        ``1 + round(depth * (N - 3))`` of N inputs, from right after a marker at the very
        start (0) to right before the "?" (1): ``N - 1 - position`` tokens before the "?"."""
        N = self.seq_len if seq_len is None else seq_len
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 3:
            raise ValueError(f"a needle sequence needs at least 3 tokens (marker, needle, \"?\"), got {N!r}")
        if not (isinstance(depth, (int, float, np.integer, np.floating)) and 0 <= depth <= 1):
            raise ValueError(f"needle depth must be a number in [0, 1], got {depth!r}")
        return 1 + round(float(depth) * (N - 3))

    def batch_at(self, rng: np.random.Generator, batch_size: int, depth: float, seq_len: int | None = None) -> Batch:
        """A batch of ``seq_len`` inputs (default the task's) with every needle at ``depth``
        (:meth:`needle_position`): the needle-in-a-haystack grid. Depths and lengths the
        task's own layout never draws (closer than ``min_distance``, longer sequences) are
        allowed: that is what the grid asks."""
        N = self.seq_len if seq_len is None else seq_len
        at = self.needle_position(depth, N)
        return self._as_batch(*self._generate(rng, batch_size, N, np.full(batch_size, at - 1)))

    def solve(self, inputs):
        answers = np.full(inputs.shape, IGNORE, dtype=np.int64)
        for b, row in enumerate(inputs):
            marker_at = int(np.flatnonzero(row == self.marker)[0])
            answers[b, -1] = row[marker_at + 1]
        return answers

    def config(self):
        return {"name": self.name, "seq_len": self.seq_len, "min_distance": self.min_distance,
                "num_fillers": self.num_fillers, "num_values": self.num_values}


class DataFileError(ValueError):
    """A text file a run cannot use: missing, empty, too short, or changed since the run began."""


class TextFile(Task):
    """Next-byte prediction on a file: vocabulary 256 (one token per byte value), windows of
    ``seq_len + 1`` bytes drawn uniformly from the whole file, every position scored.

    Any file works (UTF-8 text is the usual case; a character of several bytes is several
    tokens). ``sha256``, when given, is the digest the run recorded. The file is read only
    when its bytes are needed (a batch; ``check()``), so a model trained on it samples
    without it; a file then missing, empty, shorter than a window, or without the recorded
    digest is a :class:`DataFileError`: a run never trains on other data than it began
    with. There is no held-out part: the "heldout" split draws other windows of the file.
    """

    name = "text"
    vocab_size = 256

    def __init__(self, path: str, sha256: str | None = None, seq_len: int = 128):
        if not isinstance(path, str) or not path:
            raise ValueError(f"task text needs the file's path (a string), got {path!r:.60}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"text's seq_len must be a positive integer, got {seq_len!r:.40}")
        if sha256 is not None and not isinstance(sha256, str):
            raise ValueError(f"text's sha256 must be a hex string, got {sha256!r:.60}")
        self.path, self.seq_len, self.recorded = path, int(seq_len), sha256
        self.summary = f"next byte of {Path(path).name}, windows of {self.seq_len}"

    def check(self) -> str:
        """The file's SHA-256; DataFileError unless it exists, holds a training window and
        has the recorded digest (if one was given)."""
        file = Path(self.path)
        if not file.exists():
            raise DataFileError(f"text file {self.path} does not exist")
        if not file.is_file():
            raise DataFileError(f"text file {self.path} is not a file")
        size = file.stat().st_size
        if size == 0:
            raise DataFileError(f"text file {self.path} is empty")
        if size < self.seq_len + 1:
            raise DataFileError(f"text file {self.path} has {size} bytes; a training window needs seq_len + 1 = "
                                f"{self.seq_len + 1}: use a longer file or a smaller seq_len (--seq-len)")
        digest = file_sha256(self.path)
        if self.recorded is not None and digest != self.recorded:
            raise DataFileError(f"text file {self.path} has changed since this run began: its SHA-256 is now "
                                f"{digest[:16]}..., the run recorded {self.recorded[:16]}...")
        return digest

    @functools.cached_property
    def sha256(self) -> str:
        """The recorded digest, or (a new run) the file's."""
        return self.recorded if self.recorded is not None else self.check()

    @functools.cached_property
    def data(self) -> np.ndarray:
        """The file's bytes (uint8), read on demand, never written; checked first."""
        self.check()
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def token_names(self) -> list[str]:
        """A printable name per byte: the character for printable ASCII, else an escape."""
        special = {ord(" "): "␣", ord("\n"): "\\n", ord("\t"): "\\t"}
        return [special.get(b, chr(b) if 33 <= b < 127 else f"\\x{b:02x}") for b in range(256)]

    def _generate(self, rng, batch_size):
        starts = rng.integers(0, self.size - self.seq_len, size=batch_size)  # window [s, s + N]
        sequences = self.data[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)  # (B, N + 1)
        return sequences, np.ones(sequences.shape, dtype=bool)

    def decode(self, tokens) -> str:
        """The bytes as text; bytes that are not UTF-8 become U+FFFD."""
        return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def config(self):
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "seq_len": self.seq_len}


def file_sha256(path) -> str:
    """The file's SHA-256 (hex), remembered while its size, modification time and inode
    stay the same (a run's config and its model each build the task)."""
    info = os.stat(path)
    return _sha256(os.fspath(path), info.st_size, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The synthetic tasks (``--task``, the demo); ``make_task`` also builds "text".
TASKS = {cls.name: cls for cls in (AssociativeRecall, Copy, Needle, InductionRecall)}
ALL_TASKS = {**TASKS, TextFile.name: TextFile}


def make_task(name: str, **options) -> Task:
    """A task by name ("recall", "copy", "needle", "induction", or "text"), with constructor
    options (integers, but text's path and sha256). ValueError naming the task's options
    for any it does not take or lacks."""
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(ALL_TASKS)}")
    parameters = inspect.signature(ALL_TASKS[name]).parameters
    unknown = [option for option in options if option not in parameters]
    if unknown:
        raise ValueError(f"task {name} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are {', '.join(parameters)}")
    missing = [option for option, p in parameters.items() if p.default is p.empty and option not in options]
    if missing:
        raise ValueError(f"task {name} needs the option {', '.join(missing)}")
    for option, value in options.items():
        if isinstance(parameters[option].default, int) and (
                not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise ValueError(f"task option {option} must be an integer, got {value!r:.40}")
    return ALL_TASKS[name](**options)


def make_batch(task: Task, seed: int, step: int, batch_size: int, split: str = "train") -> Batch:
    """The batch for ``step`` of a run seeded ``seed``: a pure function of its arguments.

    Each (seed, split, step) seeds its own generator through NumPy's SeedSequence, so
    batches are independent of each other and of the order they are asked for.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], step])
    return task.batch(rng, batch_size)


def heldout_batches(task: Task, seed: int, num_examples: int, batch_size: int = 256):
    """The held-out set: ``num_examples`` sequences in batches, from the split that
    training never draws from. The same arguments always give the same set."""
    for index, start in enumerate(range(0, num_examples, batch_size)):
        yield make_batch(task, seed, index, min(batch_size, num_examples - start), split="heldout")
