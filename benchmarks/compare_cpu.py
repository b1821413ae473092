"""CPU attention, side by side: the numba flash kernels against PyTorch's SDPA (or the reference).

Validate, then time (llm.c's harness): every configuration is first checked against the
NumPy reference on a small problem, then timed on B=1, H=8, D=64 float32 inputs in one
process, ours and torch's calls *interleaved* repetition by repetition, so a busy machine
slows both alike (each timed call preceded by an untimed one, see ``interleaved_medians``).
Medians after a warm-up of ``--warmup`` calls each (the first ~10 calls
after start-up are slow: compilation-cache loading, page faults, thread-pool start).

* dense: N = 1024 and 4096, full and causal; forward, and forward+backward.
* window=(255, 0): ours at N against torch at N given the equivalent boolean mask (it has
  no banded path); and, in a separate phase without torch, ours at N and 2N interleaved
  (the O(N * w) path, so the time ratio should be ~2).
* memory: the extra bytes of one forward+backward at N=8192 (window and causal), two ways:
  NumPy allocations traced by ``tracemalloc`` (outputs and any copies), and the growth of
  the resident set of a fresh subprocess sampled every millisecond during the call (which
  also sees numba's own allocations inside the kernels, invisible to tracemalloc).

Ratios are ``other time / our time`` (> 1: ours is faster). Without torch installed the
"other" is ``microattn.kernels.reference`` and cases whose score matrix would not fit in
memory are skipped. Torch is a benchmark oracle only: the package never imports it.

Usage::

    python benchmarks/compare_cpu.py --ladder      # everything (~15 minutes on 2 cores)
    python benchmarks/compare_cpu.py --quick       # fewer repetitions
    python benchmarks/compare_cpu.py               # without the ladder rungs 1 and 2
    python benchmarks/compare_cpu.py --dense-only  # only the N=1024/4096 rows
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from microattn.kernels import reference
from microattn.kernels.cpu import flash, ladder
from microattn.kernels.spec import make_attention_spec

B, H, D = 1, 8, 64
WINDOW = (255, 0)

try:
    import torch
    import torch.nn.functional as torch_F
except ImportError:  # the reference stands in
    torch = None


# -- inputs and the three implementations -------------------------------------------------


def make_problem(N, causal=False, window=None, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(4))
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=causal,
                               window=window)
    return q, k, v, dout, spec


def ours(module, q, k, v, dout, spec, backward):
    """A zero-argument callable running one forward (and backward) of a kernel module."""
    def call():
        out, stats = module.forward(q, k, v, spec)
        if backward:
            module.backward(q, k, v, out, stats, dout, spec)
    return call


def band_mask(N, window):
    """The boolean (N, N) mask torch needs for what our ``window`` says."""
    i = np.arange(N)[:, None]
    j = np.arange(N)[None, :]
    left, right = window
    return (j >= i - left) & (j <= i + right)


def theirs(q, k, v, dout, spec, backward, window=None):
    if torch is None:
        return ours(reference, q, k, v, dout, spec, backward)
    tq, tk, tv = (torch.tensor(x, requires_grad=backward) for x in (q, k, v))
    tdo = torch.tensor(dout)
    mask = None if window is None else torch.tensor(band_mask(q.shape[2], window))
    causal = spec.causal and window is None

    def call():
        if backward:
            out = torch_F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, is_causal=causal)
            out.backward(tdo)
        else:
            with torch.no_grad():
                torch_F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, is_causal=causal)
    return call


def other_name():
    return f"torch {torch.__version__}" if torch is not None else "reference"


# -- timing -----------------------------------------------------------------------------------


def interleaved_medians(calls: dict, reps: int, warmup: int) -> dict:
    """Median wall seconds of each zero-argument callable, their calls interleaved rep by rep.

    Also ``cpu:<name>``: the median process CPU seconds (all threads) of the same calls,
    which measures the work done even while other processes hold the cores.

    Each rep of each callable is **one untimed call, then the timed one**: steady state for
    both libraries. The untimed call absorbs the switch from the other library: PyTorch's
    OpenMP workers keep spinning for a while after a call returns, and on two cores the
    next call shares the cores with them (measured back to back: our N=1024 forward took
    22-28 ms right after a torch call, 15-17 ms otherwise). Two other cures were tried and
    rejected: ``OMP_WAIT_POLICY=PASSIVE`` slows torch itself by 10-15% at N=4096, and a
    sleep before each call measures a cold machine (a 30 ms sleep made our single-thread
    N=1024 forward 31 -> 42 ms).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            call()  # untimed: see the docstring
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    result = {name: float(np.median(t)) for name, t in times.items()}
    result.update({f"cpu:{name}": float(np.median(t)) for name, t in cpu.items()})
    return result


