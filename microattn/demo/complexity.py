"""``microattn complexity``: the cost of each attention variant, measured on this machine.

For full attention (the NumPy reference, which materialises the (N, N) scores), flash
attention (the numba kernel), grouped-query attention (the same kernel with one key/value
head for four query heads), a causal sliding window of ``w`` keys (the numba kernel's
band-skipping path) and causal linear attention (the numba chunked kernel), at N = 512,
1024, 2048, ...: the time and the peak memory of a forward pass and of a forward plus
backward pass, and the exponent ``a`` of ``cost ~ N^a`` fitted to the largest sizes, printed
beside the textbook column (``CLAIMS``).

What is measured, exactly:

* **time**: CPU seconds of this process (``time.process_time``), the fastest of
  ``repeats`` calls (at least 3, more while a call is short), after a warm-up call at a tiny
  size that compiles the numba kernels (compilation is excluded and reported apart) and one
  untimed call at the size itself (first touch of its pages). numba runs on **one thread**
  and BLAS too (``numba.set_num_threads(1)``, ``blas.single_threaded``): the exponent is
  that of the work, not of how well small and large problems spread over the cores. On one
  thread CPU time is the wall time of an idle machine; on a busy one it leaves out the time
  spent waiting for a core, which wall time would add at random (a shared 2-core VM: one
  wall-clock point 20x off its neighbours, an exponent off by 0.3). The fastest call, not
  the median: other jobs only ever add (to CPU time too, through the shared caches and
  memory bus: a median of 3 put full attention's exponent at 2.39 once), so the fastest
  is the best estimate of what the call itself costs.
* **memory**: the peak of ``tracemalloc`` over the call, q, k, v and dout made beforehand
  (so not counted), the outputs counted. tracemalloc sees NumPy's allocations and, with
  this numba (checked at run time by :func:`numba_allocations_traced`), the arrays numba
  kernels allocate inside compiled code too (the flash kernels' transposed copies of K and
  V, their per-task tile buffers). Not seen: OpenBLAS's own scratch and thread stacks,
  both of fixed size.
* **the fit**: least squares of ``log cost`` on ``log N`` over the last ``FIT_POINTS``
  sizes (small sizes are dominated by per-call overhead, so they are shown, not fitted).

Shapes: float32, B=1, Hq=4 (GQA: Hkv=1), D=Dv=32. Masks (``MASKS``): full, flash and GQA
unmasked, every query seeing every key, the textbook N^2 (a causal mask halves the work
but adds the O(N) diagonal tiles, which bend flash's exponent at these sizes to ~1.8);
the window causal, each query seeing itself and the w - 1 = 127 keys before it; linear
attention causal (the prefix-state scan a language model runs).
"""

from __future__ import annotations

import contextlib
import math
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from ..kernels import blas, reference
from ..kernels.spec import make_attention_spec, make_linear_spec

FIT_POINTS = 3  # the exponent is fitted over this many of the largest sizes
TOLERANCE = 0.25  # a fitted exponent "agrees" with the claim within this
SHAPE = {"B": 1, "H": 4, "D": 32}  # batch, query heads, head dimension
GQA_KV_HEADS = 1  # key/value heads of the gqa variant (4 query heads share each)
WINDOW = 128  # keys each query sees in the window variant (itself and the 127 before)
MASKS = f"full, flash, gqa: no mask; window: causal band of w={WINDOW}; linear: causal"
START = 512  # the first N; every next one doubles
MAX_N = 16384  # no N beyond this by default (32x the first: range enough for every fit)
BUDGET = 120.0  # seconds of measuring by default (compilation excluded)
QUICK = {"budget": 20.0, "max_n": 8192, "min_time": 0.05}
MIN_TIME = 0.2  # seconds of timed calls per size, at least (small N: more repeats)
MIN_REPEATS, MAX_REPEATS = 3, 25


