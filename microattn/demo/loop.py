"""The training loop of the demo: its configuration, a run's state, steps, Ctrl-C, progress.

The pieces, each usable alone::

    config = TrainConfig(task="recall", attention="exact", steps=300)
    run = Run.create(config)                  # model + AdamW + cosine schedule, step 0
    result = train(run, out_dir="runs/a")     # checkpoints to runs/a/checkpoint.npz
    run = Run.load("runs/a")                  # ... and continue exactly where it stopped
    inspection.evaluate(run.model, run.task)  # held-out accuracy on the answer tokens

Reproducibility: the batch for step ``s`` is ``tasks.make_batch(task, seed, s)``, a pure
function, and the model has no dropout, so a run's whole state is its model, optimizer and
schedule state plus the step counter. A checkpoint (:mod:`.checkpoint`) stores exactly
that; a run interrupted and resumed reproduces the uninterrupted run's losses bit for bit.

Data parallel (``mpiexec -n P microattn train ...``, ``Run.comm`` an MPI communicator):
every rank holds the whole model (rank 0's weights, broadcast), takes rows ``[r B/P, (r +
1) B/P)`` of each step's batch, and the gradients are averaged over the ranks before the
step (``microattn.distributed``). The loss each rank differentiates is its sum of answer
tokens' losses over the whole batch's count (times P, which the average divides out), so
a step is the single-process step on the whole batch whatever the ranks' counts. Only
rank 0 writes checkpoints; a checkpoint holds no rank count, so a run resumes on any.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import backends, losses, nn, optim
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_parameters,
    check_run_state,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from .tasks import ALL_TASKS, IGNORE, Task, make_batch, make_task

# TrainConfig's fields that count something: each must be an integer >= 1.
POSITIVE_INTEGERS = ("steps", "batch_size", "embed_dim", "num_layers", "num_heads", "window", "kv_heads",
                     "checkpoint_every")

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
        self._check_kinds()
        if self.task not in ALL_TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(ALL_TASKS)}")
        make_task(self.task, **self.task_options)  # ValueError: options it does not take, or bad values
        if self.attention not in VARIANTS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {', '.join(VARIANTS)}")
        for name in POSITIVE_INTEGERS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.attention == "gqa" and self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.warmup_steps is None:
            self.warmup_steps = min(30, self.steps // 10)
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("min_lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be a number > 0 (inf: no clipping), got {self.grad_clip}")
        family = "linear_attention" if self.attention == "linear" else "scaled_dot_product_attention"
        backends.resolve(self.backend, family)  # ValueError (unknown) or RuntimeError (unavailable)

    def _check_kinds(self):
        """TypeError naming the first field of the wrong kind (a config read back from a
        file can hold anything); numbers given as ints become floats."""

        def wrong(name, expected):
            value = getattr(self, name)
            return TypeError(f"{name} must be {expected}, got {value!r:.40} ({type(value).__name__})")

        for name in (*POSITIVE_INTEGERS, "seed", "warmup_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                    name == "warmup_steps" and value is None):
                raise wrong(name, "an integer")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise wrong(name, "a number")
            setattr(self, name, float(value))
        for name in ("task", "attention", "backend"):
            if not isinstance(getattr(self, name), str):
                raise wrong(name, "a string")
        if not isinstance(self.rope, bool):
            raise wrong("rope", "true or false")
        if not (isinstance(self.task_options, dict) and all(isinstance(key, str) for key in self.task_options)):
            raise wrong("task_options", "a dict of option names to values")

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
        """The config :meth:`to_json` wrote; ValueError or TypeError, naming the field, for
        anything else."""
        fields = json.loads(text)  # json.JSONDecodeError is a ValueError
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object of TrainConfig fields, got {type(fields).__name__}")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"fields this version does not know: {', '.join(map(str, unknown))}")
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
    comm: object = None  # an MPI communicator for data parallel training (not saved)

    def data_parallel(self, comm) -> None:
        """Train on ``comm``'s ranks from now on: rank 0's weights everywhere; each rank
        takes its rows of every batch (ValueError on every rank if they do not divide)."""
        from .. import distributed

        if self.config.batch_size % comm.size:
            raise ValueError(f"--batch-size {self.config.batch_size} cannot be split evenly over "
                             f"{comm.size} ranks: use a multiple of {comm.size}")
        distributed.broadcast_parameters(self.model.parameters(), comm)
        self.comm = comm

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints and reports (rank 0, or no MPI)."""
        return self.comm is None or self.comm.rank == 0

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
        """Rebuild a run from a checkpoint file, or a directory holding one.

        Every part is checked before it is used: FileNotFoundError if there is no
        checkpoint, CheckpointError (a ValueError) naming the file, what is wrong and what
        was expected for anything a run could not continue from.
        """
        path = checkpoint_path(path)
        state = load_checkpoint(path)
        check_run_state(state, path)
        try:
            config = TrainConfig.from_json(state["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: its config is not a valid TrainConfig: {error}") from None
        run = cls.create(config)
        check_parameters(run.model.state_dict(), state["model"], path)
        run.model.load_state_dict(state["model"])
        for name, part in (("optimizer", run.optimizer), ("schedule", run.schedule)):
            try:
                part.load_state_dict(state[name])
            except (KeyError, TypeError, ValueError) as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                raise CheckpointError(f"{path}: its {name} state does not fit this run: {message}") from None
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
        path = Path(out_dir) / CHECKPOINT_NAME
        return save_checkpoint(path, self.state()) if self.is_writer else path

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


def train_step(run: Run) -> float:
    """One optimizer step on the batch for ``run.step``; returns its loss (of the whole
    batch, on every rank)."""
    config = run.config
    batch = make_batch(run.task, config.seed, run.step, config.batch_size)
    run.model.zero_grad()
    if run.comm is None:
        loss = loss_on_batch(run.model, batch)
        loss.backward()
        value = float(loss.item())
    else:
        value = _data_parallel_backward(run, batch)
    optim.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    run.schedule.step()
    run.step += 1
    run.losses.append(value)
    return value


def _data_parallel_backward(run: Run, batch) -> float:
    """This rank's rows of ``batch``, backward, gradients averaged over the ranks; returns
    the whole batch's mean loss."""
    from mpi4py import MPI

    from .. import distributed

    comm, rows = run.comm, run.config.batch_size // run.comm.size
    mine = slice(comm.rank * rows, (comm.rank + 1) * rows)
    inputs, targets = batch.inputs[mine], batch.targets[mine]
    counted = comm.allreduce(int((targets != IGNORE).sum()), op=MPI.SUM)  # the whole batch's
    total = losses.cross_entropy(run.model(inputs), targets, ignore_index=IGNORE, reduction="sum")
    (total * (comm.size / max(counted, 1))).backward()  # the average over ranks divides P out
    distributed.allreduce_gradients(run.model.parameters(), comm)
    return comm.allreduce(float(total.item()), op=MPI.SUM) / max(counted, 1)


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
        while run.step < run.config.steps and not _stop_requested(run, stop):
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
        interrupted = _stop_requested(run, stop)
    seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()
    checkpoint = run.save(out_dir) if out_dir is not None else None
    return TrainResult(run.step - start_step, seconds, interrupted, checkpoint)


def _stop_requested(run: Run, stop: threading.Event) -> bool:
    """Whether to stop; under MPI, whether any rank was asked to (all stop at one step)."""
    if run.comm is None:
        return stop.is_set()
    from mpi4py import MPI

    return bool(run.comm.allreduce(int(stop.is_set()), op=MPI.MAX))


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
