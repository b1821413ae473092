"""Exercise 10: one step of ring attention, two ranks simulated in one process.

    state = (out, m, l)   out (B, H, n, Dv), m (B, H, n), l (B, H, n)   a query chunk's running result
    q (B, H, n, D)        the chunk's queries: global rows q_start .. q_start + n
    k, v (B, Hkv, c, D/Dv) the K/V block this rank holds now: global rows k_start .. k_start + c

Ring attention (docs/distributed.md): P ranks each keep their query rows; K/V blocks travel
round the ring, one rank to the right per step. At every step a rank attends its queries
to the block it holds and merges that partial result into its running (out, m, l), where
l = sum_j exp(s_j - m) over the keys seen so far (lse = m + log l). Two parts a, b merge as

    m   = max(m_a, m_b)
    l   = l_a e^(m_a - m) + l_b e^(m_b - m)
    out = (l_a e^(m_a - m) out_a + l_b e^(m_b - m) out_b) / l

Causal by *global* position: local query i is row q_start + i of the whole sequence, local
key j row k_start + j, so query i may see key j iff j <= i + (q_start - k_start).
``attend(q, k, v, offset)`` runs the kernel with exactly that rule for the ``offset`` you
give it and returns (out, stats) with stats = (m, l) stacked (2, B, H, n), or None when the
band allows no pair at all (nothing to merge). A row that saw no key has m = -inf, l = 0.

Write ``ring_step`` below, then grade it (``run_ring`` below shows it at work):

    microattn exercise check 10 DIR       (DIR: the directory holding this file)
    microattn exercise hint 10            (if stuck)
"""

import types

import numpy as np  # noqa: F401 - for your code

from microattn.distributed.ring import Ring, empty_state
from microattn.kernels import reference
from microattn.kernels.protocol import lse_of
from microattn.kernels.spec import make_attention_spec

P = 2  # simulated ranks


def ring_step(state, q, k, v, q_start, k_start, attend):
    """Attend the chunk's queries to the held K/V block; return the merged state.

    state   (out, m, l): (B, H, n, Dv), (B, H, n), (B, H, n); before any block: out 0,
            m = -inf, l = 0 (``empty_state``)
    q       (B, H, n, D): global rows q_start .. q_start + n
    k, v    (B, Hkv, c, D), (B, Hkv, c, Dv): global rows k_start .. k_start + c
    attend  attend(q, k, v, offset) -> (out_b, stats_b) or None; query i sees key j iff
            j <= i + offset
    returns (out, m, l) over the keys of state and of this block
    """
    raise NotImplementedError  # your code here


# -- the harness: two ranks as lists, the "send" a rotation of the list ------------------------


def run_ring(q, k, v, layout="contiguous", step=None):
    """Causal attention of the whole sequence by a ring of P simulated ranks.

    q (B, H, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv): the whole sequence, cut into each
    rank's rows by ``layout`` ("contiguous" or "zigzag": sharding.positions) -> out
    (B, H, N, Dv), lse (B, H, N) of the whole, each rank's rows put back in place.
    ``step``: the function called for each (query chunk, key chunk) pair (your ring_step).
    """
    step = step or ring_step
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    whole = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=True)
    # the library's Ring (microattn/distributed/ring.py) for each rank's chunks and kernel
    # calls; comm only needs size and rank here: nothing is sent
    rings = [Ring(types.SimpleNamespace(size=P, rank=r), layout, N // P, whole, reference,
                  (B, H, Hkv, D, Dv)) for r in range(P)]
    rows = [np.concatenate([np.arange(a, a + n) for a, n, _ in ring.chunks(r)]) for r, ring in enumerate(rings)]
    held = [(k[:, :, rows[r]], v[:, :, rows[r]], rings[r].chunks(r)) for r in range(P)]  # K/V + where it lies
    states = [{off: empty_state((B, H, n), Dv, q.dtype) for _, n, off in rings[r].chunks(r)} for r in range(P)]
    for t in range(P):  # step t: rank r holds the block of rank (r - t) mod P
        for r in range(P):
            q_r = q[:, :, rows[r]]
            k_blk, v_blk, block_chunks = held[r]
            for qa, qlen, qoff in rings[r].chunks(r):
                for ka, klen, koff in block_chunks:
                    states[r][qoff] = step(states[r][qoff], q_r[:, :, qoff:qoff + qlen], k_blk[:, :, koff:koff + klen],
                                           v_blk[:, :, koff:koff + klen], qa, ka, rings[r].attend(qa, qlen, ka, klen))
        held = [held[(r - 1) % P] for r in range(P)]  # every rank sends its block to rank r + 1
    out = np.zeros((B, H, N, Dv), dtype=q.dtype)
    lse = np.zeros((B, H, N), dtype=q.dtype)
    for r in range(P):
        for qa, qlen, qoff in rings[r].chunks(r):
            o, m, l = states[r][qoff]
            out[:, :, qa:qa + qlen] = o
            lse[:, :, qa:qa + qlen] = lse_of(np.stack([m, l]))
    return out, lse
