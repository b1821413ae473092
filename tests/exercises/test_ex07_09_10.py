"""Exercises 7, 9 and 10: the usual mistakes get the diagnosis that names them, and
exercise 7 (the CUDA simulator) is graded in a child process by the CLI.

The learner files are the stubs with their ``raise NotImplementedError`` lines replaced by
an answer written here as text (a right one, or one with a typical mistake). Exercise 7's
solution and mistakes run in tests/cuda/test_exercise_cuda.py, under the simulator."""

import subprocess
import sys

import pytest

from microattn import exercises
from microattn.demo.cli import main
from microattn.exercises import ex07_cuda_row_forward as EX07
from microattn.exercises import ex09_linear_prefix_sums as EX09
from microattn.exercises import ex10_ring_step as EX10
from microattn.exercises import grading
from tests.exercises.learner import filled_stub




# -- exercise 9: linear attention's prefix sums -------------------------------------------------

PREFIX = """\
    B, Hkv, Nk, D = kf.shape
    S = np.zeros((B, Hkv, Nk + 1, D, v.shape[3]))
    z = np.zeros((B, Hkv, Nk + 1, D))
    S[:, :, 1:] = np.cumsum(kf[..., :, None] * v[..., None, :], axis=2)
    z[:, :, 1:] = np.cumsum(kf, axis=2)
    seen = SEEN
    return expand_kv(S[:, :, seen], spec.group), expand_kv(z[:, :, seen], spec.group)
"""
LINEAR = """\
    qf = feature_map(q)
    S, z = prefix_states(feature_map(k), v, spec)
    num = np.einsum("bhid,bhide->bhie", qf, S)
    return num / (np.einsum("bhid,bhid->bhi", qf, z) + spec.eps)[..., None]
"""
RIGHT_SEEN = "keys_seen(spec) if spec.causal else np.full(spec.Nq, Nk)"


def test_ex09_a_written_answer_passes(tmp_path):
    ns = filled_stub(tmp_path, EX09, PREFIX.replace("SEEN", RIGHT_SEEN), LINEAR)
    assert len(EX09.check(ns)) == len(EX09.CASES)


@pytest.mark.parametrize(("seen", "linear", "diagnosis"), [
    ("np.full(spec.Nq, Nk)", LINEAR, "you summed over every key"),
    ("np.maximum(keys_seen(spec) - 1, 0)", LINEAR, "off by one: query i does not see its own key"),
    (RIGHT_SEEN, LINEAR.replace("return num / (", "return num  # / ("), "you forgot the normaliser"),
], ids=["not-causal", "off-by-one", "no-normaliser"])
def test_ex09_mistakes_are_named(tmp_path, seen, linear, diagnosis):
    ns = filled_stub(tmp_path, EX09, PREFIX.replace("SEEN", seen), linear)
    with pytest.raises(grading.Failure, match=diagnosis):
        EX09.check(ns)


# -- exercise 10: a ring step --------------------------------------------------------------------

RING = """\
    part = attend(q, k, v, OFFSET)
    if part is None:
        return state
    (out_a, m_a, l_a), (out_b, (m_b, l_b)) = state, part
    m = np.maximum(m_a, m_b)
    shift = np.where(m == -np.inf, 0.0, m)
    w_a, w_b = l_a * RESCALE_A, l_b * RESCALE_B
    l = w_a + w_b
    return (w_a[..., None] * out_a + w_b[..., None] * out_b) / np.where(l == 0, 1.0, l)[..., None], m, l
"""


def ring_answer(offset="q_start - k_start", rescale=("np.exp(m_a - shift)", "np.exp(m_b - shift)")):
    return [RING.replace("OFFSET", offset).replace("RESCALE_A", rescale[0]).replace("RESCALE_B", rescale[1])]


def test_ex10_a_written_answer_passes(tmp_path):
    done = EX10.check(filled_stub(tmp_path, EX10, *ring_answer()))
    assert any("zigzag" in line for line in done) and any("contiguous" in line for line in done)


@pytest.mark.parametrize(("answer", "diagnosis"), [
    (ring_answer(offset="0"), "the causal mask used local positions"),
    (ring_answer(rescale=("1.0", "1.0")), "merged without rescaling"),
], ids=["local-positions", "no-rescale"])
def test_ex10_mistakes_are_named(tmp_path, answer, diagnosis):
    with pytest.raises(grading.Failure, match=diagnosis):
        EX10.check(filled_stub(tmp_path, EX10, *answer))


# -- exercise 7: graded by the CLI in a child process with the simulator -----------------------


def test_ex07_registry_keeps_numba_cuda_out():
    """Listing every exercise (the main test process does) imports no numba.cuda."""
    code = ("import sys, microattn.exercises as e; e.all_exercises(); "
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not EX07.ENV, reason="a GPU is present: exercise 7 is graded in this process")
def test_ex07_cli_grades_the_blank_stub_in_a_child_process(tmp_path, capsys):
    assert exercises.exercise(EX07.NUMBER) is EX07
    assert main(["exercise", "start", str(EX07.NUMBER), str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["exercise", "check", str(EX07.NUMBER), str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "Exercise 7 (cuda_row_forward): not yet." in printed
    assert "`online_softmax_step` is not written yet" in printed
