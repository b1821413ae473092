"""The ``microattn`` command: demo, train, eval, sample, attention-map, generate, finetune,
exercise, complexity, niah.

    microattn demo                       # train every attention variant, print the table
    microattn train --task recall --attention window --steps 300 --out runs/w
    microattn train --out runs/w --resume
    microattn eval --checkpoint runs/w
    microattn sample --checkpoint runs/w
    microattn attention-map --checkpoint runs/w --out map.png
    microattn train --text book.txt --out runs/book          # a byte-level model of a file
    microattn sample --checkpoint runs/book --prompt "Once"
    microattn generate --model DIR --prompt "Once upon"      # a Hugging Face checkpoint
    microattn finetune --model DIR --text book.txt --out DIR2
    microattn exercise list                                  # graded exercises: list, start,
    microattn exercise start 1 work/ && microattn exercise check 1 work/   # check, hint
    microattn complexity --quick                              # time and memory against N, fitted exponents
    microattn niah --train runs/niah                          # needle in a haystack, a heatmap per variant

Every command returns an exit status from :func:`main` (0 success, 1 an error, 2 bad
arguments, 130 interrupted, 141 stdout closed by its reader); errors print one line,
``microattn: error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..autograd import no_grad
from ..kernels import blas
from ..nn.transformer import sample_next_token
from . import complexity, inspection, niah, plots
from .checkpoint import CHECKPOINT_NAME
from .loop import (
    VARIANTS,
    ProgressBar,
    Run,
    TrainConfig,
    loss_on_batch,
    step_peak_memory,
    train,
    warm_up,
)
from .tasks import TASKS, TextFile, heldout_batches, make_batch, make_task
from .text import (
    MODELS_EXTRA,
    TOKENIZER,
    TOKENIZER_FILES,
    ByteStream,
    TokenStream,
    check_token_ids,
    finetune,
    load_tokenizer,
    mean_loss,
    parse_token_ids,
    rolling_generate,
)

INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"
BROKEN_PIPE = 141  # ... and for "stopped by SIGPIPE" (the reader of stdout went away)
TEXT_SEQ_LEN = 128  # train --text: bytes of context unless --seq-len says otherwise
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


def number(convert, accept, expected: str, refused: str | None = None):
    """An argparse type: ``convert(text)``, refused unless ``accept(value)``; the message
    names what was expected (``refused``, where that is said differently for a value that
    parsed)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {refused or expected}, got {text!r}")
        return value

    return parse


positive_int = number(int, lambda value: value >= 1, "a positive integer")
non_negative_int = number(int, lambda value: value >= 0, "an integer >= 0")
# finite: "nan", "inf" and "1e999" (which overflows to inf) are refused
positive_float = number(float, lambda value: math.isfinite(value) and value > 0, "a positive number",
                        "a finite positive number")
non_negative_float = number(float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0",
                            "a finite number >= 0")