@dataclass(frozen=True)
class Claim:
    """The textbook costs of one variant: the column printed beside the measurement."""

    time: str
    memory: str
    time_exponent: int
    memory_exponent: int
    why: str


CLAIMS = {
    "full": Claim("O(n^2)", "O(n^2)", 2, 2, "the reference materialises the (N, N) scores and probabilities"),
    "flash": Claim("O(n^2)", "O(n)", 2, 1, "every score is computed, none is stored: tiles, running max and sum"),
    "gqa": Claim("O(n^2)", "O(n)", 2, 1, "flash with 1 key/value head for 4 query heads: a 4x smaller KV cache"),
    "window": Claim("O(n*w)", "O(n)", 1, 1, f"flash skipping the tiles outside a band of w={WINDOW} keys"),
    "linear": Claim("O(n)", "O(n)", 1, 1, "a running (D, Dv) state per head instead of scores"),
}
VARIANT_NAMES = list(CLAIMS)  # the table's order
# The window's cost is O(N * w) only once N >> w: at N = 4 w the band still holds nearly
# half of the causal triangle's pairs. It always runs up to 32 w (while max_n allows).
MIN_TOP = {"window": 32 * WINDOW}


# ----------------------------------------------------------------------------- the variants


def _flash():
    from ..kernels.cpu import flash

    return flash


def _linear():
    from ..kernels.cpu import linear

    return linear


class Variant:
    """One variant's inputs and calls at a given N: ``forward()`` then ``backward()``."""

    def __init__(self, name: str, n: int, rng: np.random.Generator):
        if name not in CLAIMS:
            raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(CLAIMS)}")
        B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
        Hkv = GQA_KV_HEADS if name == "gqa" else H
        self.name = name
        self.q = rng.standard_normal((B, H, n, D), dtype=np.float32)
        self.k = rng.standard_normal((B, Hkv, n, D), dtype=np.float32)
        self.v = rng.standard_normal((B, Hkv, n, D), dtype=np.float32)
        self.dout = rng.standard_normal((B, H, n, D), dtype=np.float32)
        dtypes = [np.dtype(np.float32)] * 3
        shapes = (self.q.shape, self.k.shape, self.v.shape)
        if name == "linear":
            self.kernel, self.spec = _linear(), make_linear_spec(*shapes, dtypes, causal=True)
        else:
            window = (WINDOW - 1, 0) if name == "window" else None  # a causal band
            self.kernel = reference if name == "full" else _flash()
            self.spec = make_attention_spec(*shapes, dtypes, is_causal=name == "window", window=window)
        self.saved = None

    def forward(self):
        if self.name == "linear":
            self.saved = (self.kernel.forward(self.q, self.k, self.v, self.spec),)
        else:
            self.saved = self.kernel.forward(self.q, self.k, self.v, self.spec)  # (out, stats)

    def backward(self):
        return self.kernel.backward(self.q, self.k, self.v, *self.saved, self.dout, self.spec)


def kv_cache_bytes(n: int, kv_heads: int, itemsize: int = 4) -> int:
    """Bytes of one layer's K and V for ``n`` tokens: 2 * B * Hkv * N * D * itemsize."""
    return 2 * SHAPE["B"] * kv_heads * n * SHAPE["D"] * itemsize


# ----------------------------------------------------------------------------- measuring


@dataclass
class Point:
    n: int
    fwd_s: float  # CPU seconds of a forward pass, the fastest of `repeats`
    fwdbwd_s: float  # ... of forward + backward
    fwd_bytes: int  # tracemalloc peak of a forward pass
    fwdbwd_bytes: int  # ... of forward + backward (the forward's outputs held through it)
    repeats: int
    cost_s: float  # wall time spent measuring this point


