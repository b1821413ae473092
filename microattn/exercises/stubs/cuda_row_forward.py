"""Exercise 7: a CUDA forward with one query row per thread (numba.cuda, in the simulator).

    q (B, H, Nq, D)   k, v (B, Hkv, Nk, D / Dv)   out (B, H, Nq, Dv)   lse (B, H, Nq)

The kernel below (``attn_fwd_rows``, written out) gives every thread one query row i. The
thread walks over the keys BLOCK_N at a time: it computes the tile's scores
s_j = scale * q_i . k_j (-inf where the causal mask forbids key j) into a local array
``s_row``, hands them to ``online_softmax_step`` (yours), then adds p_j v_j into its ``acc``.
At the end out_i = acc / l_i and lse_i = m_i + log(l_i). What you write is the thread's
online softmax, the heart of rung 1 (microattn/kernels/cuda/flash.py), for one tile:

    m_new = max(m_i, max_j s_j)        alpha = exp(m_i - m_new)
    p_j   = exp(s_j - m_new)           (write p_j over s_j in s_row)
    l_new = alpha * l_i + sum_j p_j    acc[d] *= alpha for every d;   return m_new, l_new

In a CUDA thread there is no NumPy: loop over the entries (``for jj in range(s_row.shape[0])``)
and use ``math.exp``. Until a key has been allowed (m_new = -inf), change nothing and leave
p = 0: exp(-inf - (-inf)) is NaN. Grade it (the grader runs the kernel in numba's CUDA
simulator, NUMBA_ENABLE_CUDASIM=1, by itself; on a machine with a GPU, on the GPU):

    microattn exercise check 7 DIR        (DIR: the directory holding this file)
    microattn exercise hint 7             (if stuck)

To run the kernel yourself without a GPU, set the simulator before numba is imported:
``NUMBA_ENABLE_CUDASIM=1 python -c "import cuda_row_forward as c; ..."`` and call ``forward``.
"""

import functools
import math

THREADS = 8  # threads per block: each owns one query row
BLOCK_N = 4  # keys per tile: the scores a thread hands to online_softmax_step at once


def online_softmax_step(s_row, acc, m_i, l_i):
    """One thread's online-softmax step over one tile of its query row's scores.

    s_row: (BLOCK_N,) the tile's scores, -inf for a masked key; overwrite with p_j
    acc:   (Dv,)      sum of p_j v_j over the earlier tiles (against m_i); rescale in place
    m_i, l_i:         running max and running sum of exp(s - m_i) before this tile
    returns (m_new, l_new)
    """
    raise NotImplementedError  # your code here (loops and math.exp: this runs in a CUDA thread)


# -- the harness: device arrays, the launch, and the kernel around your step ---------------------


def forward(q, k, v, causal=False, scale=None, step=None):
    """out (B, H, Nq, Dv), lse (B, H, Nq) (float64) by ``attn_fwd_rows``; ``step`` defaults to
    ``online_softmax_step``. causal: query i sees keys j <= i + (Nk - Nq) (bottom-right)."""
    import numpy as np
    from numba import cuda  # here, not at the top: the simulator must be chosen first

    q, k, v = (np.ascontiguousarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Nq, D = q.shape
    Dv = v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = cuda.device_array((B, H, Nq, Dv), dtype=np.float64)
    lse = cuda.device_array((B, H, Nq), dtype=np.float64)
    grid = (math.ceil(Nq / THREADS), H, B)  # blocks of THREADS query rows, per head, per batch
    kernel = _kernel(step or online_softmax_step, Dv)
    kernel[grid, THREADS](cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), out, lse, scale, bool(causal))
    return out.copy_to_host(), lse.copy_to_host()


@functools.lru_cache(maxsize=None)
def _kernel(step, DV):
    """The kernel, compiled around ``step`` with the head dim Dv a compile-time constant."""
    global numba, cuda  # module globals: the simulator puts its own `cuda` in the kernel's globals
    import numba
    from numba import cuda

    online_softmax_step = cuda.jit(device=True)(step)

    def attn_fwd_rows(q, k, v, out, lse, scale, causal):
        s_row = cuda.local.array(BLOCK_N, numba.float64)  # this tile's scores, then p
        acc = cuda.local.array(DV, numba.float64)  # sum_j p_j v_j
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x  # this thread's query row
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        Nq, Nk, D = q.shape[2], k.shape[2], q.shape[3]
        h_kv = h // (q.shape[1] // k.shape[1])  # GQA: query head h reads kv head h // group
        if i >= Nq:
            return  # the last block's spare threads
        for d in range(DV):
            acc[d] = 0.0
        m_i = -math.inf
        l_i = 0.0
        last = min(Nk, i + 1 + Nk - Nq) if causal else Nk  # keys [0, last) are allowed
        for j0 in range(0, Nk, BLOCK_N):  # every tile (rung 1 skips the ones the band excludes)
            for jj in range(BLOCK_N):
                j = j0 + jj
                s = -math.inf
                if j < last:
                    s = 0.0
                    for d in range(D):
                        s += q[b, h, i, d] * k[b, h_kv, j, d]
                    s *= scale
                s_row[jj] = s
            m_i, l_i = online_softmax_step(s_row, acc, m_i, l_i)  # yours
            for jj in range(BLOCK_N):
                p = s_row[jj]
                if p != 0.0:
                    for d in range(DV):
                        acc[d] += p * v[b, h_kv, j0 + jj, d]
        for d in range(DV):  # a row that saw no key: l = 0, out 0 and lse -inf
            out[b, h, i, d] = acc[d] / l_i if l_i > 0.0 else 0.0
        lse[b, h, i] = m_i + math.log(l_i) if l_i > 0.0 else -math.inf

    return cuda.jit(attn_fwd_rows)
