"""Training, checkpoints and evaluation for the small decoder on the synthetic tasks.

The pieces, each usable alone::

    config = TrainConfig(task="recall", attention="exact", steps=300)
    run = Run.create(config)                  # model + AdamW + cosine schedule, step 0
    result = train(run, out_dir="runs/a")     # checkpoints to runs/a/checkpoint.npz
    run = Run.load("runs/a")                  # ... and continue exactly where it stopped
    evaluate(run.model, run.task, seed=0)     # held-out accuracy on the answer tokens

Reproducibility: the batch for step ``s`` is ``tasks.make_batch(task, seed, s)``, a pure
function, and the model has no dropout, so a run's whole state is its model, optimizer and
schedule state plus the step counter. A checkpoint stores exactly that; a run interrupted
and resumed reproduces the uninterrupted run's losses bit for bit.

Checkpoints are written atomically: ``np.savez`` into a temporary file in the same
directory, ``fsync``, then ``os.replace`` over the old checkpoint. A crash at any moment
leaves either the old checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import backends, losses, nn, optim
from .autograd import no_grad
from .tasks import IGNORE, TASKS, Task, heldout_batches, make_batch, make_task

CHECKPOINT_NAME = "checkpoint.npz"
LOSS_PLOT_NAME = "loss.png"

# The attention variants a run can use: name -> DecoderLM keyword arguments. "window" and
# "gqa" take their size from TrainConfig.window / TrainConfig.kv_heads.
VARIANTS = {
    "exact": "softmax attention over every earlier token (flash kernel)",
    "window": "causal sliding-window softmax attention",
    "linear": "causal linear attention, phi(x) = elu(x) + 1",
    "gqa": "exact attention with grouped-query heads (fewer key/value heads)",
}


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the demo's settings."""

    task: str = "recall"
    task_options: dict = field(default_factory=dict)
    attention: str = "exact"  # a key of VARIANTS
    window: int = 8  # for "window": each token sees itself and the 8 before it
    kv_heads: int = 2  # for "gqa": 4 query heads share 2 key/value heads
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    rope: bool = True  # rotary position embeddings; False: learned absolute positions
    steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int | None = None  # None: 10% of the steps, at most 30
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    backend: str = "auto"  # attention kernels (microattn.backends); results match to rounding

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.attention not in VARIANTS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {', '.join(VARIANTS)}")
        for name in ("steps", "batch_size", "embed_dim", "num_layers", "num_heads", "window",
                     "kv_heads", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.attention == "gqa" and self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.warmup_steps is None:
            self.warmup_steps = min(30, self.steps // 10)
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        family = "linear_attention" if self.attention == "linear" else "scaled_dot_product_attention"
        backends.resolve(self.backend, family)  # ValueError (unknown) or RuntimeError (unavailable)

    def model_options(self) -> dict:
        """The DecoderLM keyword arguments for this config's attention variant."""
        options = {"embed_dim": self.embed_dim, "num_layers": self.num_layers, "num_heads": self.num_heads,
                   "rope": self.rope, "backend": self.backend}
        if self.attention == "window":
            options.update(attention="window", window=self.window)
        elif self.attention == "linear":
            options.update(attention="linear")
        else:
            options.update(attention="flash")
            if self.attention == "gqa":
                options.update(num_kv_heads=self.kv_heads)
        return options

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        fields = json.loads(text)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"the checkpoint's configuration has fields this version does not know: {unknown}")
        return cls(**fields)


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """A training run's whole state: config, task, model, optimizer, schedule, progress."""

    config: TrainConfig
    task: Task
    model: nn.Module
    optimizer: optim.AdamW
    schedule: optim.CosineSchedule
    step: int = 0  # optimizer steps taken; also the data cursor (the next batch is make_batch(..., step))
    losses: list = field(default_factory=list)  # training loss of every step taken

    @classmethod
    def create(cls, config: TrainConfig) -> Run:
        task = make_task(config.task, **config.task_options)
        model = nn.DecoderLM(task.vocab_size, task.seq_len, **config.model_options(),
                             dtype=np.float32, rng=np.random.default_rng(config.seed))
        optimizer = optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), eps=1e-8,
                                weight_decay=config.weight_decay)
        schedule = optim.CosineSchedule(optimizer, warmup_steps=config.warmup_steps,
                                        total_steps=config.steps, min_lr=config.min_lr)
        return cls(config, task, model, optimizer, schedule)

    @classmethod
    def load(cls, path) -> Run:
        """Rebuild a run from a checkpoint file, or a directory holding one."""
        state = load_checkpoint(path)
        run = cls.create(TrainConfig.from_json(state["config"]))
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
        run.step = int(state["step"])
        run.losses = [float(x) for x in state["losses"]]
        return run

    def state(self) -> dict:
        return {
            "config": self.config.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "losses": np.asarray(self.losses, dtype=np.float64),
        }

    def save(self, out_dir) -> Path:
        return save_checkpoint(Path(out_dir) / CHECKPOINT_NAME, self.state())

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.task.seq_len