@dataclass
class Series:
    name: str
    points: list = field(default_factory=list)
    compile_s: float = 0.0

    @property
    def claim(self) -> Claim:
        return CLAIMS[self.name]

    def column(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        return np.array([p.n for p in self.points]), np.array([getattr(p, what) for p in self.points], dtype=float)

    def exponent(self, what: str) -> float:
        return fit_exponent(*self.column(what))


def fit_exponent(ns, values, points: int = FIT_POINTS) -> float:
    """The slope ``a`` of the least-squares line ``log value = a log n + c`` through the last
    ``points`` of (ns, values); NaN with fewer than two."""
    ns, values = np.asarray(ns, dtype=float)[-points:], np.asarray(values, dtype=float)[-points:]
    if len(ns) < 2:
        return math.nan
    x, y = np.log(ns), np.log(values)
    x = x - x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def traced_peak(calls) -> list[int]:
    """Run ``calls`` in order under tracemalloc; the peak bytes reached by the end of each
    (cumulative: what earlier calls still hold counts for later ones)."""
    peaks = []
    tracemalloc.start()
    try:
        for call in calls:
            call()
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return peaks


def measure_point(variant: Variant, min_time: float = MIN_TIME) -> Point:
    """Time and peak memory of one variant at one size (see the module's docstring)."""
    started = time.perf_counter()
    fwd_bytes, fwdbwd_bytes = traced_peak([variant.forward, variant.backward])  # also the warm call
    variant.saved = None
    fwd, both = [], []
    while len(fwd) < MAX_REPEATS and (len(fwd) < MIN_REPEATS or sum(both) < min_time):
        t0 = time.process_time()
        variant.forward()
        t1 = time.process_time()
        variant.backward()
        t2 = time.process_time()
        variant.saved = None
        fwd.append(t1 - t0)
        both.append(t2 - t0)
    return Point(variant.q.shape[2], min(fwd), min(both), fwd_bytes, fwdbwd_bytes,
                 len(fwd), time.perf_counter() - started)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def one_thread():
    """numba and BLAS on one thread for the duration; numba's count restored after."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with blas.single_threaded():
            yield
    finally:
        numba.set_num_threads(before)


def numba_allocations_traced() -> bool:
    """Whether tracemalloc sees an array allocated inside numba-compiled code (it does when
    numba's runtime allocates through Python's raw allocator, as numba 0.68 does)."""
    from ..kernels.cpu import flash

    x = np.zeros((1, 1, 1 << 16, 2), dtype=np.float32)  # 512 KiB
    flash._transposed(np.zeros((1, 1, 8, 2), dtype=np.float32))  # compile (cached) outside the trace
    (peak,) = traced_peak([lambda: flash._transposed(x)])
    return peak >= x.nbytes


def measure(budget: float, *, start: int = START, max_n: int = MAX_N, min_time: float = MIN_TIME,
            variants=None, progress=None) -> list[Series]:
    """Measure every variant at N = start, 2 start, ... (see the module's docstring).

    First every variant takes the sizes its fit needs, whatever they cost: ``FIT_POINTS``
    sizes, and those up to ``MIN_TOP``. Then, while ``budget`` seconds (wall time,
    compilation excluded) last, the variant whose next size is projected to cost least
    takes it, if that cost fits in what is left: cheap variants go far, the reference as
    far as the budget allows. A projection is the last size's cost times the growth of the
    last doubling (at least 2x, at most 8x; 4x after one size). Never past ``max_n``, nor
    where the projected memory would pass a quarter of what is free.
    ``progress(series, point)`` is called after each point. Returns the series in the
    table's order.
    """
    names = [name for name in VARIANT_NAMES if variants is None or name in variants]
    if not names:
        raise ValueError("no variants to measure")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number of seconds, got {budget}")
    if start < 16 or max_n < start:
        raise ValueError(f"sizes must satisfy 16 <= start <= max_n, got start={start}, max_n={max_n}")
    rng = np.random.default_rng(0)
    free = available_memory()
    results = {name: Series(name) for name in names}

    def next_n(series):
        return 2 * series.points[-1].n if series.points else start

    def growth(series, what):
        points = series.points
        if len(points) < 2:
            return 4.0
        return min(8.0, max(2.0, getattr(points[-1], what) / getattr(points[-2], what)))

    def projected_seconds(series):
        return series.points[-1].cost_s * growth(series, "cost_s") if series.points else 0.0

    def can_grow(series):
        if next_n(series) > max_n:
            return False
        return free is None or not series.points or (
            series.points[-1].fwdbwd_bytes * growth(series, "fwdbwd_bytes") <= free / 4)

    def take(series):
        point = measure_point(Variant(series.name, next_n(series), rng), min_time)
        series.points.append(point)
        if progress is not None:
            progress(series, point)

    with one_thread():
        for series in results.values():  # compile before the clock starts
            started = time.perf_counter()
            warm = Variant(series.name, 64, rng)
            warm.forward()
            warm.backward()
            series.compile_s = time.perf_counter() - started
        deadline = time.perf_counter() + budget
        for series in results.values():
            while can_grow(series) and (len(series.points) < FIT_POINTS
                                        or next_n(series) <= MIN_TOP.get(series.name, 0)):
                take(series)
        while True:
            left = deadline - time.perf_counter()
            affordable = [s for s in results.values() if can_grow(s) and projected_seconds(s) <= left]
            if not affordable:
                break
            take(min(affordable, key=projected_seconds))
    return list(results.values())


# ----------------------------------------------------------------------------- the report


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _verdict(fitted: float, claimed: int) -> str:
    if math.isnan(fitted):
        return "(too few sizes)"
    return "ok" if abs(fitted - claimed) <= TOLERANCE else f"OFF by {fitted - claimed:+.2f}"


def _table(header, rows, right_from: int) -> list[str]:
    widths = [max(len(str(cells[i])) for cells in [header, *rows]) for i in range(len(header))]

    def render(cells):
        return "  ".join(str(c).rjust(w) if i >= right_from else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [render(header), "  ".join("-" * w for w in widths), *(render(cells) for cells in rows)]


def exponent_checks(results: list[Series]) -> list[tuple[str, str, float, int]]:
    """(variant, "time fwd" / "memory fwd+bwd" / ..., fitted, claimed) for every fit."""
    checks = []
    for series in results:
        claim = series.claim
        for label, what, claimed in (("time fwd", "fwd_s", claim.time_exponent),
                                     ("time fwd+bwd", "fwdbwd_s", claim.time_exponent),
                                     ("memory fwd", "fwd_bytes", claim.memory_exponent),
                                     ("memory fwd+bwd", "fwdbwd_bytes", claim.memory_exponent)):
            checks.append((series.name, label, series.exponent(what), claimed))
    return checks


def format_report(results: list[Series]) -> str:
    ns = sorted({p.n for s in results for p in s.points})
    lines = []
    for title, claim_of, columns, show in (
            ("time (CPU seconds, the fastest of 3 or more calls, one thread)", lambda c: c.time,
             (("fwd", "fwd_s"), ("fwd+bwd", "fwdbwd_s")), _seconds),
            ("peak memory (tracemalloc over the call; inputs not counted)", lambda c: c.memory,
             (("fwd", "fwd_bytes"), ("fwd+bwd", "fwdbwd_bytes")), _bytes)):
        header = ["variant", "seed", "pass", *(f"N={n}" for n in ns), "fitted", "seed's", "agrees"]
        rows = []
        for series in results:
            by_n = {p.n: p for p in series.points}
            claimed = series.claim.time_exponent if title.startswith("time") else series.claim.memory_exponent
            for index, (label, what) in enumerate(columns):
                fitted = series.exponent(what)
                rows.append([series.name if index == 0 else "", claim_of(series.claim) if index == 0 else "", label,
                             *(show(getattr(by_n[n], what)) if n in by_n else "" for n in ns),
                             "-" if math.isnan(fitted) else f"{fitted:.2f}", str(claimed),
                             _verdict(fitted, claimed)])
        lines += [title, *_table(header, rows, 3), ""]

    gqa = next((s for s in results if s.name == "gqa"), None)
    if gqa is not None:
        header = ["KV cache (one layer, float32)", *(f"N={p.n}" for p in gqa.points), "fitted"]
        gqa_ns = [p.n for p in gqa.points]
        rows = []
        for label, heads in ((f"MHA ({SHAPE['H']} kv heads)", SHAPE["H"]), (f"GQA ({GQA_KV_HEADS} kv head)",
                                                                          GQA_KV_HEADS)):
            sizes = [kv_cache_bytes(n, heads) for n in gqa_ns]
            fitted = fit_exponent(gqa_ns, sizes)
            rows.append([label, *map(_bytes, sizes), "-" if math.isnan(fitted) else f"{fitted:.2f}"])
        lines += [*_table(header, rows, 1),
                  f"  = 2 x B x Hkv x N x D x 4 bytes: O(n), {SHAPE['H'] // GQA_KV_HEADS}x smaller with GQA", ""]

    checks = exponent_checks(results)
    fitted = [c for c in checks if not math.isnan(c[2])]
    good = [c for c in fitted if abs(c[2] - c[3]) <= TOLERANCE]
    lines.append(f"fitted exponents within {TOLERANCE} of the seed's: {len(good)} of {len(fitted)}"
                 + "".join(f"\n  OFF: {name} {label} {value:.2f} (seed {claimed})"
                           for name, label, value, claimed in fitted if abs(value - claimed) > TOLERANCE))
    lines.append(f"fit: least squares on log-log over the largest {FIT_POINTS} sizes of each variant; "
                 f"float32, B={SHAPE['B']}, Hq={SHAPE['H']}, D={SHAPE['D']}; {MASKS}")
    lines.append("compile (excluded from the times): "
                 + ", ".join(f"{s.name} {s.compile_s:.1f} s" for s in results))
    lines.append("why: " + "; ".join(f"{s.name}: {s.claim.why}" for s in results))
    return "\n".join(lines)


def save_plot(results: list[Series], path) -> str | None:
    """A log-log PNG of time and memory against N, fitted exponents in the legend; returns
    None, or a note saying why not (matplotlib missing)."""
    from . import plots

    plt = plots.pyplot()
    if plt is None:
        return f"matplotlib is not installed, so no picture ({plots.PLOT_EXTRA})"
    figure, axes = plt.subplots(1, 2, figsize=(12, 6.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, pair, unit, scale) in zip(axes, (
            ("time", ("fwd_s", "fwdbwd_s"), "CPU seconds (one thread)", 1.0),
            ("peak memory", ("fwd_bytes", "fwdbwd_bytes"), "MiB", 2.0**-20))):
        for colour, series in zip(colours, results):
            for what, style in zip(pair, ("--", "-")):
                ns, values = series.column(what)
                pass_name = "fwd" if what.startswith("fwd_") else "fwd+bwd"
                ax.plot(ns, values * scale, style, marker="o", markersize=3, color=colour,
                        label=f"{series.name} {pass_name}: n^{series.exponent(what):.2f}")
        ns = np.array(sorted({p.n for s in results for p in s.points}), dtype=float)
        low = min(float(np.min(s.column(pair[0])[1])) for s in results) * scale
        for slope in (1, 2):
            ax.plot(ns, low * (ns / ns[0]) ** slope, ":", color="grey", linewidth=1)
            ax.annotate(f"n^{slope}", (ns[-1], low * (ns[-1] / ns[0]) ** slope), fontsize=8, color="grey")
        ax.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel=unit,
               title=f"{title} (dashed: forward, solid: forward+backward)")
        ax.set_xticks(ns, [str(int(n)) for n in ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    figure.suptitle(f"attention cost on this CPU, one thread: float32, B={SHAPE['B']}, H={SHAPE['H']}, "
                    f"D={SHAPE['D']}; {MASKS}\nexponents fitted over the largest {FIT_POINTS} sizes", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
