"""Two threads sharing one job at a time, without waking anyone: a claim board.

numba's parallel regions (``prange``) start through its threading layer. On these 2-core
VMs the ``workqueue`` layer costs ~0.12 ms per region on a quiet machine (its workers
sleep, and a sleeping vCPU takes that long to wake), the ``omp`` layer ~1.6 us quiet but
~5 ms under load (its workers spin at every barrier while the cores are taken); measured
with an empty two-iteration ``prange``. A decoding step of the demo's model is ~30
matrix-vector products of 5-130 us each: either layer costs more than it saves.

This board lets a second thread join such work when it is there to join, and never makes
anyone wait for a thread that is not. One thread (the *owner*) publishes a job cut into
``n`` chunks; both threads claim chunks with a compare-and-swap and count them done; the
owner returns once all ``n`` are done. A helper that is asleep, descheduled or absent
claims nothing, and the owner does every chunk itself: the result is the same (each chunk
computed exactly once, by whoever claimed it), only the time changes. The one wait is for
a chunk the helper has claimed and is computing.

The board is an int64 array (``BOARD`` slots)::

    CLAIM  (seq << 32) | next chunk      the job's number and the next unclaimed chunk
    DONE   chunks finished of this job
    N      the job's chunks              JOB    what the job is (its owner's meaning)
    ACTIVE 1 while a helper is inside ``serve``; STOP set to ask it out

The owner first closes the board, CLAIM = (seq << 32) | all ones (the new number, no
chunk left to claim), then writes N and JOB, zeroes DONE, and stores CLAIM = (seq << 32):
publishing is that last atomic store, and the helper reads N and JOB only after seeing the
new seq. Closing first matters: the last job's CLAIM, (seq - 1, n), exhausted, must not
stay there while N changes, or a helper that read it and then the new, larger N would
claim chunk n of the old seq (seen in tests/kernels/test_team.py: the same chunk computed
twice, or one that does not exist, and DONE counted once too often, which lets the owner
go on while a chunk is still being written). A
claim is a compare-and-swap of CLAIM from (seq, i) to (seq, i + 1): it can succeed only
while the job is still the current one, so a helper that read a job's fields and was
then overtaken (the owner finished it alone and published the next) fails its claim and
never computes with stale fields. Sequence numbers only grow.

Atomics are LLVM's ``cmpxchg`` / ``atomicrmw`` / ``load atomic``, sequentially consistent
(``_atomic_*`` intrinsics below); spinning uses the ``pause`` instruction, and after
``SPINS_BEFORE_YIELD`` pauses ``sched_yield`` so a waiting thread gives its core away on
a busy machine.
"""

from __future__ import annotations

import platform

import numpy as np

from ._compile import numba

# slot indices, one 64-byte cache line apart, so that claiming (CLAIM) and counting
# (DONE) do not fight over one line; SEQ is the owner's last job number
CLAIM, DONE, N, JOB, ACTIVE, STOP, SEQ = (8 * slot for slot in range(7))
BOARD = 8 * 7
CHUNK_BITS = 32
SPINS_BEFORE_YIELD = 1 << 10
_LOW = (1 << CHUNK_BITS) - 1


