"""The ``microattn`` command: demo, train, eval, sample, attention-map.

    microattn demo                       # train every attention variant, print the table
    microattn train --task recall --attention window --steps 300 --out runs/w
    microattn train --out runs/w --resume
    microattn eval --checkpoint runs/w
    microattn sample --checkpoint runs/w
    microattn attention-map --checkpoint runs/w --out map.png

Every command returns an exit status from :func:`main` (0 success, 1 an error, 2 bad
arguments, 130 interrupted); errors print one line, ``microattn: error: ...``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels import blas
from . import inspection, plots
from .checkpoint import CHECKPOINT_NAME
from .loop import VARIANTS, ProgressBar, Run, TrainConfig, step_peak_memory, train, warm_up
from .tasks import TASKS, make_batch, make_task

INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"
LOSS_PLOT_NAME = "loss.png"  # written next to the checkpoint by `train`

# The demo: which (task, attention) pairs it trains, and why each is there.
DEMO_PLAN = [
    ("recall", "exact"),  # exact attention solves recall: >= 95% held-out accuracy
    ("recall", "gqa"),  # ... and so does grouped-query attention, with half the KV heads
    ("recall", "linear"),  # linear attention's fixed-size state recalls measurably worse
    ("recall", "window"),  # a window of 8 sees only some of the 16 pairs
    ("needle", "exact"),  # exact attention finds a token 32+ positions back
    ("needle", "gqa"),
    ("needle", "linear"),  # one needle is one binding: linear attention can hold that
    ("needle", "window"),  # a window of 8 over 2 layers reaches 16 tokens: it cannot
]
# Steps per run: recall is learned by exact attention in ~100 steps, the needle in ~50.
DEMO_STEPS = {"recall": 250, "needle": 150, "copy": 150, "induction": 2000}
DEMO_SETTINGS = {"batch_size": 32, "eval_examples": 512}
QUICK_SETTINGS = {"steps": 3, "batch_size": 8, "eval_examples": 16}


class CLIError(Exception):
    """A problem with the user's request: printed as one line, exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) instead of the usage dump."""

    def error(self, message):
        self.exit(2, f"microattn: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0: "nan", "inf" and "1e999" (which overflows to inf) are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def path(text: str) -> Path:
    """A file or directory name; an empty one (often an unset shell variable) is refused
    rather than read as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def name_list(choices):
    """A comma-separated list of names, each one of ``choices``: "recall,needle"."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return names

    return parse


# ----------------------------------------------------------------------------- the parser


# Options of `train` that define the run: (flag, TrainConfig field, type, help).
RUN_OPTIONS = [
    ("--task", "task", str, f"the task to learn: {', '.join(TASKS)} (default recall)"),
    ("--attention", "attention", str, f"attention variant: {', '.join(VARIANTS)} (default exact)"),
    ("--steps", "steps", positive_int, "optimizer steps in all (default 250)"),
    ("--batch-size", "batch_size", positive_int, "sequences per step (default 32)"),
    ("--lr", "lr", positive_float, "peak learning rate of AdamW (default 3e-3)"),
    ("--warmup-steps", "warmup_steps", non_negative_int, "linear warm-up steps (default: 10%% of --steps, at most 30)"),
    ("--window", "window", positive_int, "sliding-window size for --attention window (default 8)"),
    ("--kv-heads", "kv_heads", positive_int, "key/value heads for --attention gqa (default 2)"),
    ("--embed-dim", "embed_dim", positive_int, "model width (default 64)"),
    ("--layers", "num_layers", positive_int, "transformer blocks (default 2)"),
    ("--heads", "num_heads", positive_int, "attention heads (default 4)"),
    ("--seed", "seed", non_negative_int, "seeds the weights and the data (default 0)"),
    ("--checkpoint-every", "checkpoint_every", positive_int, "steps between checkpoints (default 100)"),
    ("--backend", "backend", str, "attention kernels: auto, reference, numba, ... (default auto)"),
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="microattn",
        description="Train and inspect a small transformer on this CPU, with exact, "
                    "sliding-window, linear and grouped-query attention.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    demo = commands.add_parser("demo", help="train each attention variant on the built-in tasks and "
                                             "print a comparison table (about 3 minutes)")
    demo.add_argument("--quick", action="store_true", help="a few steps per run: checks the machinery in seconds")
    demo.add_argument("--tasks", type=name_list(list(TASKS)), help="tasks to train (default: the demo plan)")
    demo.add_argument("--variants", type=name_list(list(VARIANTS)),
                      help="attention variants to train (default: the demo plan)")
    demo.add_argument("--steps", type=positive_int, help="steps per run (default: 250 for recall, 150 for needle)")
    demo.add_argument("--batch-size", type=positive_int, help="sequences per step (default 32)")
    demo.add_argument("--eval-examples", type=positive_int, help="held-out sequences per run (default 512)")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="seeds weights and data (default 0)")
    demo.add_argument("--backend", default="auto", help="attention kernels: auto, reference, numba, ... (default auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")

    train = commands.add_parser("train", help="train one model, checkpointing to --out")
    train.add_argument("--out", required=True, type=path, help="directory for checkpoint.npz and loss.png")
    train.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    for flag, field, kind, text in RUN_OPTIONS:
        train.add_argument(flag, dest=field, type=kind, help=text)
    train.add_argument("--eval-examples", type=positive_int, default=512,
                       help="held-out sequences to score at the end (default 512)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    evaluate = commands.add_parser("eval", help="held-out accuracy of a checkpoint, decoding with the KV cache")
    evaluate.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    evaluate.add_argument("--examples", type=positive_int, default=512, help="held-out sequences (default 512)")
    evaluate.add_argument("--seed", type=non_negative_int, default=0, help="picks the held-out set (default 0)")
    evaluate.add_argument("--no-cache", action="store_true", help="one full forward pass instead of the KV cache")

    sample = commands.add_parser("sample", help="generate answers for held-out prompts with the KV cache")
    sample.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    sample.add_argument("--num", type=positive_int, default=3, help="prompts to complete (default 3)")
    sample.add_argument("--seed", type=non_negative_int, default=0, help="picks the prompts (default 0)")

    attention_map = commands.add_parser("attention-map", help="PNG heatmaps of every head for one input, "
                                                              "and the accuracy lost by ablating each head")
    attention_map.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    attention_map.add_argument("--out", required=True, type=path, help="the PNG file to write")
    attention_map.add_argument("--example", type=non_negative_int, default=0, help="which held-out input (default 0)")
    attention_map.add_argument("--examples", type=positive_int, default=256,
                               help="held-out sequences for the ablation (default 256)")
    attention_map.add_argument("--no-ablation", action="store_true", help="skip the head ablation")
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad arguments
    handlers = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample,
                "attention-map": cmd_attention_map}
    try:
        with blas.single_threaded():  # the model's products are tiny: threads cost more than they save
            return handlers[args.command](args)
    except KeyboardInterrupt:
        print("\nmicroattn: interrupted", file=sys.stderr)
        return INTERRUPTED
    except MemoryError:
        print("microattn: error: out of memory: choose smaller sizes (--batch-size, --embed-dim, --layers, "
              "--examples, ...)", file=sys.stderr)
        return 1
    except (CLIError, ValueError, OSError, KeyError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"microattn: error: {str(message).replace(chr(10), ' ')}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- demo


@dataclass
class DemoRow:
    task: str
    attention: str
    final_loss: float  # mean training loss of the last 10 steps
    accuracy: float  # held-out, answer tokens
    seconds: float  # training steps only (kernel compilation and evaluation excluded)
    tokens_per_second: float
    peak_bytes: int  # tracemalloc peak of one forward + backward pass


def demo_plan(tasks, variants) -> list[tuple[str, str]]:
    """The default plan, or every (task, variant) pair of the lists given."""
    if tasks is None and variants is None:
        return list(DEMO_PLAN)
    tasks = tasks or list(dict.fromkeys(task for task, _ in DEMO_PLAN))
    variants = variants or list(VARIANTS)
    return [(task, variant) for task in tasks for variant in variants]


def cmd_demo(args) -> int:
    settings = dict(QUICK_SETTINGS if args.quick else DEMO_SETTINGS)
    for name in ("steps", "batch_size", "eval_examples"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    plan = demo_plan(args.tasks, args.variants)
    tasks = list(dict.fromkeys(task for task, _ in plan))
    steps = {task: settings.get("steps", DEMO_STEPS[task]) for task in tasks}
    print(f"microattn demo: {len(plan)} runs, batch {settings['batch_size']}, "
          f"on {platform.machine()} with {_cpu_count()} CPU cores")
    for name in tasks:
        print(f"  {name:<7} {steps[name]:>4} steps  {make_task(name).summary}")
    print(flush=True)

    started = time.perf_counter()
    rows, warm_up_seconds = [], 0.0
    for index, (task, attention) in enumerate(plan, 1):
        config = TrainConfig(task=task, attention=attention, steps=steps[task],
                             batch_size=settings["batch_size"], seed=args.seed, backend=args.backend)
        label = f"[{index}/{len(plan)}] {task:<6} {attention:<6}"
        row, seconds = demo_run(config, settings["eval_examples"], label, progress=not args.no_progress)
        rows.append(row)
        warm_up_seconds += seconds
    print(format_table(rows))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s, of which {warm_up_seconds:.0f} s compiling "
          "kernels (numba caches them: later runs skip this)")
    print("final loss: mean training loss (answer tokens) of the last 10 steps; held-out acc: greedy, "
          f"{settings['eval_examples']} unseen sequences;\ntrain time: the training steps only; peak memory: "
          "tracemalloc peak of one forward+backward pass\n(NumPy allocations; buffers numba kernels allocate "
          "are not seen)")
    for line in demo_findings(rows):
        print(line)
    return 0


def demo_run(config: TrainConfig, eval_examples: int, label: str, progress: bool = True):
    """Train and measure one (task, attention) pair: (its DemoRow, seconds spent warming up)."""
    run = Run.create(config)
    started = time.perf_counter()
    warm_up(run)  # compile the kernels before the clock starts
    warm_up_seconds = time.perf_counter() - started
    bar = ProgressBar(config.steps, label) if progress else None
    result = train(run, progress=bar)
    if result.interrupted:
        raise KeyboardInterrupt
    accuracy = inspection.evaluate(run.model, run.task, config.seed, eval_examples)
    row = DemoRow(
        task=config.task, attention=config.attention,
        final_loss=float(np.mean(run.losses[-10:])), accuracy=accuracy, seconds=result.seconds,
        tokens_per_second=result.tokens_per_second(run), peak_bytes=step_peak_memory(run),
    )
    return row, warm_up_seconds


def format_table(rows: list[DemoRow]) -> str:
    header = ("task", "attention", "final loss", "held-out acc", "train time", "tokens/s", "peak memory")
    lines = [(row.task, row.attention, f"{row.final_loss:.3f}", f"{100 * row.accuracy:.1f}%",
              f"{row.seconds:.1f} s", f"{row.tokens_per_second:,.0f}", f"{row.peak_bytes / 2**20:.1f} MiB")
             for row in rows]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def render(cells):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in lines)])


