"""Who may attend to whom, and which probabilities dropout keeps: written once.

These are plain Python functions on integers. They are used three ways, unchanged:

* by ``reference.py`` on NumPy integer arrays (broadcast over ``i[:, None]`` and ``j``),
* compiled for the CPU kernels with ``numba.njit(inline="always")`` (``cpu/``),
* compiled for the GPU kernels with ``numba.cuda.jit(device=True)`` (``cuda/``).

So they only use ``+ - * ^ & | >> >= <=``: no ``if``, no ``and``/``or`` (which do not
broadcast over arrays), no Python-only builtins. All integer arithmetic is int64 with
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