def validate(causal=False, window=None, N=300):
    """Our forward+backward against the reference before any timing (float32 tolerances)."""
    check_against_reference(*make_problem(N, causal, window, seed=1), f"causal={causal}, window={window}")


def check_against_reference(q, k, v, dout, spec, label):
    """flash forward+backward within 1e-4 (relative to the largest entry) of the reference,
    or SystemExit naming what failed: nothing is timed unless it is right."""
    out, stats = flash.forward(q, k, v, spec)
    grads = flash.backward(q, k, v, out, stats, dout, spec)
    r_out, r_stats = reference.forward(q, k, v, spec)
    r_grads = reference.backward(q, k, v, r_out, r_stats, dout, spec)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, (r_out,) + r_grads):
        err = np.abs(a - b).max() / np.abs(b).max()
        if not err < 1e-4:
            raise SystemExit(f"validation failed: {name} rel err {err:.2e} ({label})")


# -- the sections ----------------------------------------------------------------------------


def dense_rows(reps, warmup):
    rows = []
    for N in (1024, 4096):
        for causal in (False, True):
            validate(causal=causal)
            q, k, v, dout, spec = make_problem(N, causal)
            if torch is None and N > 2048:
                rows.append((f"N={N} {'causal' if causal else 'full'}", None, None, None, None))
                continue
            t = interleaved_medians({
                "ours_f": ours(flash, q, k, v, dout, spec, False),
                "other_f": theirs(q, k, v, dout, spec, False),
                "ours_fb": ours(flash, q, k, v, dout, spec, True),
                "other_fb": theirs(q, k, v, dout, spec, True),
            }, reps, warmup)
            rows.append((f"N={N} {'causal' if causal else 'full'}", t["ours_f"], t["other_f"],
                         t["ours_fb"], t["other_fb"]))
    return rows


def window_rows(N, reps, warmup):
    """Two phases: ours at N and 2N interleaved with each other (the scaling, undisturbed
    by torch's multi-GB temporaries), then ours at N interleaved with the other."""
    validate(window=WINDOW)
    q, k, v, dout, spec = make_problem(N, window=WINDOW)
    q2, k2, v2, dout2, spec2 = make_problem(2 * N, window=WINDOW)
    times = interleaved_medians({
        "ours_f": ours(flash, q, k, v, dout, spec, False),
        "ours_fb": ours(flash, q, k, v, dout, spec, True),
        "ours2_f": ours(flash, q2, k2, v2, dout2, spec2, False),
        "ours2_fb": ours(flash, q2, k2, v2, dout2, spec2, True),
    }, reps, warmup)
    del q2, k2, v2, dout2
    if torch is not None:  # the reference at N=8192 would need ~10 GB of scores
        versus = interleaved_medians({
            "ours_f": ours(flash, q, k, v, dout, spec, False),
            "other_f": theirs(q, k, v, dout, spec, False, window=WINDOW),
            "ours_fb": ours(flash, q, k, v, dout, spec, True),
            "other_fb": theirs(q, k, v, dout, spec, True, window=WINDOW),
        }, reps, warmup)
        times.update({f"vs_{name}": t for name, t in versus.items()})
    return times


MEMORY_CHILD = """
import os, sys, threading, time, tracemalloc
import numpy as np
from microattn.kernels.cpu import flash
from microattn.kernels.spec import make_attention_spec
N, mode = int(sys.argv[1]), sys.argv[2]
kw = dict(window=(255, 0)) if mode == "window" else dict(is_causal=True)
def problem(n):
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 8, n, 64), dtype=np.float32) for _ in range(4))
    return q, k, v, do, make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kw)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
q, k, v, do, spec = problem(64)  # load the compiled kernels first: their memory is not "extra"
out, stats = flash.forward(q, k, v, spec); flash.backward(q, k, v, out, stats, do, spec)
del out, stats
q, k, v, do, spec = problem(N)
inputs = q.nbytes + k.nbytes + v.nbytes + q.nbytes  # q + k + v + o (o has q's shape here)
before = rss()
peak = [before]
done = threading.Event()
def sample():  # the resident set, every millisecond, while forward+backward runs
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
tracemalloc.start()
out, stats = flash.forward(q, k, v, spec)
grads = flash.backward(q, k, v, out, stats, do, spec)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
done.set()
sampler.join()
print(inputs, traced, max(peak[0], rss()) - before)
"""