def demo_findings(rows: list[DemoRow]) -> list[str]:
    """What the table should show, each claim checked against the rows that bear on it."""
    accuracy = {(row.task, row.attention): row.accuracy for row in rows}
    findings = []

    def claim(text, holds):
        findings.append(f"  [{'yes' if holds else 'NO '}] {text}")

    if ("recall", "exact") in accuracy:
        exact = accuracy["recall", "exact"]
        claim(f"exact attention solves recall: {100 * exact:.1f}% >= 95%", exact >= 0.95)
        if ("recall", "linear") in accuracy:
            linear = accuracy["recall", "linear"]
            claim(f"linear attention is worse at recall: {100 * linear:.1f}% vs {100 * exact:.1f}% exact",
                  linear <= exact - 0.05)
    if ("needle", "window") in accuracy:
        task = make_task("needle")
        window = accuracy["needle", "window"]
        reach = TrainConfig.window * TrainConfig.num_layers
        chance = 1 / task.num_values
        text = (f"sliding window (reach {TrainConfig.window} x {TrainConfig.num_layers} layers = {reach} tokens) "
                f"cannot see a needle {task.min_distance}+ tokens back: {100 * window:.1f}% (chance {100 * chance:.0f}%)")
        if ("needle", "exact") in accuracy:
            text += f", exact {100 * accuracy['needle', 'exact']:.1f}%"
        claim(text, window <= chance + 0.1)
    if findings:
        findings.insert(0, "\nwhat the table shows:")
    return findings


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------------------- train


