"""microattn.optim: every update rule in closed form on a small quadratic, gradient
clipping, the schedule at known steps, and exact resumption from state_dict."""

import math

import numpy as np
import pytest

import microattn as ma
from microattn import optim

A = np.array([1.0, 2.0, 0.5])  # loss = 0.5 * sum(A * p^2), so grad = A * p
P0 = np.array([1.0, -2.0, 3.0])


def quadratic_param():
    return ma.tensor(P0, requires_grad=True)


def take_step(opt, p):
    opt.zero_grad()
    (0.5 * (ma.tensor(A) * p * p).sum()).backward()
    opt.step()


def test_sgd_plain_is_geometric_decay():
    p = quadratic_param()
    opt = optim.SGD([p], lr=0.1)
    for _ in range(5):
        take_step(opt, p)
    np.testing.assert_allclose(p.data, P0 * (1 - 0.1 * A) ** 5, rtol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_and_weight_decay_follow_pytorch_recurrence(nesterov):
    lr, mu, wd = 0.1, 0.9, 0.05
    p = quadratic_param()
    opt = optim.SGD([p], lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    expected, buf = P0.copy(), None
    for _ in range(4):
        take_step(opt, p)
        g = A * expected + wd * expected
        buf = g if buf is None else mu * buf + g
        expected = expected - lr * (g + mu * buf if nesterov else buf)
    np.testing.assert_allclose(p.data, expected, rtol=1e-14)


def test_adamw_first_step_is_decay_then_signed_lr():
    lr, wd, eps = 0.01, 0.1, 1e-8
    p = quadratic_param()
    opt = optim.AdamW([p], lr=lr, weight_decay=wd, eps=eps)
    take_step(opt, p)
    g = A * P0  # m_hat = g, v_hat = g^2 after bias correction
    np.testing.assert_allclose(p.data, P0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps), rtol=1e-14)


def test_adamw_several_steps_match_the_written_out_update():
    lr, (b1, b2), eps, wd = 0.05, (0.8, 0.95), 1e-6, 0.02
    p = quadratic_param()
    opt = optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    expected, m, v = P0.copy(), 0.0, 0.0
    for t in range(1, 6):
        g = A * expected
        take_step(opt, p)
        expected = expected * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = expected - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(p.data, expected, rtol=1e-12)


def test_params_without_grad_are_skipped_and_keep_their_state():
    used, unused = quadratic_param(), ma.tensor(np.ones(2), requires_grad=True)
    opt = optim.AdamW([used, unused, used], lr=0.1)  # duplicates are dropped
    assert len(opt.params) == 2
    take_step(opt, used)
    np.testing.assert_array_equal(unused.data, 1.0)  # no decay either: it had no grad
    assert 1 not in opt.state and opt.state[0]["step"] == 1


def test_optimizer_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="require grad"):
        optim.SGD([ma.tensor(np.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        optim.AdamW([quadratic_param()], lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([quadratic_param()], lr=0.1, nesterov=True)


@pytest.mark.parametrize("make", [
    lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
])
def test_state_dict_resumes_exactly(make):
    def train(params, opt, schedule, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = sum(0.5 * (ma.tensor(A[: len(p.data)]) * p * p * p).sum() for p in params)
            loss.backward()
            optim.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()

    params = [quadratic_param(), ma.tensor(np.array([0.5, -0.1]), requires_grad=True)]
    opt = make(params)
    schedule = optim.CosineSchedule(opt, warmup_steps=2, total_steps=8, min_lr=0.001)
    train(params, opt, schedule, 3)
    checkpoint = ([p.data.copy() for p in params], opt.state_dict(), schedule.state_dict())
    train(params, opt, schedule, 4)

    fresh = [ma.tensor(data, requires_grad=True) for data in checkpoint[0]]
    fresh_opt = make(fresh)
    fresh_schedule = optim.CosineSchedule(fresh_opt, warmup_steps=2, total_steps=8)
    fresh_opt.load_state_dict(checkpoint[1])
    fresh_schedule.load_state_dict(checkpoint[2])
    train(fresh, fresh_opt, fresh_schedule, 4)
    for a, b in zip(params, fresh):
        np.testing.assert_array_equal(a.data, b.data)
    assert fresh_opt.lr == opt.lr


def test_optimizer_state_dict_is_a_copy():
    p = quadratic_param()
    opt = optim.AdamW([p])
    take_step(opt, p)
    state = opt.state_dict()
    state["state"][0]["exp_avg"][...] = 123.0
    assert not np.any(opt.state[0]["exp_avg"] == 123.0)


# ----------------------------------------------------------------------------- clipping


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_old_norm():
    a, b = (ma.tensor(np.zeros(2), requires_grad=True) for _ in range(2))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([0.0, 4.0])
    total = optim.clip_grad_norm_([a, b], 1.0)
    assert total == pytest.approx(5.0, rel=1e-15)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), np.array([3, 0, 0, 4]) * scale, rtol=1e-15)
    before = a.grad.copy()
    assert optim.clip_grad_norm_([a, b], 10.0) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(a.grad, before)  # under the limit: untouched
    c = ma.tensor(np.zeros(1), requires_grad=True)
    assert optim.clip_grad_norm_([c], 1.0) == 0.0  # no gradients at all


# ----------------------------------------------------------------------------- schedule


def test_cosine_schedule_worked_example():
    opt = optim.SGD([quadratic_param()], lr=1.0)
    schedule = optim.CosineSchedule(opt, warmup_steps=2, total_steps=6)
    seen = [opt.lr] + [schedule.step() for _ in range(7)]
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]
    np.testing.assert_allclose(seen, expected, atol=1e-15)


def test_cosine_schedule_min_lr_and_no_warmup():
    opt = optim.SGD([quadratic_param()], lr=0.1)
    schedule = optim.CosineSchedule(opt, warmup_steps=0, total_steps=4, min_lr=0.02)
    assert opt.lr == pytest.approx(0.1)
    assert schedule.lr_at(2) == pytest.approx(0.06)
    assert schedule.lr_at(4) == schedule.lr_at(100) == 0.02
    with pytest.raises(ValueError):
        optim.CosineSchedule(opt, warmup_steps=5, total_steps=4)


# ----------------------------------------------------------------------------- argument checks


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, argument", [
    (lambda p: optim.SGD(p, lr=NAN), "lr"),
    (lambda p: optim.SGD(p, lr=INF), "lr"),
    (lambda p: optim.SGD(p, lr=-0.1), "lr"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=NAN), "momentum"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.5), "momentum"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=INF), "weight_decay"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1.0), "weight_decay"),
    (lambda p: optim.AdamW(p, lr=NAN), "lr"),
    (lambda p: optim.AdamW(p, lr=INF), "lr"),
    (lambda p: optim.AdamW(p, lr=-INF), "lr"),
    (lambda p: optim.AdamW(p, betas=(NAN, 0.9)), "betas"),
    (lambda p: optim.AdamW(p, betas=(0.9, 1.0)), "betas"),
    (lambda p: optim.AdamW(p, betas=(0.9,)), "betas"),
    (lambda p: optim.AdamW(p, betas=0.9), "betas"),
    (lambda p: optim.AdamW(p, eps=NAN), "eps"),
    (lambda p: optim.AdamW(p, eps=-1e-8), "eps"),
    (lambda p: optim.AdamW(p, eps=INF), "eps"),
    (lambda p: optim.AdamW(p, weight_decay=NAN), "weight_decay"),
    (lambda p: optim.AdamW(p, weight_decay=-0.01), "weight_decay"),
    (lambda p: optim.CosineSchedule(optim.SGD(p, lr=0.1), 0, 10, min_lr=NAN), "min_lr"),
    (lambda p: optim.CosineSchedule(optim.SGD(p, lr=0.1), 0, 10, min_lr=-1.0), "min_lr"),
])
def test_nonsense_hyperparameters_are_value_errors_naming_the_argument(make, argument):
    """Before: lr=nan, inf, nan betas/eps/weight decay were accepted and trained to NaN."""
    with pytest.raises(ValueError, match=rf"\b{argument}\b.*expected|\b{argument} must be"):
        make([quadratic_param()])


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.1, momentum="0.9"),
    lambda p: optim.AdamW(p, lr="0.1"),
    lambda p: optim.AdamW(p, eps=None),
])
def test_hyperparameters_that_are_not_numbers_are_type_errors(make):
    with pytest.raises(TypeError, match="must be a number"):
        make([quadratic_param()])