def memory_rows(N):
    rows = []
    for mode in ("window", "causal"):
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(N), mode],
                                capture_output=True, text=True, check=True)
        inputs, traced, rss = (int(x) for x in result.stdout.split())
        rows.append((mode, inputs, traced, rss))
    return rows


def ladder_rows(reps, warmup):
    q, k, v, dout, spec = make_problem(1024)
    rungs = {"rung 1 (loops)": ladder.RUNGS[1], "rung 2 (tiles)": ladder.RUNGS[2], "rung 3 (flash)": flash}
    rows = []
    for name, module in rungs.items():
        t = interleaved_medians({"f": ours(module, q, k, v, dout, spec, False),
                                 "fb": ours(module, q, k, v, dout, spec, True)}, reps, warmup)
        rows.append((name, t["f"], t["fb"]))
    return rows


# -- report ----------------------------------------------------------------------------------


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:9.1f}"


def ratio(other, mine):
    return "-" if other is None or mine is None else f"{other / mine:6.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--ladder", action="store_true", help="also time ladder rungs 1 and 2")
    parser.add_argument("--window-n", type=int, default=8192)
    parser.add_argument("--dense-only", action="store_true", help="only the dense N=1024/4096 rows")
    args = parser.parse_args(argv)
    reps, warmup = (3, 3) if args.quick else (9, 10)

    import numba

    print("$ python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]))
    print(f"numba {numba.__version__} ({numba.get_num_threads()} threads, layer "
          f"{numba.config.THREADING_LAYER}), numpy {np.__version__}, other = {other_name()}"
          + (f" ({torch.get_num_threads()} threads)" if torch is not None else ""))
    print(f"float32, B={B}, H={H}, D={D}; medians of {reps} interleaved runs after {warmup} "
          f"warm-up calls; times in ms; load average at start {os.getloadavg()[0]:.1f}")
    print()

    print(f"dense            ours fwd  other fwd  ratio | ours f+b  other f+b  ratio")
    for name, of, tf, ofb, tfb in dense_rows(reps, warmup):
        print(f"{name:14s} {ms(of)} {ms(tf)}  {ratio(tf, of)} | {ms(ofb)} {ms(tfb)}  {ratio(tfb, ofb)}")
    print()
    if args.dense_only:
        return

    N = args.window_n
    t = window_rows(N, reps, max(2, warmup // 3))
    print(f"window {WINDOW}   ours fwd  other fwd  ratio | ours f+b  other f+b  ratio")
    print(f"N={N:<12d} {ms(t.get('vs_ours_f'))} {ms(t.get('vs_other_f'))}  "
          f"{ratio(t.get('vs_other_f'), t.get('vs_ours_f'))} | {ms(t.get('vs_ours_fb'))} "
          f"{ms(t.get('vs_other_fb'))}  {ratio(t.get('vs_other_fb'), t.get('vs_ours_fb'))}")
    print(f"ours alone, N and 2N interleaved: N={N} fwd {ms(t['ours_f']).strip()}, f+b "
          f"{ms(t['ours_fb']).strip()}; N={2 * N} fwd {ms(t['ours2_f']).strip()}, f+b "
          f"{ms(t['ours2_fb']).strip()} ms")
    print(f"time(2N)/time(N), wall: forward {t['ours2_f'] / t['ours_f']:.2f}, "
          f"forward+backward {t['ours2_fb'] / t['ours_fb']:.2f}; CPU time: forward "
          f"{t['cpu:ours2_f'] / t['cpu:ours_f']:.2f}, forward+backward "
          f"{t['cpu:ours2_fb'] / t['cpu:ours_fb']:.2f}")
    print()

    print(f"memory, one forward+backward at N={N}: extra bytes / bytes of q+k+v+o")
    for mode, inputs, traced, rss in memory_rows(N):
        print(f"{mode:8s} q+k+v+o {inputs / 2**20:6.1f} MiB | NumPy allocations (tracemalloc peak) "
              f"{traced / 2**20:6.1f} MiB = {traced / inputs:.2f}x | RSS growth "
              f"{rss / 2**20:6.1f} MiB = {rss / inputs:.2f}x")
    print()

    if args.ladder:
        print("ladder, N=1024 full    fwd      f+b")
        for name, f, fb in ladder_rows(max(3, reps // 3), 2):
            print(f"{name:18s} {ms(f)} {ms(fb)}")
        print()
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
