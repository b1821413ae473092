"""microattn.nn / optim / cross_entropy against PyTorch as an independent oracle.

Identical weights in float64 must give the same outputs and the same gradients (for a
random cotangent) to 1e-9; optimizer steps must give the same parameters. torch comes with
the test extra `oracle`: skipped without it, a failure in CI. The package never imports torch.
"""

import numpy as np
import pytest

import microattn as ma
import microattn.nn as nn
from microattn import optim
from tests.conftest import require

torch = require("torch")
TF = torch.nn.functional
TOL = dict(rtol=1e-9, atol=1e-9)


def rng(seed=0):
    return np.random.default_rng(seed)


def as_torch(array):
    return torch.tensor(np.array(array), dtype=torch.float64, requires_grad=True)


def compare(ours_fn, torch_fn, inputs, module=None):
    """Run both with the same inputs (and the module's parameters, in order), backprop a
    random cotangent through both, compare the outputs and every gradient."""
    params = module.parameters() if module is not None else []
    ours_in = [ma.tensor(x, requires_grad=True) for x in inputs]
    theirs_in = [as_torch(x) for x in inputs]
    theirs_params = [as_torch(p.data) for p in params]
    ours = ours_fn(*ours_in)
    theirs = torch_fn(*theirs_in, *theirs_params)
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), **TOL)
    cotangent = rng(99).standard_normal(ours.shape)
    ours.backward(cotangent)
    theirs.backward(torch.tensor(cotangent))
    for name, a, b in [(f"input {i}", x, y) for i, (x, y) in enumerate(zip(ours_in, theirs_in))] + [
        (name, p, q) for (name, p), q in zip(module.named_parameters() if module else [], theirs_params)
    ]:
        np.testing.assert_allclose(a.grad, b.grad.numpy(), **TOL, err_msg=name)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    layer = nn.Linear(5, 3, bias, dtype=np.float64, rng=rng())
    compare(layer, lambda x, w, b=None: TF.linear(x, w, b), [rng(1).standard_normal((2, 4, 5))], layer)


def test_embedding():
    emb = nn.Embedding(7, 4, dtype=np.float64, rng=rng())
    tokens = np.array([[1, 6, 1], [0, 3, 3]])
    ours = emb(tokens)
    weight = as_torch(emb.weight.data)
    theirs = TF.embedding(torch.tensor(tokens), weight)
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), **TOL)
    cotangent = rng(1).standard_normal(ours.shape)
    ours.backward(cotangent)
    theirs.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(emb.weight.grad, weight.grad.numpy(), **TOL)


def test_layer_norm():
    layer = nn.LayerNorm(6, eps=1e-5, dtype=np.float64)
    layer.weight.data, layer.bias.data = rng(1).standard_normal(6), rng(2).standard_normal(6)
    compare(layer, lambda x, w, b: TF.layer_norm(x, (6,), w, b, eps=1e-5),
            [rng(3).standard_normal((2, 3, 6)) * 3 + 1], layer)


def test_rms_norm():
    layer = nn.RMSNorm(6, eps=1e-6, dtype=np.float64)
    layer.weight.data = rng(1).standard_normal(6)
    compare(layer, lambda x, w: TF.rms_norm(x, (6,), w, eps=1e-6), [rng(3).standard_normal((2, 3, 6))], layer)


def test_gelu_tanh():
    compare(nn.gelu, lambda x: TF.gelu(x, approximate="tanh"), [rng().standard_normal((3, 7)) * 3])


def torch_rope(x, positions, base=10000.0):
    """Interleaved-pair RoPE via complex multiplication (as in Meta's LLaMA reference)."""
    hd = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq  # (N, hd/2)
    rotation = torch.polar(torch.ones_like(angles), angles)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).reshape(x.shape)


def test_rope():
    rope = nn.RotaryEmbedding(8)
    positions = np.array([0, 3, 4, 50, 1000])
    compare(lambda x: rope(x, positions), lambda x: torch_rope(x, positions),
            [rng().standard_normal((2, 3, 5, 8))])


# ----------------------------------------------------------------------------- attention


