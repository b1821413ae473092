"""A whole model, side by side: microattn against the same model in PyTorch, in one process.

The model of issue 12: GPT-style, vocab 256, E=256, 4 layers, 8 heads, learned positions,
LayerNorm, GELU (tanh) MLP of width 4E, float32, no dropout. The PyTorch twin
(``TorchGPT``) is built from PyTorch's own layers and loaded with microattn's weights, and
the two are checked to agree (logits, loss and one step's gradients) before anything is
timed. Rows:

* **train**: one training step, batch 8 x 256 tokens: forward, cross-entropy, backward,
  AdamW (lr 1e-3, weight decay 0.01).
* **decode**: greedy decoding of 64 tokens after a 64-token prompt, batch 1, KV cache
  (microattn: ``DecoderLM.generate``; PyTorch: the usual loop, K/V concatenated per step).
* **per-token**: one decoding step (one token in, one out) after a 64- and a 2048-token
  cache, and the ratio of the two; then ours alone in steady state, apart from the
  attention read itself (the decode kernel timed alone on the same caches; the issue asks
  for <= 1.2 there).
* **attention**: the attention of one layer of that model (B=8, H=8, N=256, D=32, causal),
  forward and forward+backward through ``scaled_dot_product_attention`` (the numba
  kernels) against PyTorch's SDPA on the same (B, H, N, D) arrays.
* **ops**: each fused op of ``microattn/fused.py``, forward+backward (an optimizer step for
  AdamW) on (B*N, E) = (2048, E), E = 256, 512, 1024, against PyTorch's op.

Timing (as ``compare_cpu.py``): ours and theirs *interleaved* repetition by repetition, so
a busy machine slows both alike, each timed call preceded by an untimed one (PyTorch's
OpenMP workers keep spinning for a while after a call; the untimed call absorbs that).
Medians and [min, max] over ``--repeats``. Ratios are ``torch time / our time`` (> 1: ours
is faster). Torch is an oracle here only: the package never imports it.

Usage::

    python benchmarks/compare_e2e.py                  # everything, ~3 minutes on 2 cores
    python benchmarks/compare_e2e.py --only train decode --repeats 9
    python benchmarks/compare_e2e.py --quick          # fewer repetitions
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

import microattn as ma
from microattn import functional as F
from microattn import fused, nn, optim
from microattn.kernels.spec import make_attention_spec
from microattn.nn import lean

VOCAB, EMBED, LAYERS, HEADS = 256, 256, 4, 8
TRAIN_BATCH, TRAIN_LEN = 8, 256
PROMPT, NEW_TOKENS = 64, 64
CACHE_LENGTHS = (64, 2048)
MAX_LEN = 2048 + 64
OP_ROWS, OP_WIDTHS = 2048, (256, 512, 1024)


# -- the two models -----------------------------------------------------------------------


def microattn_model(seed=0):
    return nn.DecoderLM(VOCAB, MAX_LEN, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                        rope=False, rng=np.random.default_rng(seed))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        E = EMBED
        self.norm_1, self.norm_2 = torch.nn.LayerNorm(E), torch.nn.LayerNorm(E)
        self.q_proj, self.k_proj = torch.nn.Linear(E, E), torch.nn.Linear(E, E)
        self.v_proj, self.out_proj = torch.nn.Linear(E, E), torch.nn.Linear(E, E)
        self.fc_in, self.fc_out = torch.nn.Linear(E, 4 * E), torch.nn.Linear(4 * E, E)

    def forward(self, x, cache=None):
        B, N, E = x.shape
        heads = lambda t: t.view(B, N, HEADS, E // HEADS).transpose(1, 2)  # noqa: E731 (B, H, N, hd)
        h = self.norm_1(x)
        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # one new token sees the whole cache: no mask; a prompt (cache empty) is causal
        a = TF.scaled_dot_product_attention(q, k, v, is_causal=N > 1)  # (B, H, N, hd)
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, N, E))
        return x + self.fc_out(TF.gelu(self.fc_in(self.norm_2(x)), approximate="tanh"))


class TorchGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(VOCAB, EMBED)
        self.position_embedding = torch.nn.Embedding(MAX_LEN, EMBED)
        self.blocks = torch.nn.ModuleList(TorchBlock() for _ in range(LAYERS))
        self.norm = torch.nn.LayerNorm(EMBED)
        self.lm_head = torch.nn.Linear(EMBED, VOCAB, bias=False)

    def forward(self, tokens, caches=None, start=0):
        N = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding(torch.arange(start, start + N))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt, new_tokens):
        caches = [[] for _ in self.blocks]
        logits = self(prompt, caches)[:, -1]
        out = [prompt]
        for step in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if step + 1 < new_tokens:
                logits = self(token, caches, start=prompt.shape[1] + step)[:, -1]
        return torch.cat(out, dim=1)


def torch_name(name: str) -> str:
    """microattn's parameter name -> TorchGPT's (its blocks hold the layers directly)."""
    return name.replace("mlp.", "").replace("attn.", "")


def torch_twin(model) -> TorchGPT:
    """A TorchGPT holding exactly ``model``'s weights."""
    twin = TorchGPT()
    state = {torch_name(name): torch.from_numpy(value.copy())
             for name, value in model.state_dict().items()
             if not name.endswith((".seed", ".step"))}  # dropout buffers
    twin.load_state_dict(state, strict=True)
    return twin


