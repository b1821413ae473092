"""Exercise 7 (a one-row-per-thread CUDA forward) graded where it runs: under the simulator
(or on a GPU). The solution passes, the blank stub fails saying what to do, and a step that
forgets to rescale acc is told so. (tests/exercises grades the other exercises and checks
that the CLI grades this one in a child process.)"""

import pytest

from microattn import exercises
from microattn.exercises import ex07_cuda_row_forward as EX07
from microattn.exercises import grading
from tests.exercises.learner import filled_stub

STEP = """\
    m_new = m_i
    for jj in range(s_row.shape[0]):
        if s_row[jj] > m_new:
            m_new = s_row[jj]
    if m_new == -math.inf:
        for jj in range(s_row.shape[0]):
            s_row[jj] = 0.0
        return m_i, l_i
    alpha = math.exp(m_i - m_new)
    l_new = alpha * l_i
    for d in range(acc.shape[0]):
        acc[d] *= alpha
    for jj in range(s_row.shape[0]):
        p = math.exp(s_row[jj] - m_new)
        s_row[jj] = p
        l_new += p
    return m_new, l_new
"""




def test_solution_passes():
    done = EX07.check(EX07.solution())
    assert sum("the kernel on" in line for line in done) == len(EX07.KERNEL_CASES)


def test_blank_stub_fails_saying_what_to_do():
    with pytest.raises(grading.Failure, match="`online_softmax_step` is not written yet"):
        EX07.check(grading.load(exercises.stub_path(EX07)))


def test_a_written_step_passes_in_the_kernel(tmp_path):
    assert EX07.check(filled_stub(tmp_path, EX07, STEP))[-1].startswith("the kernel on")


@pytest.mark.parametrize(("body", "diagnosis"), [
    (STEP.replace("        acc[d] *= alpha\n", "        pass\n"), "acc was not rescaled"),
    (STEP.replace("math.exp(s_row[jj] - m_new)", "math.exp(s_row[jj]) if s_row[jj] < 700 else math.inf"),
     "without subtracting the max"),
], ids=["acc-not-rescaled", "no-max-subtracted"])
def test_mistakes_are_named(tmp_path, body, diagnosis):
    with pytest.raises(grading.Failure, match=diagnosis):
        EX07.check(filled_stub(tmp_path, EX07, body))