probability = number(float, lambda value: 0 < value <= 1, "a number in (0, 1]")


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
                    "sliding-window, linear and grouped-query attention; train one on a text "
                    "file; run and fine-tune Hugging Face checkpoints.",
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
    train.add_argument("--text", type=path, metavar="FILE",
                       help="train a byte-level model (vocabulary 256) on this file instead of a task")
    train.add_argument("--seq-len", type=positive_int, help=f"context in bytes for --text (default {TEXT_SEQ_LEN})")
    train.add_argument("--eval-examples", type=positive_int, default=512,
                       help="held-out sequences to score at the end (default 512)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    evaluate = commands.add_parser("eval", help="held-out accuracy of a checkpoint, decoding with the KV cache")
    evaluate.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    evaluate.add_argument("--examples", type=positive_int, default=512, help="held-out sequences (default 512)")
    evaluate.add_argument("--seed", type=non_negative_int, default=0, help="picks the held-out set (default 0)")
    evaluate.add_argument("--no-cache", action="store_true", help="one full forward pass instead of the KV cache")

    sample = commands.add_parser("sample", help="generate answers for held-out prompts with the KV cache; "
                                                 "for a --text run, continue --prompt")
    sample.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    sample.add_argument("--num", type=positive_int, help="prompts to complete (default 3; --text runs: samples, default 1)")
    sample.add_argument("--seed", type=non_negative_int, default=0, help="picks the prompts, or seeds sampling (default 0)")
    sample.add_argument("--prompt", help="text to continue (runs trained with --text)")
    sample.add_argument("--max-new-tokens", type=non_negative_int, default=200,
                        help="bytes to generate after --prompt (default 200)")
    sample.add_argument("--temperature", type=non_negative_float, default=0.8,
                        help="sampling temperature for --prompt, 0 greedy (default 0.8)")
    add_filter_options(sample)

    attention_map = commands.add_parser("attention-map", help="PNG heatmaps of every head for one input, "
                                                              "and the accuracy lost by ablating each head")
    attention_map.add_argument("--checkpoint", required=True, type=path, help="a --out directory of train")
    attention_map.add_argument("--out", required=True, type=path, help="the PNG file to write")
    attention_map.add_argument("--example", type=non_negative_int, default=0, help="which held-out input (default 0)")
    attention_map.add_argument("--examples", type=positive_int, default=256,
                               help="held-out sequences for the ablation (default 256)")
    attention_map.add_argument("--no-ablation", action="store_true", help="skip the head ablation")

    generate = commands.add_parser("generate", help="continue a prompt with a Hugging Face checkpoint "
                                                    "(Llama, Mistral, Qwen2, Gemma 2, GPT-2), streaming tokens")
    generate.add_argument("--model", required=True, type=path, metavar="DIR",
                          help="a directory of config.json and *.safetensors (tokenizer.json for text)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue (needs DIR/tokenizer.json)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help='token ids to continue, e.g. "1 2 3"')
    generate.add_argument("--max-new-tokens", type=non_negative_int, default=32, help="tokens to add (default 32)")
    generate.add_argument("--temperature", type=non_negative_float, default=0.0,
                          help="0 is greedy, as transformers' default (default 0)")
    add_filter_options(generate)
    generate.add_argument("--seed", type=non_negative_int, help="seeds sampling: one seed, one output "
                                                                "(default: fresh randomness)")

    tune = commands.add_parser("finetune", help="fine-tune a Hugging Face checkpoint on a text file and "
                                                "save it as one (transformers loads the result)")
    tune.add_argument("--model", required=True, type=path, metavar="DIR", help="the checkpoint (with tokenizer.json)")
    tune.add_argument("--text", required=True, type=path, metavar="FILE", help="UTF-8 text to train on")
    tune.add_argument("--out", required=True, type=path, metavar="DIR2", help="a new directory for the result")
    tune.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    tune.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    tune.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (default 4)")
    tune.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (default 128)")
    tune.add_argument("--seed", type=non_negative_int, default=0, help="picks the windows (default 0)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    exercise = commands.add_parser("exercise", help="graded exercises, from Tensor.backward to the CUDA "
                                                    "kernel: list, start N DIR, check N DIR, hint N")
    actions = exercise.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    actions.required = True
    actions.add_parser("list", help="the exercises, in order")
    begin = actions.add_parser("start", help="copy exercise N's stub into DIR")
    begin.add_argument("number", type=positive_int, metavar="N")
    begin.add_argument("directory", type=path, metavar="DIR")
    begin.add_argument("--force", action="store_true", help="overwrite the file if DIR has it already")
    grade = actions.add_parser("check", help="grade DIR's file for exercise N")
    grade.add_argument("number", type=positive_int, metavar="N")
    grade.add_argument("directory", type=path, metavar="DIR")
    hint = actions.add_parser("hint", help="the hints for exercise N, gentlest first")
    hint.add_argument("number", type=positive_int, metavar="N")
    cost = commands.add_parser("complexity", help="time and peak memory of full, flash, GQA, window and linear "
                                                  "attention against N, with fitted exponents and a log-log PNG")
    cost.add_argument("--budget", type=positive_float,
                      help=f"seconds of measuring, compilation excluded (default {complexity.BUDGET:g}; "
                           f"--quick: {complexity.QUICK['budget']:g})")
    cost.add_argument("--quick", action="store_true",
                      help=f"budget {complexity.QUICK['budget']:g} s, N up to {complexity.QUICK['max_n']}: "
                           "under a minute, compilation included")
    cost.add_argument("--max-n", type=positive_int, help=f"largest N (default {complexity.MAX_N})")
    cost.add_argument("--variants", type=name_list(list(complexity.CLAIMS)),
                      help=f"which to measure (default all: {', '.join(complexity.CLAIMS)})")
    cost.add_argument("--out", type=path, default=Path("complexity.png"), help="the PNG (default complexity.png)")

    haystack = commands.add_parser("niah", help="needle in a haystack: accuracy of needle models over needle "
                                                "depth x context length, a PNG heatmap per model")
    haystack.add_argument("--checkpoint", type=path, nargs="+", metavar="DIR",
                          help="needle runs (microattn train --task needle) to evaluate")
    haystack.add_argument("--train", type=path, metavar="DIR",
                          help="train the demo's needle model per attention variant into DIR/<variant>, or reuse "
                               "them from there (default niah-models, when no --checkpoint is given)")
    haystack.add_argument("--variants", type=name_list(list(VARIANTS)),
                          help=f"with --train: the variants (default {','.join(niah.VARIANTS)})")
    haystack.add_argument("--depths", type=number_list(non_negative_float), metavar="D,D,...",
                          help="needle depths in [0, 1] (default 0,0.1,...,1)")
    haystack.add_argument("--lengths", type=number_list(positive_int), metavar="N,N,...",
                          help=f"context lengths (default {','.join(map(str, niah.LENGTHS))})")
    haystack.add_argument("--examples", type=positive_int, default=niah.EXAMPLES,
                          help=f"sequences per cell (default {niah.EXAMPLES})")
    haystack.add_argument("--seed", type=non_negative_int, default=0, help="picks the sequences (default 0)")
    haystack.add_argument("--out-dir", type=path, default=Path("."),
                          help="where the heatmaps niah-<variant>.png go (default .)")
    haystack.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def number_list(kind):
    """A comma-separated list of numbers, each parsed by ``kind``: "0,0.5,1"."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}")
        return [kind(item) for item in items]

    return parse


def add_filter_options(parser) -> None:
    parser.add_argument("--top-k", type=positive_int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=probability,
                        help="sample among the most likely tokens holding this much probability")


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad arguments
    handlers = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample,
                "attention-map": cmd_attention_map, "generate": cmd_generate, "finetune": cmd_finetune,
                "exercise": cmd_exercise,
                "complexity": cmd_complexity, "niah": cmd_niah}
    # The demo's products are tiny: BLAS threads cost more than they save. A pretrained
    # model's are not: generate and finetune keep BLAS's own threads.
    pin = contextlib.nullcontext() if args.command in ("generate", "finetune") else blas.single_threaded()
    try:
        with pin:
            return handlers[args.command](args)
    except KeyboardInterrupt:
        print("\nmicroattn: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # whoever read stdout stopped (`microattn generate ... | head`): end quietly, as
        # Unix tools do, and keep Python's last flush at exit from failing again
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except MemoryError:
        print("microattn: error: out of memory: choose smaller sizes (--batch-size, --embed-dim, --layers, "
              "--examples, ...)", file=sys.stderr)
        return 1
    except (CLIError, ValueError, OSError, KeyError, RuntimeError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"microattn: error: {str(message).replace(chr(10), ' ')}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- exercise


def cmd_exercise(args) -> int:
    from .. import exercises

    if args.action == "list":
        for ex in exercises.all_exercises():
            print(f"{ex.NUMBER:>2}. {ex.TITLE}\n      read: {ex.READ}; file: {ex.FILE}")
        print("\nmicroattn exercise start N DIR   then edit DIR's file, then   microattn exercise check N DIR")
        return 0
    ex = exercises.exercise(args.number)
    if args.action == "hint":
        print(f"Exercise {ex.NUMBER}: {ex.TITLE}\nRead first: {ex.READ}")
        for number, text in enumerate(ex.HINTS, 1):
            print(f"\nhint {number}: {text}")
        return 0
    if args.action == "start":
        target = exercises.start(args.number, args.directory, force=args.force)
        print(f"Exercise {ex.NUMBER}: {ex.TITLE}\nwrote {target}: fill in what raises NotImplementedError, "
              f"then run\n    microattn exercise check {ex.NUMBER} {args.directory}\nread first: {ex.READ}")
        return 0
    if exercises.needs_own_process(ex):  # e.g. the CUDA simulator, set before numba starts
        status, printed = exercises.check_in_own_process(args.number, args.directory)
        print(printed, end="")
        return status
    try:
        done = exercises.check(args.number, args.directory)
    except exercises.Failure as failure:
        print(f"Exercise {ex.NUMBER} ({ex.SLUG}): not yet.\n{failure}\n(hints: microattn exercise hint {ex.NUMBER})")
        return 1
    for line in done:
        print(f"  ok  {line}")
    print(f"Exercise {ex.NUMBER} ({ex.SLUG}): passed. Next: microattn exercise start {ex.NUMBER + 1} DIR"
          if ex.NUMBER < len(exercises.ORDER) else f"Exercise {ex.NUMBER} ({ex.SLUG}): passed. That was the last one.")
    return 0


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


def text_options(args, given: dict) -> dict | None:
    """The task options of a --text run ({"path", "seq_len"}), or None for a task run;
    CLIError for --text or --seq-len where they do not belong."""
    if given.get("task") == "text":
        raise CLIError("--task text: give the file itself with --text FILE")
    if args.text is None:
        if args.seq_len is not None and not args.resume:
            raise CLIError("--seq-len sets the context of a --text run; a task has its own length")
        return None
    if "task" in given:
        raise CLIError(f"--text trains on a file, --task {given['task']} on a synthetic task: choose one")
    return {"path": str(args.text.resolve()), "seq_len": args.seq_len or TEXT_SEQ_LEN}


def check_resumed_text(run: Run, args) -> None:
    """--text / --seq-len given with --resume must be what the run recorded."""
    if args.text is None and args.seq_len is None:
        return
    options = run.config.task_options
    if run.config.task != "text":
        raise CLIError(f"--text and --seq-len are for --text runs; this run learns the {run.config.task} task")
    if args.text is not None and str(args.text.resolve()) != options["path"]:
        raise CLIError(f"a resumed run keeps its file; drop --text {args.text} (the run trains on {options['path']})")
    if args.seq_len is not None and args.seq_len != options["seq_len"]:
        raise CLIError(f"a resumed run keeps its configuration; drop --seq-len {args.seq_len} "
                       f"(the checkpoint has {options['seq_len']})")


def describe_task(run: Run) -> str:
    if isinstance(run.task, TextFile):
        return f"{Path(run.task.path).name} ({run.task.size:,} bytes)"
    return run.config.task


def cmd_train(args) -> int:
    given = {field: getattr(args, field) for _, field, _, _ in RUN_OPTIONS if getattr(args, field) is not None}
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file; expected a directory (for checkpoint.npz and loss.png)")
    file_options = text_options(args, given)
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
        check_resumed_text(run, args)
        if run.step >= run.config.steps:
            say(f"{checkpoint} is already at step {run.step} of {run.config.steps}; nothing to do")
            return 0
        if isinstance(run.task, TextFile):
            run.task.check()  # the file is still there, and still the one the run began with
        say(f"resuming {describe_task(run)} / {run.config.attention} at step {run.step} of {run.config.steps}")
    else:
        if checkpoint.exists():
            raise CLIError(f"{checkpoint} exists; pass --resume to continue that run, or choose another --out")
        if comm is not None:
            comm.Barrier()  # every rank has looked before rank 0 writes the first checkpoint
        if file_options is not None:  # the file's digest goes into the config: a resume checks it
            file_options["sha256"] = TextFile(**file_options).check()
            given.update(task="text", task_options=file_options)
        run = Run.create(TrainConfig(**given))
        say(f"training {describe_task(run)} / {run.config.attention}: {run.model.num_parameters():,} parameters, "
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

    if isinstance(run.task, TextFile):
        loss = np.mean(run.losses[-10:])
        print(f"step {run.step}: loss {loss:.4f} (mean of the last 10 steps) = {loss / math.log(2):.3f} bits per byte")
    else:
        accuracy = inspection.evaluate(run.model, run.task, run.config.seed, args.eval_examples)
        print(f"step {run.step}: loss {np.mean(run.losses[-10:]):.4f} (mean of the last 10 steps), "
              f"held-out accuracy {100 * accuracy:.1f}% on {args.eval_examples} sequences")
    print(f"checkpoint: {result.checkpoint}")
    note = plots.save_loss_plot(run.losses, args.out / LOSS_PLOT_NAME)
    print(note or f"loss curve: {args.out / LOSS_PLOT_NAME}")
    if isinstance(run.task, TextFile):
        print(f"continue a text with: microattn sample --checkpoint {args.out} --prompt \"...\"")
    return 0


# ----------------------------------------------------------------------------- eval, sample


def cmd_eval(args) -> int:
    run = Run.load(args.checkpoint)
    if isinstance(run.task, TextFile):
        return eval_text(run, args)
    accuracy = inspection.evaluate(run.model, run.task, args.seed, args.examples, use_cache=not args.no_cache)
    how = "one forward pass" if args.no_cache else "token by token through the KV cache"
    print(f"{run.config.task} / {run.config.attention} at step {run.step}: held-out accuracy "
          f"{100 * accuracy:.1f}% on {args.examples} sequences ({how})")
    return 0


def eval_text(run: Run, args) -> int:
    """Next-byte accuracy and loss on random windows of a --text run's file."""
    correct = total = 0
    loss_sum = 0.0
    for batch in heldout_batches(run.task, args.seed, args.examples):
        predictions = inspection.predict(run.model, batch.inputs, use_cache=not args.no_cache)
        correct += int((predictions == batch.targets).sum())
        total += batch.targets.size
        with no_grad():
            loss_sum += float(loss_on_batch(run.model, batch).item()) * batch.targets.size
    loss = loss_sum / total
    print(f"{describe_task(run)} / {run.config.attention} at step {run.step}: next-byte accuracy "
          f"{100 * correct / total:.1f}%, loss {loss:.4f} = {loss / math.log(2):.3f} bits per byte, on "
          f"{args.examples} random windows of the file (a text run has no held-out part: training may have "
          "seen them)")
    return 0


def cmd_sample(args) -> int:
    run = Run.load(args.checkpoint)
    task = run.task
    if isinstance(task, TextFile):
        return sample_text(run, args)
    if args.prompt is not None:
        raise CLIError(f"--prompt continues text, for runs trained with --text; this run learned the "
                       f"{task.name} task (sample shows its held-out prompts)")
    print(f"{task.name} / {run.config.attention} at step {run.step}: {task.summary}")
    for index in range(args.num or 3):
        prompt, expected = inspection.first_answer_prompt(task, args.seed, index)
        generated = run.model.generate(prompt, max_new_tokens=len(expected), greedy=True)[0, prompt.shape[1]:]
        verdict = "correct" if np.array_equal(generated, expected) else f"expected {task.decode(expected)}"
        print(f"\n  prompt:    {task.decode(prompt[0])}\n  generated: {task.decode(generated)}   ({verdict})")
    return 0


def sample_text(run: Run, args) -> int:
    """Continue --prompt with a byte-level model, streaming each character as it completes."""
    if args.prompt is None:
        raise CLIError(f"this run learned the text of {run.task.path}: give --prompt TEXT to continue")
    prompt_bytes = os.fsencode(args.prompt)  # the bytes typed, even ones that are not UTF-8
    if not prompt_bytes:
        raise CLIError("--prompt is empty; give at least one character to continue")
    prompt = np.frombuffer(prompt_bytes, dtype=np.uint8).astype(np.int64)
    rng = np.random.default_rng(args.seed)

    def pick(logits):
        return sample_next_token(logits, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, rng=rng)

    out = sys.stdout
    for index in range(args.num or 1):
        if index:
            out.write("\n\n")
        stream = ByteStream()
        out.write(prompt_bytes.decode("utf-8", errors="replace"))
        out.flush()

        def show(tokens, stream=stream):
            piece = stream.step(tokens[0])
            if piece:
                out.write(piece)
                out.flush()

        rolling_generate(run.model, prompt, args.max_new_tokens, pick=pick, on_token=show)
        out.write(stream.finish())
    out.write("\n")
    out.flush()
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
    labels = [task.token_names[int(token)] for token in inputs[0]]
    plots.save_attention_maps(maps, labels, args.out, title=title, drops=drops)
    print(f"attention maps: {args.out}")
    return 0


# ----------------------------------------------------------------------------- generate, finetune


def _models():
    """microattn.models, or a CLIError naming the extra when safetensors is missing."""
    try:
        import safetensors  # noqa: F401  (the models extra)
    except ImportError:
        raise CLIError(f"Hugging Face checkpoints need the safetensors package: {MODELS_EXTRA}") from None
    from .. import models

    return models


def check_model_dir(directory: Path) -> None:
    if not directory.exists():
        raise CLIError(f"--model {directory}: no such directory")
    if not directory.is_dir():
        raise CLIError(f"--model {directory} is a file; expected a checkpoint directory "
                       "(config.json and *.safetensors)")


def load_model(directory: Path):
    """(model, seconds) for a checkpoint directory; its errors name the file."""
    models = _models()
    started = time.perf_counter()
    model = models.from_pretrained(directory)
    return model, time.perf_counter() - started


def model_summary(model, directory: Path, seconds: float) -> str:
    return (f"{directory}: {model.arch.family.model_type}, {model.num_parameters():,} parameters, "
            f"float32, loaded in {seconds:.2f} s")


def check_length(model, tokens: int, what: str) -> None:
    """GPT-2 has learned positions: a sequence longer than n_positions cannot run."""
    limit = model.arch.max_positions
    if limit is not None and tokens > limit:
        raise CLIError(f"{what} is {tokens} tokens; this model has {limit} positions (n_positions)")


def cmd_generate(args) -> int:
    check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise CLIError(f"--prompt needs a tokenizer to turn text into tokens, and {args.model} has no "
                           f"{TOKENIZER}; give token ids with --prompt-ids \"1 2 3\"")
        ids = np.array(tokenizer.encode(args.prompt).ids, dtype=np.int64)
        if ids.size == 0:
            raise CLIError("--prompt encodes to no tokens; give some text to continue")
        what = "the tokenized --prompt"
    else:
        ids, what = parse_token_ids(args.prompt_ids), "--prompt-ids"
    model, seconds = load_model(args.model)
    check_token_ids(ids, model.arch.vocab_size, what)
    check_length(model, len(ids) + args.max_new_tokens, f"{what} plus --max-new-tokens")
    print(model_summary(model, args.model, seconds), file=sys.stderr, flush=True)

    out = sys.stdout
    if tokenizer is not None:
        out.write(args.prompt if args.prompt is not None else tokenizer.decode(ids.tolist()))
        stream = TokenStream(tokenizer, ids)
        piece_of, finish = stream.step, stream.finish
    else:
        out.write(" ".join(str(i) for i in ids))
        piece_of, finish = (lambda token: f" {token}"), (lambda: "")
    out.flush()

    def show(tokens):
        piece = piece_of(int(tokens[0]))
        if piece:
            out.write(piece)
            out.flush()

    started = time.perf_counter()
    model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, on_token=show)
    seconds = time.perf_counter() - started
    out.write(finish() + "\n")
    out.flush()
    rate = args.max_new_tokens / seconds if seconds > 0 else float("nan")
    print(f"{args.max_new_tokens} new tokens in {seconds:.2f} s ({rate:.1f} tokens/s, the {len(ids)}-token "
          "prompt's pass included)", file=sys.stderr)
    return 0


def read_text(file: Path) -> str:
    """The UTF-8 text of --text FILE; CLIError if it is missing, empty or not UTF-8."""
    if not file.exists():
        raise CLIError(f"--text {file}: no such file")
    if not file.is_file():
        raise CLIError(f"--text {file} is not a file")
    data = file.read_bytes()
    if not data:
        raise CLIError(f"--text {file} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CLIError(f"--text {file} is not UTF-8 text (byte {error.start}: {data[error.start:error.start + 1]!r}); "
                       "fine-tuning tokenizes text") from None


def cmd_finetune(args) -> int:
    check_model_dir(args.model)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CLIError(f"--out {args.out} exists and is not an empty directory; choose a new one "
                       "(the fine-tuned checkpoint is written there)")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise CLIError(f"finetune tokenizes the text with the model's tokenizer, and {args.model} has no {TOKENIZER}")
    corpus = read_text(args.text)
    tokens = np.array(tokenizer.encode(corpus).ids, dtype=np.int64)
    if len(tokens) < args.seq_len + 1:
        raise CLIError(f"--text {args.text} is {len(tokens)} tokens; a training window needs --seq-len + 1 = "
                       f"{args.seq_len + 1}: use a longer text or a smaller --seq-len")
    model, seconds = load_model(args.model)
    check_token_ids(tokens, model.arch.vocab_size, "the tokenized --text")
    check_length(model, args.seq_len, "--seq-len")
    print(model_summary(model, args.model, seconds))
    print(f"fine-tuning on {args.text} ({len(tokens):,} tokens): {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len} tokens, AdamW lr {args.lr:g}", flush=True)

    before = mean_loss(model, tokens, args.seq_len, seed=args.seed + 1)
    bar = None if args.no_progress else ProgressBar(args.steps, "finetune")
    history = finetune(model, tokens, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=args.seed,
                       on_step=None if bar is None else (lambda step, loss: bar.update(step, loss)))
    if bar is not None:
        bar.close()
    after = mean_loss(model, tokens, args.seq_len, seed=args.seed + 1)
    print(f"training loss {history[0]:.3f} (step 1) -> {np.mean(history[-10:]):.3f} (mean of the last 10 steps); "
          f"on 8 random windows of the text: {before:.3f} before, {after:.3f} after")

    _models().save_pretrained(model, args.out)
    copied = [name for name in TOKENIZER_FILES if (args.model / name).is_file()]
    for name in copied:
        shutil.copyfile(args.model / name, args.out / name)
    print(f"saved to {args.out}: config.json, model.safetensors" + "".join(f", {name}" for name in copied))
    print(f"try it: microattn generate --model {args.out} --prompt \"...\"")
    return 0


# ----------------------------------------------------------------------------- complexity, niah


def check_png_path(out: Path, flag: str) -> None:
    if out.is_dir():
        raise CLIError(f"{flag} {out} is a directory; expected the name of the PNG file to write")
    if not out.absolute().parent.is_dir():
        raise CLIError(f"{flag} {out}: {out.parent} is not an existing folder")


def cmd_complexity(args) -> int:
    check_png_path(args.out, "--out")
    settings = {"budget": complexity.BUDGET, "max_n": complexity.MAX_N, "min_time": complexity.MIN_TIME}
    if args.quick:
        settings.update(complexity.QUICK)
    if args.budget is not None:
        settings["budget"] = args.budget
    if args.max_n is not None:
        if args.max_n < complexity.START:
            raise CLIError(f"--max-n {args.max_n} is below the first size, {complexity.START}")
        settings["max_n"] = args.max_n
    started = time.perf_counter()
    print(f"microattn complexity: N = {complexity.START}, {2 * complexity.START}, ... up to {settings['max_n']}, "
          f"about {settings['budget']:g} s of measuring (compilation excluded), one thread", flush=True)
    if not complexity.numba_allocations_traced():
        print("note: tracemalloc does not see numba's allocations with this numba: the flash and linear "
              "memory columns count only what NumPy allocates")

    def progress(series, point):
        if not args.quick:
            print(f"  {series.name:<6} N={point.n:<6} fwd+bwd {point.fwdbwd_s * 1e3:9.2f} ms", file=sys.stderr,
                  flush=True)

    results = complexity.measure(settings["budget"], start=complexity.START, max_n=settings["max_n"],
                                 min_time=settings["min_time"], variants=args.variants, progress=progress)
    print(complexity.format_report(results))
    note = complexity.save_plot(results, args.out)
    print(note or f"log-log picture: {args.out}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


def cmd_niah(args) -> int:
    if args.checkpoint and args.train is not None:
        raise CLIError("give --checkpoint DIR ... (runs to evaluate) or --train DIR (train the demo's needle "
                       "models there), not both")
    if args.variants and args.checkpoint:
        raise CLIError("--variants picks the models --train trains; with --checkpoint the runs are given")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise CLIError(f"--out-dir {args.out_dir} is a file; expected a directory for the heatmaps")
    depths = tuple(args.depths) if args.depths else niah.DEPTHS
    lengths = tuple(args.lengths) if args.lengths else niah.LENGTHS
    niah.check_grid(depths, lengths, args.examples)
    started = time.perf_counter()
    if args.checkpoint:
        directories = {}
        for directory in args.checkpoint:
            run = Run.load(directory)
            niah.check_needle_run(run, directory)
            name = run.config.attention if run.config.attention not in directories else f"{run.config.attention}-{directory.name}"
            directories[name] = directory
    else:
        out = args.train if args.train is not None else Path("niah-models")
        print(f"the demo's needle models ({DEMO_STEPS['needle']} steps of {DEMO_SETTINGS['batch_size']} sequences, "
              f"needles at every distance) in {out}", flush=True)
        directories = niah.train_models(out, args.variants or niah.VARIANTS, steps=DEMO_STEPS["needle"],
                                        batch_size=DEMO_SETTINGS["batch_size"], progress=not args.no_progress)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, directory in directories.items():
        grid = niah.evaluate_grid(Run.load(directory), name, depths, lengths, args.examples, args.seed)
        print()
        print(niah.format_grid(grid))
        picture = args.out_dir / f"niah-{name}.png"
        note = niah.save_heatmap(grid, picture)
        print(f"  {note or f'heatmap: {picture}'}", flush=True)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0