def check_twins(model, twin):
    """Logits, loss and the gradient of every parameter agree (float32 tolerances)."""
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 33))
    logits = model(tokens[:, :-1])
    loss = nn.cross_entropy(logits, tokens[:, 1:])
    model.zero_grad()
    loss.backward()
    t_logits = twin(torch.from_numpy(tokens[:, :-1]))
    t_loss = TF.cross_entropy(t_logits.reshape(-1, VOCAB), torch.from_numpy(tokens[:, 1:]).reshape(-1))
    twin.zero_grad()
    t_loss.backward()
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(loss.data), float(t_loss), rtol=1e-5)
    t_grads = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, t_grads[torch_name(name)].grad.numpy(),
                                   rtol=1e-2, atol=2e-5, err_msg=name)
    model.zero_grad()
    prompt = tokens[:1, :8]
    ours = model.generate(prompt, 8)
    theirs = twin.generate(torch.from_numpy(prompt), 8).numpy()
    assert np.array_equal(ours, theirs), (ours, theirs)


# -- timing ---------------------------------------------------------------------------------


def interleaved(calls: dict, reps: int, warmup: int = 2) -> dict:
    """name -> list of wall seconds; calls interleaved rep by rep, each timed call after an
    untimed one (see the module docstring)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds, scale=1e3):
    s = np.asarray(seconds) * scale
    return f"{np.median(s):.3g} [{s.min():.3g}-{s.max():.3g}]"


def row(label, ours, theirs, scale=1e3):
    ratios = np.asarray(theirs) / np.asarray(ours)  # per repetition, neighbours in time
    print(f"| {label} | {summary(theirs, scale)} | {summary(ours, scale)} | "
          f"{np.median(theirs) / np.median(ours):.2f} [{ratios.min():.2f}-{ratios.max():.2f}] |",
          flush=True)


def cpu_pressure() -> str:
    """The kernel's CPU pressure (PSI): the share of time some task waited for a core over
    the last 10 s. Above ~20% the machine is busy and every ratio below moves with it."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].replace("avg10=", "CPU pressure (PSI avg10) ") + "%"
    except (OSError, IndexError):
        return "CPU pressure unknown"


def header(unit):
    print(f"\n| | PyTorch {torch.__version__} ({unit}) | microattn ({unit}) | ratio [range] |")
    print("|---|---|---|---|")


# -- the rows -------------------------------------------------------------------------------


def train_rows(reps):
    model = microattn_model()
    twin = torch_twin(model)
    check_twins(model, twin)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (TRAIN_BATCH, TRAIN_LEN + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t_inputs, t_targets = torch.from_numpy(inputs), torch.from_numpy(targets).reshape(-1)
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    t_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01)

    def ours():
        opt.zero_grad()
        nn.cross_entropy(model(inputs), targets).backward()
        opt.step()

    def theirs():
        t_opt.zero_grad()
        TF.cross_entropy(twin(t_inputs).reshape(-1, VOCAB), t_targets).backward()
        t_opt.step()

    times = interleaved({"ours": ours, "theirs": theirs}, reps)
    header("ms")
    row(f"training step, batch {TRAIN_BATCH} x {TRAIN_LEN} (forward, backward, AdamW)",
        times["ours"], times["theirs"])


def decode_rows(reps):
    model = microattn_model()
    twin = torch_twin(model)
    prompt = np.random.default_rng(3).integers(0, VOCAB, (1, PROMPT))
    t_prompt = torch.from_numpy(prompt)
    times = interleaved({"ours": lambda: model.generate(prompt, NEW_TOKENS),
                         "theirs": lambda: twin.generate(t_prompt, NEW_TOKENS)}, reps)
    header("ms")
    row(f"greedy decoding, {NEW_TOKENS} tokens after a {PROMPT}-token prompt, KV cache",
        times["ours"], times["theirs"])