def mpi_world():
    """MPI_COMM_WORLD when this process is one of several ranks started by mpiexec (MPICH's
    or Open MPI's environment says so), else None."""
    import os

    size = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise CLIError(f"started as one of {size} MPI ranks, but mpi4py is missing: "
                       "pip install 'microattn[mpi]'") from None
    return MPI.COMM_WORLD


def cmd_train(args) -> int:
    given = {field: getattr(args, field) for _, field, _, _ in RUN_OPTIONS if getattr(args, field) is not None}
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file; expected a directory (for checkpoint.npz and loss.png)")
    comm = mpi_world()
    writer = comm is None or comm.rank == 0
    say = print if writer else (lambda *_, **__: None)  # rank 0 speaks for all
    checkpoint = args.out / CHECKPOINT_NAME
    if args.resume:
        run = Run.load(args.out)
        saved = vars(run.config)
        changed = [f"--{field.replace('_', '-')} {value} (the checkpoint has {saved[field]})"
                   for field, value in given.items() if saved[field] != value]
        if changed:
            raise CLIError("a resumed run keeps its configuration; drop " + ", ".join(changed))
        if run.step >= run.config.steps:
            say(f"{checkpoint} is already at step {run.step} of {run.config.steps}; nothing to do")
            return 0
        say(f"resuming {run.config.task} / {run.config.attention} at step {run.step} of {run.config.steps}")
    else:
        if checkpoint.exists():
            raise CLIError(f"{checkpoint} exists; pass --resume to continue that run, or choose another --out")
        if comm is not None:
            comm.Barrier()  # every rank has looked before rank 0 writes the first checkpoint
        run = Run.create(TrainConfig(**given))
        say(f"training {run.config.task} / {run.config.attention}: {run.model.num_parameters():,} parameters, "
            f"{run.config.steps} steps of {run.config.batch_size} x {run.task.seq_len} tokens")
    if comm is not None:
        run.data_parallel(comm)
        say(f"data parallel over {comm.size} MPI ranks: {run.config.batch_size // comm.size} sequences "
            "each per step, gradients averaged")

    bar = None if args.no_progress or not writer else ProgressBar(
        run.config.steps, f"{run.config.attention}", start=run.step)
    result = train(run, args.out, progress=bar)
    if comm is not None:
        from .. import distributed

        digest = distributed.check_same_weights(run.model.parameters(), comm)
        say(f"weights identical on all {comm.size} ranks (sha256 {digest[:16]})")
    if result.interrupted:
        say(f"interrupted at step {run.step}; checkpoint saved to {result.checkpoint}; "
            f"continue with: microattn train --out {args.out} --resume")
        return INTERRUPTED
    if not writer:
        return 0

    accuracy = inspection.evaluate(run.model, run.task, run.config.seed, args.eval_examples)
    print(f"step {run.step}: loss {np.mean(run.losses[-10:]):.4f} (mean of the last 10 steps), "
          f"held-out accuracy {100 * accuracy:.1f}% on {args.eval_examples} sequences")
    print(f"checkpoint: {result.checkpoint}")
    note = plots.save_loss_plot(run.losses, args.out / LOSS_PLOT_NAME)
    print(note or f"loss curve: {args.out / LOSS_PLOT_NAME}")
    return 0


