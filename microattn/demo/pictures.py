"""The docs' pictures, drawn from the library's own code: ``python -m microattn.demo.pictures
docs/pictures`` (or ``docs/pictures/make_pictures.py``) writes every PNG.

Each picture takes its facts from the code it illustrates, not from a drawing of it:

* ``autograd_graph``: the worked example of docs/autograd.md, run through the engine; the
  nodes are ``topological_order(out)``, the edges ``ctx.parents``, and the gradients those
  the Functions' own ``backward`` returned during ``out.backward()`` (recorded on the way).
* ``flash_tile_maps``: the query block / key block loop of ``cpu/flash.py``'s forward, with
  its tile sizes (``_blocks``), its band limits (``masking.key_range``,
  ``masking.tile_in_band``), its mask_mod block mask and tile class (the kernel's own
  ``_mod_block_mask`` and ``tile_class``, run as Python), and varlen's ``sequences``.
* ``cpu_register_tile``: ``microkernel.ROWS`` and ``micro_tile_width``; the cover of a score
  tile by micro-tiles is what ``microkernel.matmul``'s loop calls, recorded.
* ``cuda_rung1_ownership`` / ``cuda_rung2_ownership``: rung 1's tile sizes
  (``GPU_RESIDENT``, ``staged_rows``); rung 2's ``GPU_TILINGS`` and the ``row_of`` /
  ``col_of`` device functions taken out of ``tiled.kernel_functions``' forward kernel.
* ``ring_layouts``: ``sharding.positions`` and the pairs ``ring.Ring`` computes per
  (rank, step) (it skips those the band excludes), with ``masking.in_band`` counting the work.

matplotlib is needed (the ``plot`` extra), and numba-cuda for the rung-2 picture (it reads
the kernel's closure; no GPU).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .plots import PLOT_EXTRA, pyplot

DPI = 100
WARP = 32
WARP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _plt():
    plt = pyplot()
    if plt is None:
        raise ImportError(f"drawing the docs' pictures needs matplotlib: {PLOT_EXTRA}")
    return plt


def _save(figure, path) -> Path:
    """The figure as a PNG of at most 256 colours (a third of the bytes; flat fills and
    text lose nothing visible), through Pillow, which matplotlib itself depends on."""
    import io

    from PIL import Image

    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    _plt().close(figure)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def _as_python(dispatcher, **overrides):
    """The plain Python function behind a numba dispatcher, its globals overridden (the way
    ``cpu/flash.py``'s ``specialised`` rebinds them), so a kernel's own code runs here."""
    py = getattr(dispatcher, "py_func", dispatcher)
    return types.FunctionType(py.__code__, {**py.__globals__, **overrides}, py.__name__,
                              py.__defaults__, py.__closure__)


def _fmt(x) -> str:
    x = np.asarray(x)
    if x.ndim == 0:
        return f"{float(x):g}"
    return np.array2string(x, separator=", ", formatter={"float_kind": lambda v: f"{v:g}"})


# -- the autograd worked example ----------------------------------------------------------------


@dataclass
class GraphNode:
    name: str  # what docs/autograd.md calls it
    op: str  # the Function that made it, or "leaf"
    value: np.ndarray
    grad: np.ndarray  # .grad of a leaf; the gradient the engine passed to an interior node
    parents: list  # indices into the node list
    sent: dict  # parent index -> the array this node's Function.backward returned for it
    depth: int


def autograd_example() -> list[GraphNode]:
    """The worked example of docs/autograd.md run through the engine: the nodes in
    ``topological_order(out)`` (parents first) with values and gradients after backward.

    The engine keeps ``.grad`` on leaves only, so each interior node's Function is swapped,
    for this one backward, for a subclass whose ``backward`` records what it received and
    returned before handing it on unchanged.
    """
    import microattn as ma
    from microattn import autograd

    a = ma.tensor([[1.0], [2.0]], requires_grad=True)  # (2, 1)
    b = ma.tensor([3.0, 4.0, 5.0], requires_grad=True)  # (3,)
    ab = a * b
    out = ab.sum()
    names = {id(a): "a", id(b): "b", id(ab): "a * b", id(out): "out"}
    order = autograd.topological_order(out)
    log = {}

    def recording(node, function):
        def backward(ctx, grad):
            returned = function.backward(ctx, grad)
            log[id(node)] = (np.array(grad), returned if isinstance(returned, tuple) else (returned,))
            return returned
        return type(function.__name__, (function,), {"backward": staticmethod(backward)})

    originals = {}
    for node in order:
        if not node.is_leaf:
            originals[id(node)] = node._ctx.function
            node._ctx.function = recording(node, node._ctx.function)
    try:
        out.backward()
    finally:
        for node in order:
            if id(node) in originals:
                node._ctx.function = originals[id(node)]

    index = {id(node): k for k, node in enumerate(order)}
    nodes: list[GraphNode] = []
    for node in order:
        parents = [index[id(p)] for p in autograd._graph_parents(node)]
        depth = 1 + max(nodes[p].depth for p in parents) if parents else 0
        if node.is_leaf:
            op, grad, sent = "leaf", node.grad, {}
        else:
            op = node._ctx.function.__name__
            grad, returned = log[id(node)]
            sent = {index[id(p)]: np.asarray(g) for p, g in zip(node._ctx.parents, returned)
                    if p is not None}
        nodes.append(GraphNode(names.get(id(node), op), op, np.array(node.data), np.array(grad),
                               parents, sent, depth))
    return nodes


def autograd_graph(path) -> Path:
    """The worked example's graph, leaves left, output right: forward edges (black) and the
    gradient each Function's backward sent back along them (red), before unbroadcast."""
    plt = _plt()
    nodes = autograd_example()
    layers: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        layers.setdefault(node.depth, []).append(k)
    figure, ax = plt.subplots(figsize=(10, 4.2))
    xy, boxes = {}, {}
    for depth, members in layers.items():
        for slot, k in enumerate(members):
            xy[k] = (depth * 4.2, ((len(members) - 1) / 2 - slot) * 1.5)
    for k, node in enumerate(nodes):
        x, y = xy[k]
        kind = "received" if node.op != "leaf" else ".grad"
        text = (f"{node.name}   [{node.op}]\nvalue {_fmt(node.value).replace(chr(10), '')}\n"
                f"{kind} {_fmt(node.grad).replace(chr(10), '')}")
        boxes[k] = ax.text(x, y, text, ha="center", va="center", fontsize=8, family="monospace",
                           bbox={"boxstyle": "round,pad=0.4", "ec": "#555555",
                                     "fc": "#e8f0fb" if node.op == "leaf" else "#fdf2e2"})
    for k, node in enumerate(nodes):
        for p in node.parents:
            ax.annotate("", xy=(0, 0.65), xycoords=boxes[k], xytext=(1, 0.65), textcoords=boxes[p],
                        arrowprops={"arrowstyle": "->", "color": "black", "shrinkA": 6, "shrinkB": 6})
            ax.annotate("", xy=(1, 0.35), xycoords=boxes[p], xytext=(0, 0.35), textcoords=boxes[k],
                        arrowprops={"arrowstyle": "->", "color": "#c0392b", "linestyle": "--",
                                        "shrinkA": 6, "shrinkB": 6})
            (x0, y0), (x1, y1) = xy[p], xy[k]
            g = node.sent[p]
            below = y0 <= y1
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + (-0.3 if below else 0.3),
                    f"{node.op}.backward -> {g.shape}\n{_fmt(g).replace(chr(10), '')}",
                    ha="center", va="top" if below else "bottom", fontsize=7, color="#c0392b",
                    family="monospace")
    xs = [x for x, _ in xy.values()]
    ax.set_xlim(min(xs) - 1.6, max(xs) + 1.6)
    ys = [y for _, y in xy.values()]
    ax.set_ylim(min(ys) - 1.0, max(ys) + 0.8)
    ax.axis("off")
    ax.set_title("(a * b).sum() after out.backward(): black = forward edges (ctx.parents), "
                 "red = what backward returned\n(unbroadcast then sums it to the parent's shape; "
                 "a leaf's .grad, an interior node's received gradient)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


# -- flash tile maps ----------------------------------------------------------------------------

FULL, PARTIAL, SKIPPED = "full", "partial", "skipped"


@dataclass(frozen=True)
class Tile:
    i0: int
    i1: int
    j0: int
    j1: int
    kind: str  # FULL: no per-element test; PARTIAL: band or mask_mod tested per pair; SKIPPED


def _mod_block_mask(spec):
    """The kernel's block mask (``cpu/flash.py``'s ``_mod_block_mask``, run as Python with the
    user's mask_mod bound, as ``specialised`` binds it for the compiled kernel)."""
    from microattn.kernels.cpu import flash

    nr, nc = -(-spec.Nq // flash.MOD_CHUNK), -(-spec.Nk // flash.MOD_CHUNK)
    bmask = np.empty((spec.B, spec.Hq, nr, nc), dtype=np.int8)
    fill = _as_python(flash._mod_block_mask, user_mask_mod=spec.mask_mod, prange=range)
    fill(spec.Nq, spec.Nk, spec.pack().dropout, bmask)
    return bmask


def visited_tiles(spec, blocks=None, b: int = 0, h: int = 0) -> list[Tile]:
    """The tiles ``cpu/flash.py``'s ``_flash_forward`` visits for query head h of batch row b:
    its loop over query blocks and, per block, key blocks from ``key_range``, classed as the
    kernel classes them (``tile_class`` of the mask_mod block mask, then ``tile_in_band``).
    A spec with ``cu_seqlens`` runs one such call per sequence (``varlen.sequences``), placed
    at the sequence's rows and columns."""
    from microattn.kernels import masking, varlen
    from microattn.kernels.cpu import flash

    if spec.cu_seqlens_q is not None:
        tiles = []
        for rows, cols, sub in varlen.sequences(spec):
            if sub.Nk:
                tiles += [replace(t, i0=t.i0 + rows.start, i1=t.i1 + rows.start,
                                  j0=t.j0 + cols.start, j1=t.j1 + cols.start)
                          for t in visited_tiles(sub, blocks, b, h)]
        return tiles
    block_m, block_n = flash._blocks(blocks, spec)
    if spec.mask_mod is not None:
        bmask = _mod_block_mask(spec)
        tile_class = _as_python(flash.tile_class, HAS_MASK_MOD=True)
    else:
        bmask, tile_class = None, _as_python(flash.tile_class)
    band = spec.band
    tiles = []
    for i0 in range(0, spec.Nq, block_m):  # one task per query block, as in _flash_forward
        i1 = min(i0 + block_m, spec.Nq)
        j_start, j_stop = masking.key_range(band, i0, i1, spec.Nk)
        for j0 in range(j_start, j_stop, block_n):
            j1 = min(j0 + block_n, j_stop)
            cls = tile_class(bmask, b, h, i0, i1, j0, j1)
            if cls == 0:
                kind = SKIPPED
            elif cls == 2 and masking.tile_in_band(band, i0, i1 - i0, j0, j1 - j0):
                kind = FULL
            else:
                kind = PARTIAL
            tiles.append(Tile(i0, i1, j0, j1, kind))
    return tiles


def allowed_map(spec) -> np.ndarray:
    """(Nq, Nk) bool: what the reference allows for batch row 0, head 0 (the background of
    the tile maps; the tests' oracle): ``reference.allowed_pairs``, per sequence with
    cu_seqlens."""
    from microattn.kernels import reference, varlen

    if spec.cu_seqlens_q is None:
        return np.broadcast_to(reference.allowed_pairs(spec), (1, 1, spec.Nq, spec.Nk))[0, 0]
    allowed = np.zeros((spec.Nq, spec.Nk), dtype=bool)
    for rows, cols, sub in varlen.sequences(spec):
        allowed[rows, cols] = allowed_map(sub)
    return allowed


PREFIX = 128  # the prefix-LM example's prefix length


def prefix_lm(b, h, i, j):
    """A mask_mod: every query sees the first PREFIX keys, and causally after them."""
    return (j < PREFIX) | (j <= i)


def tile_map_specs(n: int = 512) -> dict:
    """The five cases drawn: name -> spec (B = H = 1, D = 64, float32, Nq = Nk = n)."""
    from microattn.kernels.spec import make_attention_spec

    shapes = ((1, 1, n, 64),) * 3, (np.float32,) * 3

    def spec(**kw):
        return make_attention_spec(*shapes[0], shapes[1], **kw)

    cu = np.array([0, 150, 400, n], dtype=np.int64)
    return {
        "full": spec(),
        "causal": spec(is_causal=True),
        "window (100, 0)": spec(window=(100, 0)),
        "varlen [150, 250, 112]": spec(cu_seqlens_q=cu, cu_seqlens_k=cu),
        f"mask_mod prefix-LM ({PREFIX})": spec(mask_mod=prefix_lm),
    }


TILE_COLOURS = {FULL: "#2e86c1", PARTIAL: "#f5b041", SKIPPED: "#cccccc"}


def flash_tile_maps(path) -> Path:
    """For each case, the (query, key) plane: allowed pairs shaded, and the tiles the CPU
    flash forward visits drawn over it (blue: whole tile allowed, no per-pair test; orange:
    tested per pair; grey hatched: mask_mod's block mask skips it). Unvisited: never touched."""
    plt = _plt()
    from matplotlib.patches import Patch, Rectangle

    from microattn.kernels.cpu import flash

    specs = tile_map_specs()
    figure, axes = plt.subplots(1, len(specs), figsize=(3.2 * len(specs), 3.9))
    for ax, (name, spec) in zip(axes, specs.items()):
        ax.imshow(allowed_map(spec), cmap="Greys", vmin=0, vmax=4, interpolation="nearest",
                  extent=(0, spec.Nk, spec.Nq, 0))
        tiles = visited_tiles(spec)
        for t in tiles:
            ax.add_patch(Rectangle((t.j0, t.i0), t.j1 - t.j0, t.i1 - t.i0, lw=1.0,
                                   ec="black", fc=TILE_COLOURS[t.kind], alpha=0.55,
                                   hatch="//" if t.kind == SKIPPED else None))
        counts = {kind: sum(t.kind == kind for t in tiles) for kind in TILE_COLOURS}
        visited = sum((t.i1 - t.i0) * (t.j1 - t.j0) for t in tiles if t.kind != SKIPPED)
        ax.set_title(f"{name}\n{counts[FULL]} full, {counts[PARTIAL]} partial, "
                     f"{counts[SKIPPED]} skipped\n{visited / (spec.Nq * spec.Nk):.0%} of the plane "
                     "computed", fontsize=8)
        ax.set_xlim(0, spec.Nk)
        ax.set_ylim(spec.Nq, 0)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
    block_m, block_n = flash._blocks(None, next(iter(specs.values())))
    figure.legend(handles=[Patch(fc=TILE_COLOURS[FULL], alpha=0.55, ec="black", label="visited, whole tile allowed"),
                           Patch(fc=TILE_COLOURS[PARTIAL], alpha=0.55, ec="black", label="visited, masked per pair"),
                           Patch(fc=TILE_COLOURS[SKIPPED], alpha=0.55, ec="black", hatch="//",
                                 label="skipped by the block mask"),
                           Patch(fc="#bbbbbb", label="allowed pairs (reference)")],
                  loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"Tiles the numba CPU flash forward visits, N = {specs['full'].Nq}: "
                    f"{block_m} queries x {block_n} keys per tile (flash._blocks), key blocks from "
                    "key_range", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(figure, path)


# -- the CPU micro-kernel -----------------------------------------------------------------------


def micro_tile_calls(M: int, N: int, dtype=np.float32) -> tuple[list, list]:
    """What ``microkernel.matmul`` does on a C of (M, N): its own loop run as Python with the
    micro-tiles replaced by recorders. Returns ([(i, j, rows, width)], [(i, j)] of
    plain-loop entries); width is ``micro_tile_width``, or half of it for the AVX2-width
    panel that AVX-512 leaves over."""
    from microattn.kernels.cpu import microkernel

    calls, plain = [], []

    def recorder(rows, vector_bytes):
        width = microkernel.micro_tile_width(dtype, vector_bytes)

        def micro_tile(A, B, C, i, j, accumulate):
            calls.append((i, j, rows, width))
        return micro_tile

    class Recorded(np.ndarray):  # C: records the entries the plain loop writes
        def __setitem__(self, index, value):
            plain.append(index)

    K = 1
    A, B = np.zeros((M, K), dtype), np.zeros((K, N), dtype)
    C = np.zeros((M, N), dtype).view(Recorded)
    recorders = {f"_micro_tile_{r}": recorder(r, microkernel.VECTOR_BYTES) for r in (6, 4, 2, 1)}
    recorders.update({f"_half_tile_{r}": recorder(r, microkernel.HALF_BYTES) for r in (6, 4, 2, 1)})
    run = _as_python(microkernel.matmul, **recorders)
    run(A, B, C, False)
    return calls, plain


def cpu_register_tile(path) -> Path:
    """Left: one K step of one micro-tile (ROWS x width of C in registers). Right: how
    ``matmul`` covers the forward's score tile sT = k_blk @ qsT, a full one and an edge one."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    from microattn.kernels.cpu import flash, microkernel
    from microattn.kernels.spec import make_attention_spec

    rows, width = microkernel.ROWS, microkernel.micro_tile_width(np.float32)
    lanes = microkernel.VECTOR_BYTES // np.dtype(np.float32).itemsize
    vectors = width // lanes
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.5, 1, 1]})

    ax = axes[0]  # one step kk of the K loop: A column (rows values), B row (width values)
    K_show = 5
    for r in range(rows):
        for kk in range(K_show):
            ax.add_patch(Rectangle((kk, -r - 1), 1, 1, fc="#f9e79f" if kk == 2 else "white", ec="grey"))
    for v in range(vectors):
        for lane in range(lanes):
            c = v * lanes + lane
            ax.add_patch(Rectangle((K_show + 1 + c, 1 + K_show - 3), 1, 1,
                                   fc=("#aed6f1", "#a9dfbf")[v % 2], ec="grey"))
    for r in range(rows):
        for v in range(vectors):
            ax.add_patch(Rectangle((K_show + 1 + v * lanes, -r - 1), lanes, 1,
                                   fc=("#d6eaf8", "#d5f5e3")[v % 2], ec="black"))
            ax.text(K_show + 1 + v * lanes + lanes / 2, -r - 0.5, f"acc[{r}][{v}]", ha="center",
                    va="center", fontsize=7)
    for kk in range(K_show):
        for c in range(width):
            if kk != 2:
                ax.add_patch(Rectangle((K_show + 1 + c, 1 + kk), 1, 1, fc="white", ec="#dddddd"))
    ax.text(K_show / 2, 0.4, "A: 6 rows, column kk\n(broadcast, 1 register)", ha="center", fontsize=8)
    ax.text(K_show + 1 + width / 2, 1 + K_show + 0.3, f"B: row kk, {vectors} vectors x {lanes} lanes",
            ha="center", fontsize=8)
    ax.text(K_show + 1 + width / 2, -rows - 1.2,
            f"C micro-tile: {rows} x {width} float32 = {rows * vectors} accumulator registers;\n"
            f"per kk: {vectors} loads of B, {rows} broadcasts of A, {rows * vectors} FMAs;\n"
            f"{rows * vectors} + {vectors} + 1 = {rows * vectors + vectors + 1} of "
            + ("AVX-512's 32 vector registers" if microkernel.VECTOR_BYTES == 64 else "AVX2's 16 vector registers"),
            ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.5, K_show + 2 + width)
    ax.set_ylim(-rows - 4.2, K_show + 2.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"one step kk of the K loop of a {rows} x {width} micro-tile of C = A @ B\n"
                 f"(microkernel.ROWS = {rows}, micro_tile_width(float32) = {width})", fontsize=9)

    colours = {6: "#5dade2", 4: "#58d68d", 2: "#f5b041", 1: "#ec7063"}
    short = make_attention_spec((1, 1, 512, 64), (1, 1, 512, 64), (1, 1, 512, 64), (np.float32,) * 3)
    block_m, block_n = flash._blocks(None, short)
    edge_n = 500  # an edge tile: N = 500 leaves a last block of N - 384 keys, N - 448 queries
    cases = [(block_n, block_m, f"a full score tile sT (N <= {flash.SHORT})"),
             (edge_n % block_n, edge_n % block_m, f"the last (edge) tile at N = {edge_n}")]
    for ax, (M, N, title) in zip(axes[1:], cases):
        calls, plain = micro_tile_calls(M, N)
        for i, j, r, w in calls:
            ax.add_patch(Rectangle((j, i), w, r, fc=colours[r], ec="black", lw=0.4, hatch="" if w == width else ".."))
        for i, j in plain:
            ax.add_patch(Rectangle((j, i), 1, 1, fc="#aaaaaa", ec="none"))
        ax.set_xlim(0, N)
        ax.set_ylim(M, 0)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{N} queries (bm, columns of C)", fontsize=8)
        ax.set_ylabel(f"{M} keys (bn, rows of C)", fontsize=8)
        ax.tick_params(labelsize=7)
        by_rows = {r: sum(c[2] == r for c in calls) for r in colours}
        ax.set_title(f"{title}: {M} x {N}\n" + ", ".join(f"{n} x {r}-row" for r, n in by_rows.items() if n)
                     + (f", {len(plain)} plain-loop entries" if plain else ""), fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, fc=c, ec="black", label=f"{r}-row micro-tile") for r, c in colours.items()]
    if microkernel.HALF_TILES:
        handles.append(Rectangle((0, 0), 1, 1, fc="white", ec="black", hatch="..",
                                 label=f"{width // 2} wide: AVX2-width panel left over"))
    handles.append(Rectangle((0, 0), 1, 1, fc="#aaaaaa", label="left-over columns (plain loop)"))
    axes[2].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    figure.tight_layout()
    return _save(figure, path)


# -- CUDA thread ownership ----------------------------------------------------------------------


def rung1_tiles(dtype=np.float32, D: int = 64, Dv: int = 64):
    """Rung 1's tiles on a GPU (what ``flash.tile_config`` gives outside the simulator)."""
    from microattn.kernels.cuda import flash

    return flash.Tiles(flash.GPU_RESIDENT, flash.staged_rows(np.dtype(dtype).itemsize, D, Dv))


def rung1_owner(tiles) -> np.ndarray:
    """(resident, staged) thread index owning each score of a forward tile: thread t owns
    query row ``i = i_start + t`` (``_attn_fwd``: ``i = i_start + t``) and all of its keys."""
    return np.repeat(np.arange(tiles.resident)[:, None], tiles.staged, axis=1)


def rung2_owner(tiling) -> np.ndarray:
    """(rows, cols) thread index owning each score of a rung-2 forward tile, from the
    forward kernel's own ``row_of`` / ``col_of`` and its ``ty, tx = t // TX, t % TX``
    (taken out of ``tiled.kernel_functions``; compiles nothing, needs no GPU)."""
    from microattn.kernels.cuda import tiled

    if tiled.cuda is None:
        raise ImportError("the rung-2 picture reads tiled.py's kernel functions: it needs numba-cuda "
                          "(pip install 'microattn[cuda]'; no GPU needed)")
    fwd = tiled.kernel_functions("float32", 64, 64, tiling)["_attn_fwd"]
    closure = {name: cell.cell_contents for name, cell in zip(fwd.__code__.co_freevars, fwd.__closure__)}
    row_of, col_of = (getattr(closure[n], "py_func", closure[n]) for n in ("row_of", "col_of"))
    RT, CT, TX = closure["RT"], closure["CT"], closure["TX"]
    owner = np.full((tiling.rows, tiling.cols), -1)
    for t in range(tiling.threads):
        ty, tx = t // TX, t % TX
        for r in range(RT):
            for c in range(CT):
                owner[row_of(r, ty), col_of(c, tx)] = t
    return owner


def _draw_owner(ax, owner, lanes_per_row=1, label_every=1, fontsize=5):
    """Colour by warp (t // 32), shades alternating between neighbouring threads (a checkerboard
    of ``(t // lanes_per_row + t % lanes_per_row) % 2``); label each thread's first entry."""
    from matplotlib.colors import to_rgb

    palette = np.array([to_rgb(c) for c in WARP_COLOURS])
    tint = 0.55 + 0.45 * palette[(owner // WARP) % len(palette)]  # the warp's colour, light
    dark = (owner // lanes_per_row + owner % lanes_per_row) % 2  # every other thread darker
    ax.imshow(tint * (1 - 0.12 * dark[..., None]), interpolation="nearest")
    seen = set()
    for (i, j), t in np.ndenumerate(owner):
        if t not in seen:
            seen.add(t)
            if t % label_every == 0:
                ax.text(j - 0.2, i, f"t{t}", fontsize=fontsize, ha="left", va="center")


def cuda_rung1_ownership(path) -> Path:
    """Rung 1's forward tile: one query row per thread, keys staged in shared memory."""
    plt = _plt()
    tiles = rung1_tiles()
    owner = rung1_owner(tiles)
    figure, ax = plt.subplots(figsize=(6.2, 6.2))
    _draw_owner(ax, owner, label_every=4, fontsize=6)
    ax.set_xlabel(f"staged keys j0 .. j0+{tiles.staged - 1} (shared memory, every thread reads the same row)",
                  fontsize=8)
    ax.set_ylabel(f"resident queries i0 .. i0+{tiles.resident - 1}: thread t owns row i0 + t", fontsize=8)
    ax.set_title(f"Rung 1 forward (float32, D = Dv = 64): {tiles.resident} threads = "
                 f"{tiles.resident // WARP} warps, {tiles.resident} x {tiles.staged} scores per tile;\n"
                 "colour = warp; the row's q, acc, m_i, l_i and its BLOCK_N scores s_row are the thread's own (local arrays)",
                 fontsize=9)
    ax.tick_params(labelsize=7)
    figure.tight_layout()
    return _save(figure, path)


def cuda_rung2_ownership(path) -> Path:
    """Rung 2's forward tile on the two float32 GPU tilings: 4 x 4 register tiles per thread."""
    plt = _plt()
    from microattn.kernels.cuda import tiled

    cases = [(tiled.GPU_TILINGS[("float32", False)].main, "D <= 64"),
             (tiled.GPU_TILINGS[("float32", True)].main, "D = 128")]
    figure, axes = plt.subplots(2, 1, figsize=(9, 10), gridspec_kw={"height_ratios": [1, 0.45]})
    for ax, (tiling, when) in zip(axes, cases):
        owner = rung2_owner(tiling)
        _draw_owner(ax, owner, lanes_per_row=tiling.threads_cols, fontsize=4.5)
        rt, ct = tiling.rows // tiling.threads_rows, tiling.cols // tiling.threads_cols
        ax.set_title(f"float32, {when}: Tiling(rows={tiling.rows}, cols={tiling.cols}, "
                     f"threads {tiling.threads_rows} x {tiling.threads_cols})\n{tiling.threads} threads = "
                     f"{tiling.threads // WARP} warps (colour), {rt} x {ct} scores per thread; "
                     f"{tiling.threads_cols} lanes share a row", fontsize=9)
        ax.set_xlabel(f"keys j0 .. j0+{tiling.cols - 1}", fontsize=8)
        ax.set_ylabel(f"queries i0 .. i0+{tiling.rows - 1}", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle("Rung 2 forward: who owns which scores of S (row_of / col_of of tiled.py)",
                    fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


# -- ring and zigzag ------------------------------------------------------------------------------


def ring_work(n: int, size: int, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For causal ring attention over n rows and ``size`` ranks: (owner (n,) rank holding each
    row, work (size ranks, size steps) allowed pairs computed, step (n, n) the step at which
    each allowed pair is computed, -1 where none is). The pairs are those ``ring.Ring``
    computes at each step (``Ring.pairs``; excluded pairs are skipped), counted with
    ``masking.in_band`` over each pair's own spec."""
    from microattn.distributed import ring, sharding
    from microattn.kernels import masking
    from microattn.kernels.spec import make_attention_spec

    shape = (1, 1, n, 8)
    whole = make_attention_spec(shape, shape, shape, (np.float32,) * 3, is_causal=True)
    owner = np.empty(n, dtype=int)
    for r in range(size):
        owner[sharding.positions(n, size, r, layout)] = r
    work = np.zeros((size, size), dtype=int)
    step = np.full((n, n), -1)
    for r in range(size):
        comm = types.SimpleNamespace(size=size, rank=r)
        rg = ring.Ring(comm, layout, n // size, whole, None, (1, 1, 1, 8, 8))
        mine = sharding.positions(n, size, r, layout)
        for t in range(size):
            src = (r - t) % size
            theirs = sharding.positions(n, size, src, layout)
            for rows, cols, spec in rg.pairs(src):
                i = np.arange(spec.Nq)[:, None]
                j = np.arange(spec.Nk)[None, :]
                allowed = masking.in_band(spec.band, i, j)
                work[r, t] += int(allowed.sum())
                qi, kj = mine[rows][:, None], theirs[cols][None, :]
                step[np.broadcast_to(qi, allowed.shape)[allowed],
                     np.broadcast_to(kj, allowed.shape)[allowed]] = t
    return owner, work, step


def ring_layouts(path, n: int = 32, size: int = 4) -> Path:
    """Contiguous vs zigzag under a causal mask: which rank owns which query rows, the step
    of the ring at which each pair is computed, and the work per (rank, step)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    from microattn.distributed import sharding

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    figure, axes = plt.subplots(2, 2, figsize=(10, 9.5), gridspec_kw={"width_ratios": [1.25, 1]})
    for row, layout in enumerate(("contiguous", "zigzag")):
        owner, work, step = ring_work(n, size, layout)
        ax = axes[row, 0]
        rank_of_pair = np.where(step >= 0, owner[:, None], -1).astype(float)
        rank_of_pair[step < 0] = np.nan
        ax.imshow(rank_of_pair, cmap=ListedColormap(colours[:size]), vmin=-0.5, vmax=size - 0.5,
                  interpolation="nearest", alpha=0.6)
        c = n // sharding.check_length(n, size, layout)  # rows per chunk of the layout
        for a in range(0, n, c):  # one label per (query chunk, key chunk) block computed
            for b in range(0, n, c):
                rows, cols = np.nonzero(step[a:a + c, b:b + c] >= 0)
                if len(rows):
                    ax.text(b + cols.mean(), a + rows.mean(), f"t{step[a + rows[0], b + cols[0]]}",
                            ha="center", va="center", fontsize=8)
        for x in range(c, n, c):
            ax.axhline(x - 0.5, color="white", lw=0.8)
            ax.axvline(x - 0.5, color="white", lw=0.8)
        for r in range(size):  # the rank's rows, marked on the left
            for i in np.flatnonzero(owner == r):
                ax.add_patch(plt.Rectangle((-2.6, i - 0.5), 1.6, 1, color=colours[r], clip_on=False))
        ax.set_xlim(-2.8, n - 0.5)
        ax.set_title(f"{layout}: rank holding query row i (colour);\n"
                     "tN: the ring step at which that block of pairs is computed", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
        ax = axes[row, 1]
        ax.imshow(work, cmap="Oranges", vmin=0, vmax=2 * work.max())
        for (r, t), w in np.ndenumerate(work):
            ax.text(t, r, str(w), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(size), [f"step {t}" for t in range(size)], fontsize=8)
        ax.set_yticks(range(size), [f"rank {r}\n(sum {work[r].sum()})" for r in range(size)], fontsize=8)
        slowest = work.max(axis=0)
        ax.set_title(f"{layout}: pairs computed per (rank, step)\na step lasts as long as its busiest "
                     f"rank: {' + '.join(map(str, slowest))} = {slowest.sum()}", fontsize=9)
    figure.suptitle(f"Causal ring attention, N = {n} rows over P = {size} ranks "
                    "(sharding.positions, ring.Ring.pairs)", fontsize=11)
    figure.tight_layout()
    return _save(figure, path)


# -- all of them ----------------------------------------------------------------------------------

PICTURES = {
    "autograd_graph.png": autograd_graph,
    "flash_tile_maps.png": flash_tile_maps,
    "cpu_register_tile.png": cpu_register_tile,
    "cuda_rung1_ownership.png": cuda_rung1_ownership,
    "cuda_rung2_ownership.png": cuda_rung2_ownership,
    "ring_layouts.png": ring_layouts,
}
# Pictures of measurements, not of code: written by the commands that measure
# (docs/complexity.md says how), so build_all does not redraw them.
MEASURED = {
    "complexity.png": "microattn complexity --out docs/pictures/complexity.png",
    "niah-exact.png": "microattn niah --train /tmp/niah-models --out-dir docs/pictures",
    "niah-gqa.png": "microattn niah --train /tmp/niah-models --out-dir docs/pictures",
    "niah-linear.png": "microattn niah --train /tmp/niah-models --out-dir docs/pictures",
    "niah-window.png": "microattn niah --train /tmp/niah-models --out-dir docs/pictures",
}


def build_all(out_dir) -> list[Path]:
    """Every picture, written into ``out_dir`` (created if missing); their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw(out_dir / name) for name, draw in PICTURES.items()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else "docs/pictures"
    for path in build_all(out_dir):
        print(f"{path}  {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