def test_zero_lr_and_infinite_clipping_norm_stay_allowed():
    p = quadratic_param()
    take_step(optim.AdamW([p], lr=0.0, weight_decay=0.0), p)
    np.testing.assert_array_equal(p.data, P0)  # as PyTorch: lr 0 is a no-op, not an error
    p.grad = np.ones(3)
    assert optim.clip_grad_norm_([p], INF) == pytest.approx(math.sqrt(3))
    np.testing.assert_array_equal(p.grad, 1.0)


@pytest.mark.parametrize("max_norm", [NAN, -1.0])
def test_clip_grad_norm_refuses_nan_and_negative_norms(max_norm):
    p = quadratic_param()
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm_([p], max_norm)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["hyperparameters"].update(lr=NAN), "lr"),
    (lambda s: s["hyperparameters"].update(betas=(0.9, 2.0)), "betas"),
    (lambda s: s["hyperparameters"].pop("eps"), "eps"),
    (lambda s: s["hyperparameters"].update(momentum=0.9), "momentum"),
    (lambda s: s["state"][0].pop("exp_avg_sq"), "exp_avg_sq"),
    (lambda s: s["state"][0].update(step=-1), "step"),
    (lambda s: s["state"][0].update(exp_avg=np.zeros(3, dtype=np.float32)), "float32"),
    (lambda s: s["state"][0].update(exp_avg=np.zeros(2)), "shape"),
    (lambda s: s["state"].update({5: s["state"][0]}), "parameter 5"),
])
def test_load_state_dict_checks_what_it_loads(change, message):
    """Before: a state dict with lr nan or a missing moment loaded, and failed (or went NaN) later."""
    p = quadratic_param()
    opt = optim.AdamW([p], lr=0.1)
    take_step(opt, p)
    state = opt.state_dict()
    change(state)
    fresh = optim.AdamW([quadratic_param()], lr=0.1)
    with pytest.raises((KeyError, TypeError, ValueError), match=message):
        fresh.load_state_dict(state)
    assert fresh.lr == 0.1 and fresh.state == {}  # nothing changed


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(min_lr=NAN), "min_lr"),
    (lambda s: s.update(base_lr=INF), "base_lr"),
    (lambda s: s.update(step_count=-3), "step_count"),
    (lambda s: s.update(warmup_steps=20), "warmup_steps"),
    (lambda s: s.pop("total_steps"), "total_steps"),
])
def test_schedule_load_state_dict_checks_what_it_loads(change, message):
    schedule = optim.CosineSchedule(optim.SGD([quadratic_param()], lr=0.1), warmup_steps=2, total_steps=10)
    state = schedule.state_dict()
    change(state)
    with pytest.raises((KeyError, TypeError, ValueError), match=message):
        schedule.load_state_dict(state)