# ----------------------------------------------------------------------------- eval, sample


def cmd_eval(args) -> int:
    run = Run.load(args.checkpoint)
    accuracy = inspection.evaluate(run.model, run.task, args.seed, args.examples, use_cache=not args.no_cache)
    how = "one forward pass" if args.no_cache else "token by token through the KV cache"
    print(f"{run.config.task} / {run.config.attention} at step {run.step}: held-out accuracy "
          f"{100 * accuracy:.1f}% on {args.examples} sequences ({how})")
    return 0


def cmd_sample(args) -> int:
    run = Run.load(args.checkpoint)
    task = run.task
    print(f"{task.name} / {run.config.attention} at step {run.step}: {task.summary}")
    for index in range(args.num):
        prompt, expected = inspection.first_answer_prompt(task, args.seed, index)
        generated = run.model.generate(prompt, max_new_tokens=len(expected), greedy=True)[0, prompt.shape[1]:]
        verdict = "correct" if np.array_equal(generated, expected) else f"expected {task.decode(expected)}"
        print(f"\n  prompt:    {task.decode(prompt[0])}\n  generated: {task.decode(generated)}   ({verdict})")
    return 0


# ----------------------------------------------------------------------------- attention-map


def cmd_attention_map(args) -> int:
    if plots.pyplot() is None:  # before loading anything
        raise CLIError(f"attention-map needs matplotlib: {plots.PLOT_EXTRA}")
    if args.out.is_dir():
        raise CLIError(f"--out {args.out} is a directory; expected the name of the PNG file to write")
    if not args.out.absolute().parent.is_dir():
        raise CLIError(f"--out {args.out}: {args.out.parent} is not an existing folder")
    run = Run.load(args.checkpoint)
    task = run.task
    inputs = make_batch(task, run.config.seed, args.example, 1, split="heldout").inputs
    maps = inspection.attention_maps(run.model, inputs)  # per layer (1, H, N, N)

    drops = None
    if not args.no_ablation:
        baseline, drops = inspection.head_ablation(run.model, task, run.config.seed, args.examples)
        print(f"head ablation on {args.examples} held-out sequences (baseline accuracy {100 * baseline:.1f}%):")
        print("  layer  head  accuracy drop")
        for layer, head in np.ndindex(drops.shape):
            print(f"  {layer:>5}  {head:>4}  {100 * drops[layer, head] + 0.0:>9.1f} pts")

    title = f"{task.name} / {run.config.attention}: attention weights (rows: queries, columns: keys)"
    plots.save_attention_maps(maps, task.decode(inputs[0]).split(), args.out, title=title, drops=drops)
    print(f"attention maps: {args.out}")
    return 0
