"""``microattn niah``: needle in a haystack, accuracy over needle depth x context length.

A trained needle model (``tasks.Needle``: fillers, a marker "!" and a digit, then "?" ->
the digit) reads sequences whose needle sits at a chosen **depth** (0: right after a marker
at the very start; 1: right before the "?"; ``Needle.needle_position``) in contexts of
several **lengths**; each cell of the grid is the fraction of ``examples`` sequences whose
digit the model predicts after "?" (greedy, one forward pass). Chance is 1 / 10.

The models ("the demo's needle models", :func:`train_models`): the demo's needle run for
each attention variant (the demo's model and optimiser, ``DEMO_STEPS["needle"]`` = 150
steps of 32 sequences of 40 tokens), with one change: the needle is drawn at **every**
distance from the "?" (``min_distance=1``), not only 32+ tokens back as in the demo's
table. A grid over depths asks for needles at every distance; a model that never saw a
near one would be tested on something it was not taught (the demo's own runs, given with
``--checkpoint``, show exactly that: exact attention then misses some needles right before
the "?"). Trained once into a directory and reused from there.

Lengths: a model with rotary positions (the demo's) runs at any length, so the grid goes
past the trained 40 tokens (extrapolation, marked on the picture); a model with learned
positions stops at its ``max_len``.

The grid's sequences come from their own random stream (:data:`STREAM`), which neither
training (split 0) nor the held-out set (split 1) draws from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import inspection
from .checkpoint import CHECKPOINT_NAME
from .loop import ProgressBar, Run, TrainConfig, train, warm_up
from .tasks import Needle

DEPTHS = tuple(np.round(np.linspace(0, 1, 11), 2).tolist())  # 0%, 10%, ..., 100%
LENGTHS = (16, 24, 32, 40, 64, 96, 128)
VARIANTS = ("exact", "gqa", "linear", "window")
EXAMPLES = 100  # sequences per cell
MIN_DISTANCE = 1  # the niah models see needles at every distance (see the docstring)
STREAM = 2  # the grid's random stream: make_batch's splits are 0 (train) and 1 (heldout)


@dataclass
class Grid:
    """One model's accuracies: ``accuracy[i, j]`` at ``depths[i]`` and ``lengths[j]``."""

    name: str  # a label: the attention variant, or the checkpoint's directory
    run: Run
    depths: tuple
    lengths: tuple
    accuracy: np.ndarray  # (len(depths), len(lengths))
    examples: int  # sequences per cell
    dropped: tuple = ()  # lengths asked for that this model cannot run (learned positions)

    @property
    def trained_length(self) -> int:
        return self.run.task.seq_len

    @property
    def reach(self) -> int | None:
        """Tokens back a window model can see through all its layers (None: unbounded)."""
        config = self.run.config
        return config.window * config.num_layers if config.attention == "window" else None


def check_needle_run(run: Run, where) -> None:
    if not isinstance(run.task, Needle):
        raise ValueError(f"{where} learned the {run.config.task} task; niah needs a needle run "
                         "(microattn train --task needle ...)")


def usable_lengths(run: Run, lengths) -> tuple[tuple, tuple]:
    """(lengths the model can run, lengths it cannot): rotary positions run at any length,
    learned ones up to ``max_len``."""
    if run.config.rope:
        return tuple(lengths), ()
    limit = run.model.max_len
    return tuple(n for n in lengths if n <= limit), tuple(n for n in lengths if n > limit)


