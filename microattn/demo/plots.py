"""PNG pictures of a run: the loss curve and the attention maps. matplotlib is optional
(``pip install 'microattn[plot]'``); without it the loss curve becomes a note and the
attention maps an error, and nothing else in the demo needs it."""

from __future__ import annotations

import numpy as np

PLOT_EXTRA = "pip install 'microattn[plot]'"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_loss_plot(losses_so_far, path) -> str | None:
    """Write the loss curve to ``path`` as a PNG; returns None, or a note saying why not."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed, so no loss plot ({PLOT_EXTRA})"
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(np.arange(1, len(losses_so_far) + 1), losses_so_far, linewidth=1)
    axes.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def save_attention_maps(maps, labels, path, *, title: str, drops=None) -> None:
    """One heatmap per (layer, head) of ``maps`` (a list per layer of (1, H, N, N) weights),
    axes labelled with the input tokens; ``drops`` (layers, heads), if given, is the
    accuracy each head's ablation costs, shown in its title. ImportError without matplotlib."""
    plt = pyplot()
    if plt is None:
        raise ImportError(f"drawing attention maps needs matplotlib: {PLOT_EXTRA}")
    num_layers, num_heads = len(maps), maps[0].shape[1]
    figure, axes = plt.subplots(num_layers, num_heads, figsize=(3.2 * num_heads, 3.2 * num_layers), squeeze=False)
    for layer, head in np.ndindex(num_layers, num_heads):
        ax = axes[layer, head]
        ax.imshow(maps[layer][0, head], cmap="viridis", vmin=0, vmax=1)
        subtitle = f"layer {layer} head {head}"
        if drops is not None:
            subtitle += f"\nablated: {-100 * drops[layer, head] + 0.0:+.1f} pts"
        ax.set_title(subtitle, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, fontsize=5)
        ax.set_yticks(range(len(labels)), labels, fontsize=5)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