def loss_on_batch(model, batch) -> object:
    """Mean cross-entropy over the answer tokens of one batch (a scalar Tensor)."""
    logits = model(batch.inputs)  # (B, N, V)
    return losses.cross_entropy(logits, batch.targets, ignore_index=IGNORE)


def warm_up(run: Run) -> None:
    """One forward and backward pass on a tiny batch, gradients discarded: the first call
    of a numba kernel compiles it, and timing should measure training, not compilation."""
    batch = make_batch(run.task, run.config.seed, 0, 2)
    run.model.zero_grad()
    loss_on_batch(run.model, batch).backward()
    run.model.zero_grad()


def train_step(run: Run) -> float:
    """One optimizer step on the batch for ``run.step``; returns its loss."""
    config = run.config
    batch = make_batch(run.task, config.seed, run.step, config.batch_size)
    run.model.zero_grad()
    loss = loss_on_batch(run.model, batch)
    loss.backward()
    optim.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    run.schedule.step()
    run.step += 1
    value = float(loss.item())
    run.losses.append(value)
    return value


@dataclass
class TrainResult:
    steps_done: int  # steps taken by this call
    seconds: float  # wall time of those steps
    interrupted: bool  # stopped early by Ctrl-C (a checkpoint was saved if out_dir was given)
    checkpoint: Path | None

    def tokens_per_second(self, run: Run) -> float:
        return self.steps_done * run.tokens_per_step / self.seconds if self.seconds > 0 else float("nan")


def train(run: Run, out_dir=None, *, progress=None, on_step=None) -> TrainResult:
    """Train ``run`` up to ``run.config.steps``, checkpointing into ``out_dir`` (if given)
    every ``checkpoint_every`` steps and at the end.

    ``progress`` (a :class:`ProgressBar`) is told every step; ``on_step(run, loss)`` is
    called after every step. Stopping early never tears a step in half: Ctrl-C (SIGINT)
    only sets a flag, checked between steps, and a KeyboardInterrupt raised by ``on_step``
    counts as the same request. Either way the run stops at a step boundary, saves a
    checkpoint and returns with ``interrupted=True``. A second Ctrl-C aborts at once with
    KeyboardInterrupt, leaving the last checkpoint written as it was.
    """
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    start_step, started = run.step, time.perf_counter()
    with _sigint_deferred() as stop:
        while run.step < run.config.steps and not stop.is_set():
            loss = train_step(run)
            if progress is not None:
                progress.update(run.step, loss)
            if on_step is not None:
                try:
                    on_step(run, loss)
                except KeyboardInterrupt:
                    stop.set()
            if out_dir is not None and run.step % run.config.checkpoint_every == 0:
                run.save(out_dir)
        interrupted = stop.is_set()
    seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()
    checkpoint = run.save(out_dir) if out_dir is not None else None
    return TrainResult(run.step - start_step, seconds, interrupted, checkpoint)