def per_token_rows(reps, steps=16):
    """One decoding step after a cache of each length; ``steps`` steps per timed call."""
    model = microattn_model()
    twin = torch_twin(model)
    header("ms per token")
    medians, steady = {}, {}
    for length in CACHE_LENGTHS:
        prompt = np.random.default_rng(4).integers(0, VOCAB, (1, length))
        token = prompt[:, -1:]

        def ours():
            caches = model.make_caches()
            with ma.no_grad():
                model(prompt, kv_caches=caches)
                start = time.perf_counter()
                for _ in range(steps):
                    model(token, kv_caches=caches)
            return time.perf_counter() - start

        def theirs():
            caches = [[] for _ in twin.blocks]
            with torch.no_grad():
                twin(torch.from_numpy(prompt), caches)
                start = time.perf_counter()
                for step in range(steps):
                    twin(torch.from_numpy(token), caches, start=length + step)
            return time.perf_counter() - start

        results = {"ours": [], "theirs": []}
        for call in (ours, theirs):
            call()  # warm-up
        for _ in range(reps):
            for name, call in (("ours", ours), ("theirs", theirs)):
                call()  # untimed first, as in ``interleaved``: the other's threads settle
                results[name].append(call() / steps)
        medians[length] = float(np.median(results["ours"]))
        steady[length] = steady_state(model, prompt, reps)
        row(f"one decoding step after {length} cached tokens", results["ours"], results["theirs"])
    first, last = CACHE_LENGTHS[0], CACHE_LENGTHS[-1]
    print(f"\nmicroattn per-token time, cache {last} / cache {first}: "
          f"{medians[last] / medians[first]:.2f}")
    (step_1, read_1), (step_2, read_2) = steady[first], steady[last]
    print(f"microattn alone, steady state (the cache rewound after each step): a step "
          f"{step_1 * 1e3:.3f} and {step_2 * 1e3:.3f} ms, of which the attention read itself (the "
          f"decode kernel alone on every layer's cache) {read_1 * 1e3:.3f} and {read_2 * 1e3:.3f} ms; "
          f"apart from it {(step_1 - read_1) * 1e3:.3f} -> {(step_2 - read_2) * 1e3:.3f} ms, "
          f"{(step_2 - read_2) / (step_1 - read_1):.2f}x")


