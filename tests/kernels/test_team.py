"""kernels/cpu/team.py: the claim board the lean decoding step shares with its helper.
Each chunk of a job is claimed exactly once, a claim for a job that is no longer current
fails, and two threads claiming as fast as they can over many jobs split every job
without a chunk lost or done twice."""

import threading

import numba  # a dependency of the package: no skip when it is missing
import numpy as np
from microattn.kernels.cpu import team


def test_chunks_are_claimed_once_in_order():
    board = team.new_board()
    seq = team.publish(board, 3, 7)
    assert [team.claim(board, seq, 3) for _ in range(4)] == [0, 1, 2, -1]
    assert board[team.JOB] == 7 and board[team.N] == 3


def test_a_claim_for_an_older_job_fails():
    board = team.new_board()
    old = team.publish(board, 4, 0)
    new = team.publish(board, 4, 1)
    assert new > old
    assert team.claim(board, old, 4) == -1
    assert team.claim(board, new, 4) == 0


def test_next_job_sees_only_new_jobs_with_chunks_left():
    board = team.new_board()
    seq = team.publish(board, 2, 5)
    assert team.next_job(board, -1, 0) == (seq, 2, 5)
    assert team.next_job(board, seq, 0)[0] == -1  # already seen
    team.claim(board, seq, 2), team.claim(board, seq, 2)
    assert team.next_job(board, -1, 0)[0] == -1  # nothing left to claim


@numba.njit(nogil=True)
def _owner(board, counts, sizes, jobs):
    """Publish ``jobs`` jobs of sizes[job % len(sizes)] chunks and take chunks of each."""
    for job in range(jobs):
        n = sizes[job % sizes.shape[0]]
        seq = team.publish(board, n, job)
        while True:
            chunk = team.claim(board, seq, n)
            if chunk < 0:
                break
            counts[job, chunk] += 1
            team.chunk_done(board)
        team.wait_done(board, n)
    team.atomic_store(board, team.STOP, 1)


@numba.njit(nogil=True)
def _helper(board, counts, mine):
    """Take chunks of every new job until STOP; a chunk past the job's end (a claim with
    a stale N) is counted in the last column, where the test sees it."""
    seen, spins = -1, 0
    while team.atomic_load(board, team.STOP) == 0:
        seq, n, job = team.next_job(board, seen, spins)
        if seq < 0:
            spins += 1
            continue
        seen = seq
        while True:
            chunk = team.claim(board, seq, n)
            if chunk < 0:
                break
            counts[job, min(chunk, counts.shape[1] - 1)] += 1
            mine[0] += 1
            team.chunk_done(board)


def run_jobs(sizes, jobs, width):
    """(counts (jobs, width): how often each chunk was computed, the helper's share)."""
    board = team.new_board()
    counts = np.zeros((jobs, width), dtype=np.int64)  # one writer per cell: the claimer
    mine = np.zeros(1, dtype=np.int64)
    helper = threading.Thread(target=_helper, args=(board, counts, mine))
    helper.start()
    _owner(board, counts, np.asarray(sizes, dtype=np.int64), jobs)
    helper.join(timeout=60)
    assert not helper.is_alive()
    return counts, board


def test_two_threads_split_every_job_exactly():
    jobs, n = 3000, 16
    counts, board = run_jobs([n], jobs, n)
    assert (counts == 1).all()  # every chunk once: none lost, none twice
    assert board[team.DONE] == n


def test_jobs_of_different_sizes_are_split_exactly():
    """Jobs of 1, 2, 1, 3 chunks: a job the owner finished alone leaves the board showing
    its (seq, n) exhausted while the next job is being published; a helper that sees the
    next job's larger N there must not claim chunk n of the old seq (it would compute a
    chunk twice, or one that does not exist, and count DONE once too often)."""
    jobs = 20000
    sizes = np.array([1, 2, 1, 3], dtype=np.int64)
    counts, _ = run_jobs(sizes, jobs, 4)
    expected = np.zeros_like(counts)
    for job in range(jobs):
        expected[job, : sizes[job % 4]] = 1
    wrong = np.argwhere(counts != expected)
    assert not len(wrong), f"{len(wrong)} chunks claimed wrongly, e.g. (job, chunk) {wrong[:3].tolist()}"