@contextlib.contextmanager
def _sigint_deferred():
    """Yields a threading.Event that the first SIGINT sets (instead of raising); a second
    SIGINT raises KeyboardInterrupt as usual. Outside the main thread, where Python cannot
    install signal handlers, SIGINT is left alone."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- evaluation


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


def step_peak_memory(run: Run) -> int:
    """Peak bytes newly allocated by one forward + backward pass (tracemalloc), i.e.
    activations, attention intermediates and gradients, not the parameters already held.

    tracemalloc sees NumPy's allocations; buffers that numba kernels allocate internally
    are invisible to it. The run is left unchanged (gradients are cleared).
    """
    batch = make_batch(run.task, run.config.seed, 0, run.config.batch_size)
    run.model.zero_grad()
    tracemalloc.start()
    try:
        loss_on_batch(run.model, batch).backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        run.model.zero_grad()
    return peak


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(path) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.npz``."""
    path = Path(path)
    return path if path.suffix == ".npz" else path / CHECKPOINT_NAME


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (nested dicts/lists of arrays, numbers, strings) to ``path``
    atomically: a temporary file next to it, fsync, then os.replace."""
    path = Path(path)
    arrays = {}
    skeleton = _pack(state, arrays)
    arrays["__skeleton__"] = np.array(json.dumps(skeleton))
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return path


def load_checkpoint(path) -> dict:
    """The state dict that :func:`save_checkpoint` wrote (no pickle involved)."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        skeleton = json.loads(str(arrays.pop("__skeleton__")))
        return _unpack(skeleton, arrays)
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a readable microattn checkpoint ({error})") from error


# A state is stored as NumPy arrays (one .npy each inside the .npz) plus a JSON skeleton
# that records the nesting and every scalar. Tagged nodes keep types JSON would lose: dict
# keys that are not strings, tuples, NumPy scalars (stored as 0-d arrays, dtype intact).


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
    (tag, payload), *_ = node.items()
    if tag == "array":
        array = arrays[payload]
        return array[()] if node["scalar"] else array
    if tag == "dict":
        return {_unpack(k, arrays): _unpack(v, arrays) for k, v in payload}
    if tag == "list":
        return [_unpack(v, arrays) for v in payload]
    if tag == "tuple":
        return tuple(_unpack(v, arrays) for v in payload)
    return payload


def save_loss_plot(losses_so_far, path) -> str | None:
    """Write the loss curve to ``path`` as a PNG; returns None, or a note saying why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no loss plot (pip install 'microattn[plot]')"
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(np.arange(1, len(losses_so_far) + 1), losses_so_far, linewidth=1)
    axes.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# ----------------------------------------------------------------------------- BLAS threads


def _numpy_openblas():
    """(get, set) for the thread count of NumPy's bundled OpenBLAS, or None if not found."""
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            get, put = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return get, put
    return None


@contextlib.contextmanager
def single_threaded_blas():
    """Run NumPy's OpenBLAS on one thread inside the block (a no-op where it is not found).

    This model's matrix products are tiny (a batch is about 768 x 64 @ 64 x 256); splitting
    them across threads costs more than it saves, and on a busy machine far more: one
    training step measured 3x slower with OpenBLAS's default threads than with one.
    """
    openblas = _numpy_openblas()
    if openblas is None:
        yield
        return
    get, put = openblas
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


# ----------------------------------------------------------------------------- progress bar


class ProgressBar:
    """A one-line progress bar on stderr: ``label [#####.....] 120/300 loss 0.412 45 it/s``.

    On a terminal it redraws in place (at most 10 times a second); otherwise it prints
    only the final line, so logs stay readable.
    """

    def __init__(self, total: int, label: str = "", *, start: int = 0, stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.current, self.loss = start, start, math.nan
        self.started = self.last_drawn = time.perf_counter()

    def update(self, current: int, loss: float) -> None:
        self.current, self.loss = current, loss
        now = time.perf_counter()
        if self.interactive and (now - self.last_drawn > 0.1 or current >= self.total):
            self.last_drawn = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.interactive else "") + self._line() + "\n")
        self.stream.flush()

    def _line(self) -> str:
        filled = int(self.width * self.current / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        rate = (self.current - self.start) / elapsed if elapsed > 0 else 0.0
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.current}/{self.total} "
                f"loss {self.loss:.3f} {rate:.0f} it/s")
