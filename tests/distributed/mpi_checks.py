"""Run under mpiexec (tests/distributed/test_mpi.py launches it): every check on every rank.

    mpiexec -n 4 python tests/distributed/mpi_checks.py

A failed check raises: the rank exits non-zero and mpiexec reports it. Each rank prints
"ok <check>" per check passed; the test counts them.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import microattn as ma
from microattn import distributed as dist
from microattn import functional as F
from microattn import nn, optim

comm = MPI.COMM_WORLD
P, RANK = comm.size, comm.rank
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def same_error_everywhere(fn, fragment):
    """fn raises ValueError containing ``fragment`` on this rank; the message is the same on
    every rank."""
    try:
        fn()
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError(f"no ValueError (wanted one saying {fragment!r})")
    assert fragment in message, message
    messages = comm.allgather(message)
    assert all(m == messages[0] for m in messages), messages


@check
def sharding_round_trips_in_both_layouts():
    x = np.arange(2 * 3 * 4 * P * 5, dtype=np.float64).reshape(2, 3, 4 * P, 5)
    for layout in dist.LAYOUTS:
        local = dist.shard(x, comm, layout)
        np.testing.assert_array_equal(local, x[:, :, dist.positions(4 * P, P, RANK, layout)])
        np.testing.assert_array_equal(dist.gather(local, comm, layout), x)
    # zigzag: chunks r and 2P-1-r
    c = 2
    want = list(range(RANK * c, RANK * c + c)) + list(range((2 * P - 1 - RANK) * c, (2 * P - RANK) * c))
    assert dist.positions(4 * P, P, RANK, "zigzag").tolist() == want


@check
def shard_and_gather_carry_gradients():
    rng = np.random.default_rng(0)
    x = ma.tensor(rng.standard_normal((1, 2, 2 * P, 3)), requires_grad=True)
    w = rng.standard_normal((1, 2, 2 * P, 3))
    whole = dist.gather(dist.shard(x, comm, "zigzag") * 2.0, comm, "zigzag")
    (whole * w).sum().backward()
    # every rank's loss is the whole loss; x's rows reach it through their owner only
    mine = np.zeros_like(w)
    rows = dist.positions(2 * P, P, RANK, "zigzag")
    mine[:, :, rows] = 2.0 * w[:, :, rows]
    np.testing.assert_allclose(x.grad, mine)


@check
def bad_lengths_and_mismatched_shapes_fail_on_every_rank():
    same_error_everywhere(lambda: dist.shard(np.zeros((1, 1, 2 * P + 1, 2)), comm, "zigzag"),
                          "cannot be cut")
    same_error_everywhere(lambda: dist.shard(np.zeros((1, 1, 2 * P, 2 + RANK)), comm),
                          "differs across ranks")
    same_error_everywhere(lambda: dist.shard(np.zeros((1, 1, 2 * P, 2)), comm, "striped"),
                          "layout must be one of")


def one_process(q, k, v, dout, **kw):
    """out, lse, dq, dk, dv of the whole problem in this process (the oracle)."""
    tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = F.scaled_dot_product_attention(tq, tk, tv, return_lse=True, backend="reference", **kw)
    out.backward(dout)
    return out.data, lse.data, tq.grad, tk.grad, tv.grad


def problem(seed, B=2, H=2 * P, Hkv=P, n=3, D=5):  # GQA, heads divisible by P
    rng = np.random.default_rng(seed)
    N = 2 * P * n
    q = rng.standard_normal((B, H, N, D))
    k, v = rng.standard_normal((B, Hkv, N, D)), rng.standard_normal((B, Hkv, N, D))
    return q, k, v, rng.standard_normal((B, H, N, D))


ATTENTION_CASES = [dict(), dict(is_causal=True), dict(is_causal=True, window=(3, 0)),
                   dict(window=(2, 4)), dict(is_causal=True, dropout_p=0.3, seed=7)]


@check
def ulysses_equals_one_process():
    for layout in dist.LAYOUTS:
        for case in ATTENTION_CASES:
            for backend in ("reference", "numba", "composed"):
                q, k, v, dout = problem(1)
                want = one_process(q, k, v, dout, **case)
                rows = dist.positions(q.shape[2], P, RANK, layout)
                tq, tk, tv = (ma.tensor(x[:, :, rows], requires_grad=True) for x in (q, k, v))
                out, lse = dist.ulysses_attention(tq, tk, tv, comm=comm, layout=layout,
                                                  return_lse=True, backend=backend, **case)
                out.backward(dout[:, :, rows])
                got = (out.data, lse.data, tq.grad, tk.grad, tv.grad)
                for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                    w = w[:, :, rows]
                    scale = max(np.abs(w).max(), 1.0)
                    assert np.abs(g - w).max() <= 1e-12 * scale, (layout, case, backend, name)


@check
def ulysses_refuses_heads_it_cannot_split():
    q = np.zeros((1, P + 1, 2, 4)) if P > 1 else np.zeros((1, 1, 2, 4))
    if P > 1:
        same_error_everywhere(lambda: dist.ulysses_attention(q, q, q, comm=comm), "multiples of the")


@check
def data_parallel_step_equals_one_process_step():
    def model_and_opt():
        model = nn.DecoderLM(11, 16, embed_dim=8, num_layers=1, num_heads=2,
                             rng=np.random.default_rng(RANK))  # different on purpose
        return model, optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    tokens = np.random.default_rng(3).integers(0, 11, (2 * P, 7))
    model, opt = model_and_opt()
    dist.broadcast_parameters(model.parameters(), comm)
    dist.check_same_weights(model.parameters(), comm)
    reference_model, reference_opt = model_and_opt()
    for p, ref in zip(model.parameters(), reference_model.parameters()):
        ref.data[...] = p.data
    for _ in range(2):
        mine = tokens[2 * RANK:2 * RANK + 2]
        opt.zero_grad()
        nn.cross_entropy(model(mine[:, :-1]), mine[:, 1:]).backward()
        dist.allreduce_gradients(model.parameters(), comm, bucket_bytes=256)  # several buckets
        opt.step()
        reference_opt.zero_grad()
        nn.cross_entropy(reference_model(tokens[:, :-1]), tokens[:, 1:]).backward()
        reference_opt.step()
    for p, ref in zip(model.parameters(), reference_model.parameters()):
        np.testing.assert_allclose(p.data, ref.data, rtol=1e-5, atol=1e-6)
    dist.check_same_weights(model.parameters(), comm)


@check
def different_weights_are_caught():
    w = ma.tensor(np.full(3, float(RANK)))
    if P > 1:
        same_error_everywhere(lambda: dist.check_same_weights([w], comm), "differs across ranks")


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for fn in CHECKS:
        if wanted and fn.__name__ not in wanted:
            continue
        fn()
        comm.Barrier()
        print(f"ok {fn.__name__} rank {RANK}", flush=True)