def check_grid(depths, lengths, examples) -> None:
    if not depths or any(not (isinstance(d, (int, float)) and 0 <= d <= 1) for d in depths):
        raise ValueError(f"depths must be numbers in [0, 1], got {list(depths)}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 3 for n in lengths):
        raise ValueError(f"lengths must be integers >= 3 (marker, needle, \"?\"), got {list(lengths)}")
    if examples < 1:
        raise ValueError(f"examples must be a positive integer, got {examples}")


def evaluate_grid(run: Run, name: str, depths=DEPTHS, lengths=LENGTHS, examples: int = EXAMPLES,
                  seed: int = 0) -> Grid:
    """Accuracy of ``run``'s model on every (depth, length) cell; cells of lengths the model
    cannot run are left out (``Grid.dropped``)."""
    check_grid(depths, lengths, examples)
    check_needle_run(run, name)
    depths, lengths = sorted(set(depths)), sorted(set(lengths))
    task: Needle = run.task
    kept, dropped = usable_lengths(run, lengths)
    if not kept:
        raise ValueError(f"{name}: none of the lengths {list(lengths)} fits the model's {run.model.max_len} "
                         "learned positions")
    model = run.model
    saved_max_len = model.max_len
    model.max_len = max(saved_max_len, max(kept))  # rotary positions have no limit of their own
    accuracy = np.zeros((len(depths), len(kept)))
    try:
        for i, depth in enumerate(depths):
            for j, n in enumerate(kept):
                rng = np.random.default_rng([seed, STREAM, i, n])
                batch = task.batch_at(rng, examples, float(depth), n)
                predictions = inspection.predict(model, batch.inputs)
                accuracy[i, j] = np.mean(predictions[:, -1] == batch.targets[:, -1])
    finally:
        model.max_len = saved_max_len
    return Grid(name, run, tuple(depths), kept, accuracy, examples, dropped)


# ----------------------------------------------------------------------------- the models


def niah_config(variant: str, steps: int, batch_size: int, seed: int = 0,
                min_distance: int = MIN_DISTANCE) -> TrainConfig:
    """The demo's needle run for ``variant``, needles at every distance from ``min_distance``."""
    return TrainConfig(task="needle", task_options={"min_distance": min_distance}, attention=variant,
                       steps=steps, batch_size=batch_size, seed=seed)


def train_models(directory, variants, *, steps: int, batch_size: int, seed: int = 0,
                 min_distance: int = MIN_DISTANCE, progress: bool = True, say=print) -> dict[str, Path]:
    """``directory/<variant>`` for each variant, trained there unless a finished run of the
    same configuration is already there (then reused). Returns variant -> its directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--train {directory} is a file; expected a directory for the needle models")
    found = {}
    for variant in variants:
        config = niah_config(variant, steps, batch_size, seed, min_distance)
        out = directory / variant
        if (out / CHECKPOINT_NAME).exists():
            run = Run.load(out)
            if run.config == config and run.step >= config.steps:
                say(f"{variant}: reusing {out} (trained {run.step} steps)")
                found[variant] = out
                continue
            raise ValueError(f"{out} holds another run than niah trains ({run.config.task} / "
                             f"{run.config.attention}, step {run.step} of {run.config.steps}); remove it or "
                             "choose another --train directory")
        run = Run.create(config)
        warm_up(run)
        bar = ProgressBar(config.steps, f"needle {variant:<6}") if progress else None
        result = train(run, out, progress=bar)
        if result.interrupted:
            raise KeyboardInterrupt
        say(f"{variant}: trained {config.steps} steps in {result.seconds:.1f} s -> {out}")
        found[variant] = out
    return found


# ----------------------------------------------------------------------------- the report


def format_grid(grid: Grid) -> str:
    config, task = grid.run.config, grid.run.task
    where = "" if grid.reach is None else f", reach {config.window} x {config.num_layers} layers = {grid.reach} tokens"
    lines = [(f"{grid.name}: {config.attention} attention{where}; trained on {task.seq_len} tokens, needles "
              f"{task.min_distance}+ back, step {grid.run.step}; accuracy % (chance {100 / task.num_values:.0f}%)")]
    header = ["depth \\ length", *(str(n) for n in grid.lengths)]
    rows = [[f"{100 * d:.0f}%", *(f"{100 * a:.0f}" for a in grid.accuracy[i])] for i, d in enumerate(grid.depths)]
    widths = [max(len(cells[k]) for cells in [header, *rows]) for k in range(len(header))]
    for cells in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                                      for k, (c, w) in enumerate(zip(cells, widths))))
    lines.append(f"  mean {100 * grid.accuracy.mean():.1f}%")
    if grid.dropped:
        lines.append(f"  not run: lengths {', '.join(map(str, grid.dropped))} (past the model's {grid.run.model.max_len} "
                     "learned positions)")
    return "\n".join(lines)


def save_heatmap(grid: Grid, path) -> str | None:
    """The grid as a PNG heatmap (depth down, length across, each cell annotated); returns
    None, or a note saying why not (matplotlib missing)."""
    from . import plots

    plt = plots.pyplot()
    if plt is None:
        return f"matplotlib is not installed, so no heatmap ({plots.PLOT_EXTRA})"
    depths, lengths = grid.depths, grid.lengths
    figure, ax = plt.subplots(figsize=(1.0 + 0.75 * len(lengths), 1.4 + 0.42 * len(depths)))
    image = ax.imshow(100 * grid.accuracy, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, j in np.ndindex(grid.accuracy.shape):
        value = 100 * grid.accuracy[i, j]
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                color="white" if value <= 25 else "black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    xlabel = "context length (tokens)"
    trained = grid.trained_length
    if any(n > trained for n in lengths) and any(n <= trained for n in lengths):
        edge = max(j for j, n in enumerate(lengths) if n <= trained) + 0.5
        ax.axvline(edge, color="black", linewidth=1.5, linestyle="--")
        xlabel += f"; dashed: the trained length, {trained}"
    ax.set(xlabel=xlabel, ylabel="needle depth (0%: start, 100%: just before \"?\")")
    reach_note = ""
    if grid.reach is not None:  # where the needle is exactly `reach` tokens before "?": N - 1 - position = reach
        xs, ys = [], []
        for j, n in enumerate(lengths):
            depth = (n - 2 - grid.reach) / (n - 3)  # position = 1 + depth (n - 3)
            if 0 <= depth <= 1:
                xs.append(j)
                ys.append(np.interp(depth, depths, np.arange(len(depths))))
        if xs:
            ax.plot(xs, ys, color="black", linewidth=1, alpha=0.7, marker="|")
            reach_note = f"; line: needle {grid.reach} tokens before \"?\" (the reach)"
    config = grid.run.config
    figure.colorbar(image, ax=ax, label="accuracy %", fraction=0.05)
    ax.set_title(f"needle in a haystack: {config.attention} attention"
                 + (f" (window {config.window}, {config.num_layers} layers)" if grid.reach is not None else "")
                 + ("" if grid.name == config.attention else f" [{grid.name}]")
                 + f"\n{grid.examples} sequences per cell, chance {100 / grid.run.task.num_values:.0f}%{reach_note}",
                 fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