def new_board() -> np.ndarray:
    return np.zeros(BOARD, dtype=np.int64)


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    def _slot_pointer(context, builder, array_type, array, index):
        ary = context.make_array(array_type)(context, builder, array)
        return cgutils.get_item_pointer(context, builder, array_type, ary, [index])

    @intrinsic
    def atomic_load(typingctx, board, index):
        """board[index], read atomically (an acquire point)."""
        def codegen(context, builder, signature, args):
            pointer = _slot_pointer(context, builder, signature.args[0], *args)
            return builder.load_atomic(pointer, "seq_cst", 8)
        return types.int64(board, index), codegen

    @intrinsic
    def atomic_store(typingctx, board, index, value):
        """board[index] = value, atomically (a release point)."""
        def codegen(context, builder, signature, args):
            pointer = _slot_pointer(context, builder, signature.args[0], args[0], args[1])
            builder.store_atomic(args[2], pointer, "seq_cst", 8)
            return context.get_dummy_value()
        return types.void(board, index, types.int64), codegen

    @intrinsic
    def atomic_add(typingctx, board, index, value):
        """board[index] += value atomically; returns the old value."""
        def codegen(context, builder, signature, args):
            pointer = _slot_pointer(context, builder, signature.args[0], args[0], args[1])
            return builder.atomic_rmw("add", pointer, args[2], "seq_cst")
        return types.int64(board, index, types.int64), codegen

    @intrinsic
    def compare_exchange(typingctx, board, index, expected, new):
        """If board[index] == expected, set it to new; whether it did (atomically)."""
        def codegen(context, builder, signature, args):
            pointer = _slot_pointer(context, builder, signature.args[0], args[0], args[1])
            pair = builder.cmpxchg(pointer, args[2], args[3], "seq_cst", "seq_cst")
            return builder.extract_value(pair, 1)
        return types.boolean(board, index, types.int64, types.int64), codegen

    _X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

    @intrinsic
    def pause(typingctx):
        """The x86 spin-wait hint (nothing elsewhere)."""
        def codegen(context, builder, signature, args):
            if _X86:  # LLVM's intrinsic for the instruction (numba's JIT takes no inline asm)
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()
        return types.void(), codegen

    # libc's sched_yield, called by name (a ctypes pointer would stop numba caching callers)
    _sched_yield = types.ExternalFunction("sched_yield", types.int32())

    @numba.njit(nogil=True)
    def relax(spins):
        """One step of a spin-wait: pause, and every SPINS_BEFORE_YIELD steps give the
        core away (a busy machine); returns the next spin count."""
        pause()
        spins += 1
        if spins % SPINS_BEFORE_YIELD == 0:
            _sched_yield()
        return spins

    @numba.njit(nogil=True)
    def publish(board, n, job):
        """Open the owner's next job, of ``n`` chunks, for claiming; returns its number."""
        seq = board[SEQ] + 1  # only the owner writes SEQ
        board[SEQ] = seq
        atomic_store(board, CLAIM, (seq << CHUNK_BITS) | _LOW)  # closed: a new seq, nothing left
        atomic_store(board, N, n)
        atomic_store(board, JOB, job)
        atomic_store(board, DONE, 0)
        atomic_store(board, CLAIM, seq << CHUNK_BITS)
        return seq

    @numba.njit(nogil=True)
    def claim(board, seq, n):
        """The next chunk of job ``seq`` for this thread, or -1 when none is left or the
        job is no longer current."""
        while True:
            current = atomic_load(board, CLAIM)
            chunk = current & _LOW
            if (current >> CHUNK_BITS) != seq or chunk >= n:
                return -1
            if compare_exchange(board, CLAIM, current, current + 1):
                return chunk

    @numba.njit(nogil=True)
    def chunk_done(board):
        atomic_add(board, DONE, 1)

    @numba.njit(nogil=True)
    def wait_done(board, n):
        """Spin until all ``n`` chunks of the current job are done."""
        spins = 0
        while atomic_load(board, DONE) < n:
            spins = relax(spins)

    @numba.njit(nogil=True)
    def next_job(board, seen, spins):
        """For a helper: (seq, n, job) of a job newer than ``seen`` with chunks left to
        claim, or (-1, 0, 0) after one spin step without one."""
        current = atomic_load(board, CLAIM)
        seq = current >> CHUNK_BITS
        if seq != seen and (current & _LOW) < atomic_load(board, N):
            return seq, atomic_load(board, N), atomic_load(board, JOB)
        relax(spins)
        return -1, 0, 0
else:  # without numba nothing here runs; the names exist so that importers import
    atomic_load = atomic_store = atomic_add = compare_exchange = pause = relax = None
    publish = claim = chunk_done = wait_done = next_job = None