def torch_mha(mha, is_causal, context=None):
    """The layer written in torch from F.scaled_dot_product_attention (Nq == Nk here, so
    PyTorch's top-left causal alignment agrees with ours)."""
    H, Hkv, hd = mha.num_heads, mha.num_kv_heads, mha.head_dim

    def fn(x, *rest):
        if context is not None:
            source, rest = rest[0], rest[1:]
        else:
            source = x
        wq, bq, wk, bk, wv, bv, wo, bo = rest
        B, N, E = x.shape
        Ns = source.shape[1]
        q = TF.linear(x, wq, bq).reshape(B, N, H, hd).transpose(1, 2)
        k = TF.linear(source, wk, bk).reshape(B, Ns, Hkv, hd).transpose(1, 2)
        v = TF.linear(source, wv, bv).reshape(B, Ns, Hkv, hd).transpose(1, 2)
        if mha.rope is not None:
            q, k = torch_rope(q, np.arange(N)), torch_rope(k, np.arange(N))
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        mask = None
        if mha.attention == "window":
            i, j = np.indices((N, Ns))
            band = (j >= i - mha.window) & ((j <= i) if is_causal else (j <= i + mha.window))
            mask = torch.tensor(band)
        out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=is_causal and mask is None)
        return TF.linear(out.transpose(1, 2).reshape(B, N, H * hd), wo, bo)

    return fn


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("options", [
    dict(),
    dict(num_kv_heads=2, rope=True),
    dict(num_kv_heads=1, attention="window", window=2),
    dict(attention="window", window=1, rope=True),
])
def test_multi_head_attention(options, is_causal):
    mha = nn.MultiHeadAttention(16, 4, **options, backend="reference", dtype=np.float64, rng=rng())
    compare(lambda x: mha(x, is_causal=is_causal), torch_mha(mha, is_causal),
            [rng(1).standard_normal((2, 6, 16))], mha)


def test_cross_attention():
    mha = nn.MultiHeadAttention(8, 2, num_kv_heads=1, backend="reference", dtype=np.float64, rng=rng())
    x, context = rng(1).standard_normal((2, 3, 8)), rng(2).standard_normal((2, 5, 8))
    compare(lambda x, c: mha(x, c), torch_mha(mha, False, context=True), [x, context], mha)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(reduction):
    targets = np.array([[0, 4, -100, 2], [1, 1, 3, -100]])

    def theirs(x):
        loss = TF.cross_entropy(x.reshape(-1, 5), torch.tensor(targets.reshape(-1)), reduction=reduction)
        return loss.reshape(targets.shape) if reduction == "none" else loss

    compare(lambda x: nn.cross_entropy(x, targets, reduction=reduction), theirs,
            [rng().standard_normal((2, 4, 5)) * 4])


# ----------------------------------------------------------------------------- optimizers


def run_steps(make_ours, make_theirs, steps, clip=None):
    shapes = [(3, 4), (4,), (2, 2, 2)]
    initial = [rng(i).standard_normal(s) for i, s in enumerate(shapes)]
    grads = [[rng(100 + 10 * t + i).standard_normal(s) for i, s in enumerate(shapes)] for t in range(steps)]
    ours = [ma.tensor(x, requires_grad=True) for x in initial]
    theirs = [torch.tensor(x, requires_grad=True) for x in initial]
    ours_opt, theirs_opt = make_ours(ours), make_theirs(theirs)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.copy(), torch.tensor(g)
        if clip is not None:
            ours_norm = optim.clip_grad_norm_(ours, clip)
            theirs_norm = torch.nn.utils.clip_grad_norm_(theirs, clip)
            assert ours_norm == pytest.approx(float(theirs_norm), rel=1e-12)
        ours_opt.step()
        theirs_opt.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
])
def test_adamw(kwargs, steps):
    run_steps(lambda ps: optim.AdamW(ps, **kwargs), lambda ps: torch.optim.AdamW(ps, **kwargs), steps)


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True),
])
def test_sgd(kwargs, steps):
    run_steps(lambda ps: optim.SGD(ps, **kwargs), lambda ps: torch.optim.SGD(ps, **kwargs), steps)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_then_adamw(max_norm):
    run_steps(lambda ps: optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2), 4, clip=max_norm)
