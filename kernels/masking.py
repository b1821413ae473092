"""Who may attend to whom, and which probabilities dropout keeps: written once.

These are plain Python functions on integers. They are used three ways, unchanged:

* by ``reference.py`` on NumPy integer arrays (broadcast over ``i[:, None]`` and ``j``),
* compiled for the CPU kernels with ``numba.njit(inline="always")`` (``cpu/``),
* compiled for the GPU kernels with ``numba.cuda.jit(device=True)`` (``cuda/``).

So they only use ``+ - * ^ & | >> >= <=``: no ``if``, no ``and``/``or`` (which do not
broadcast over arrays), no Python-only builtins. The exceptions are :func:`key_range` and
:func:`query_range`, which take scalar tile edges (never arrays) and may branch. All integer arithmetic is int64 with
explicit 32-bit masking, which gives the same bits in Python (unbounded ints), NumPy
(wrapping int64), numba on the CPU and numba on the GPU.
"""

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2**32 / golden ratio: keeps an all-zero input from mapping to 0


def in_band(i, j, offset, window_left, window_right):
    """True when key ``j`` lies in query ``i``'s band (causal and window folded together).

    ``d = j - (i + offset)`` is the key's distance from the query's diagonal; the pair is
    allowed iff ``-window_left <= d <= window_right``, a side of -1 being unbounded.

    Worked example: Nq = Nk = 6 (offset 0), window (2, 0): query 4 sees keys 2, 3, 4.
    With Nq = 2, Nk = 6 (offset 4) and causal (window (-1, 0)): query 0 sees keys 0..4.
    """
    d = j - (i + offset)
    return ((window_left < 0) | (d >= -window_left)) & ((window_right < 0) | (d <= window_right))


def key_range(i_start, i_stop, Nk, offset, window_left, window_right):
    """Keys [j_start, j_stop) that queries [i_start, i_stop) may see through the band: the
    key blocks a query block visits (band-skipping). Scalars only.

    Worked example: Nq = Nk = 8, window (2, 0) (causal sliding window of 3 keys);
    queries 4..5 see keys 2..5, so key_range(4, 6, 8, 0, 2, 0) == (2, 6).
    """
    j_start = 0
    j_stop = Nk
    if window_left >= 0:
        j_start = max(0, i_start + offset - window_left)
    if window_right >= 0:
        j_stop = min(Nk, i_stop - 1 + offset + window_right + 1)
    return j_start, max(j_start, j_stop)


def query_range(j_start, j_stop, Nq, offset, window_left, window_right):
    """Queries [i_start, i_stop) that may see some key in [j_start, j_stop) through the
    band: the query blocks a key block visits in the dK/dV pass. Scalars only."""
    i_start = 0
    i_stop = Nq
    if window_right >= 0:
        i_start = max(0, j_start - offset - window_right)
    if window_left >= 0:
        i_stop = min(Nq, j_stop - 1 - offset + window_left + 1)
    return i_start, max(i_start, i_stop)


def mix32(x):
    """A 32-bit integer bijection with good avalanche (xor-shift-multiply, 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    x = x ^ (x >> 16)
    return x


def dropout_bits(seed_lo, seed_hi, b, h, i, j):
    """Counter-based hash of (seed, b, h, i, j) to a uniform 32-bit integer.

    Each coordinate is absorbed by ``x = mix32(x + GOLDEN32 + c)``; since ``mix32`` is a
    bijection, two counters that differ in one coordinate never share a state after it.
    ``h`` is the query head, ``i`` the query index (0..Nq-1), ``j`` the key index.
    """
    x = mix32((seed_lo + GOLDEN32) & MASK32)
    x = mix32((x + GOLDEN32 + seed_hi) & MASK32)
    x = mix32((x + GOLDEN32 + b) & MASK32)
    x = mix32((x + GOLDEN32 + h) & MASK32)
    x = mix32((x + GOLDEN32 + i) & MASK32)
    x = mix32((x + GOLDEN32 + j) & MASK32)
    return x


def keep(seed_lo, seed_hi, b, h, i, j, threshold):
    """Dropout keeps element (b, h, i, j) iff its hash is >= threshold = round(p * 2**32)."""
    return dropout_bits(seed_lo, seed_hi, b, h, i, j) >= threshold