def steady_state(model, prompt, reps, calls=50):
    """(seconds per lean step, seconds of its attention alone) after a cache of the prompt's
    length, ours alone: ``calls`` steps per repetition, every one after the same cache (it
    is rewound), and the decode kernel as the step calls it on every layer's cache.
    Medians over ``reps``."""
    length = prompt.shape[1]
    caches = model.make_caches()
    token = prompt[:, -1:]
    H, hd = HEADS, EMBED // HEADS
    q = np.ones((1, H, 1, hd), np.float32)
    m, l, acc = (np.empty((1, 1, H, 1), np.float32), np.empty((1, 1, H, 1), np.float32),
                 np.empty((1, 1, H, 1, hd), np.float32))
    records = tuple(make_attention_spec(q.shape, (1, H, length + 1, hd), (1, H, length + 1, hd),
                                        (np.float32,) * 3, is_causal=True).pack())
    steps, reads = [], []
    with ma.no_grad():
        model(prompt, kv_caches=caches)
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                model(token, kv_caches=caches)
                for cache in caches:
                    cache.length = length
            steps.append((time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                for cache in caches:
                    lean._attention(q, cache._k, cache._v, length + 1, *records, 1, m, l, acc)
            reads.append((time.perf_counter() - start) / calls)
    return float(np.median(steps)), float(np.median(reads))


def attention_rows(reps):
    B, H, N, D = TRAIN_BATCH, HEADS, TRAIN_LEN, EMBED // HEADS
    rng = np.random.default_rng(4)
    q, k, v, g = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(4))
    ours = [ma.tensor(a, requires_grad=True) for a in (q, k, v)]  # leaves: grads accumulate
    theirs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    tg = torch.from_numpy(g)

    def ours_forward():
        with ma.no_grad():
            F.scaled_dot_product_attention(*ours, is_causal=True)

    def theirs_forward():
        with torch.no_grad():
            TF.scaled_dot_product_attention(*theirs, is_causal=True)

    header("ms")
    times = interleaved({"ours": ours_forward, "theirs": theirs_forward}, reps)
    row(f"attention of one layer, forward (B={B}, H={H}, N={N}, D={D}, causal)",
        times["ours"], times["theirs"])
    times = interleaved({
        "ours": lambda: F.scaled_dot_product_attention(*ours, is_causal=True).backward(g),
        "theirs": lambda: TF.scaled_dot_product_attention(*theirs, is_causal=True).backward(tg)}, reps)
    row(f"attention of one layer, forward+backward (B={B}, H={H}, N={N}, D={D}, causal)",
        times["ours"], times["theirs"])


def op_rows(reps):
    header("ms, forward+backward")
    rng = np.random.default_rng(5)
    for E in OP_WIDTHS:
        x = rng.standard_normal((OP_ROWS, E)).astype(np.float32)
        u = rng.standard_normal((OP_ROWS, E)).astype(np.float32)
        w, b = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32), rng.standard_normal(E).astype(np.float32)
        g = rng.standard_normal((OP_ROWS, E)).astype(np.float32)
        weight = (rng.standard_normal((E, E)) / np.sqrt(E)).astype(np.float32)
        table = (rng.standard_normal((VOCAB, E))).astype(np.float32)
        tokens = rng.integers(0, VOCAB, OP_ROWS)
        targets = rng.integers(0, E, OP_ROWS)  # cross-entropy over E classes
        X, U, W, B, M, T = (ma.tensor(a, requires_grad=True) for a in (x, u, w, b, weight, table))
        tX, tU, tW, tB, tM, tT = (torch.tensor(a, requires_grad=True) for a in (x, u, w, b, weight, table))
        tg, t_tokens, t_targets = torch.from_numpy(g), torch.from_numpy(tokens), torch.from_numpy(targets)
        cases = {
            "Linear (E -> E, bias)": (lambda: fused.Linear.apply(X, M, B),
                                      lambda: TF.linear(tX, tM, tB)),
            "LayerNorm": (lambda: fused.LayerNorm.apply(X, W, B, eps=1e-5),
                          lambda: TF.layer_norm(tX, (E,), tW, tB)),
            "RMSNorm": (lambda: fused.RMSNorm.apply(X, W, eps=1e-6),
                        lambda: TF.rms_norm(tX, (E,), tW, 1e-6)),
            "GELU (tanh)": (lambda: fused.gelu(X), lambda: TF.gelu(tX, approximate="tanh")),
            "SiLU": (lambda: fused.silu(X), lambda: TF.silu(tX)),
            "SwiGLU": (lambda: fused.swiglu(X, U), lambda: TF.silu(tX) * tU),
            "GeGLU": (lambda: fused.geglu(X, U), lambda: TF.gelu(tX, approximate="tanh") * tU),
            "embedding (vocab 256)": (lambda: fused.Embedding.apply(T, tokens=tokens),
                                      lambda: TF.embedding(t_tokens, tT)),
        }
        for name, (ours, theirs) in cases.items():
            times = interleaved({"ours": lambda: ours().backward(g), "theirs": lambda: theirs().backward(tg)},
                                reps)
            row(f"{name}, E={E}", times["ours"], times["theirs"])
        times = interleaved({
            "ours": lambda: fused.cross_entropy(X, targets).backward(),
            "theirs": lambda: TF.cross_entropy(tX, t_targets).backward()}, reps)
        row(f"softmax cross-entropy, {E} classes", times["ours"], times["theirs"])
        params = [ma.tensor(rng.standard_normal((E, 4 * E)).astype(np.float32), requires_grad=True)
                  for _ in range(2)]
        t_params = [torch.tensor(p.data, requires_grad=True) for p in params]
        for p, tp in zip(params, t_params):
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
            tp.grad = torch.from_numpy(p.grad.copy())
        opt, t_opt = optim.AdamW(params), torch.optim.AdamW(t_params)
        times = interleaved({"ours": opt.step, "theirs": t_opt.step}, reps)
        row(f"AdamW step, 2 x ({E}, {4 * E})", times["ours"], times["theirs"])


ROWS = {"train": train_rows, "attention": attention_rows, "decode": decode_rows,
        "per-token": per_token_rows, "ops": op_rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else args.repeats
    print(f"torch threads {torch.get_num_threads()}; ratios are torch time / microattn time; "
          f"{cpu_pressure()} at start")
    for name in args.only:
        ROWS[name](reps)
    print(f"\n{cpu_pressure()} at the end")


if __name__ == "__main__":
    main()
