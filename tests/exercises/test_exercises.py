"""Every exercise graded twice: the library's own solution passes, the blank stub fails and
says what to do. Exercises that need the CUDA simulator are graded in tests/cuda."""

import inspect
import types
from pathlib import Path

import numpy as np
import pytest

from microattn import exercises
from microattn.demo.cli import main
from microattn.exercises import grading

ON_THIS_PROCESS = [ex for ex in exercises.all_exercises() if not getattr(ex, "ENV", None)]


def ids(ex):
    return f"{ex.NUMBER:02d}-{ex.SLUG}"


def test_numbered_in_order_with_a_stub_each():
    numbers = [ex.NUMBER for ex in exercises.all_exercises()]
    assert numbers == list(range(1, len(exercises.ORDER) + 1))
    for ex in exercises.all_exercises():
        assert exercises.stub_path(ex).is_file(), ex.FILE
        assert ex.HINTS and ex.TITLE and ex.READ


@pytest.mark.parametrize("ex", ON_THIS_PROCESS, ids=ids)
def test_solution_passes(ex):
    done = ex.check(ex.solution())
    assert done and all(isinstance(line, str) for line in done)


@pytest.mark.parametrize("ex", ON_THIS_PROCESS, ids=ids)
def test_blank_stub_fails_saying_what_to_do(ex):
    stub = grading.load(exercises.stub_path(ex))
    with pytest.raises(grading.Failure, match="is not written yet: it still raises NotImplementedError"):
        ex.check(stub)


@pytest.mark.parametrize("ex", exercises.all_exercises(), ids=ids)
def test_stub_defines_what_the_solution_names(ex):
    stub = grading.load(exercises.stub_path(ex))
    for name in vars(ex.solution()):
        assert hasattr(stub, name), f"stub {ex.FILE} lacks {name}"


def test_the_learners_path_has_every_exercise_and_picture():
    root = Path(__file__).resolve().parents[2]
    path = (root / "docs" / "learn.md").read_text()
    for ex in exercises.all_exercises():
        assert f"**Exercise {ex.NUMBER}**" in path, ex.SLUG
        assert f"$ microattn exercise check {ex.NUMBER} " in path, f"no transcript of exercise {ex.NUMBER}"
    for picture in (root / "docs" / "pictures").glob("*.png"):
        assert f"(pictures/{picture.name})" in path, picture.name


def test_compare_names_the_worst_element_and_the_usual_cause():
    expected = np.arange(6.0).reshape(2, 3)
    got = expected.copy()
    got[1, 2] = -1.0
    got[0, 1] = 1.5
    with pytest.raises(grading.Failure) as failure:
        grading.compare("dX", got, expected, meaning=[(lambda g, e: True, "a sign slipped")])
    assert str(failure.value) == ("dX[1, 2] is -1, expected 5 (2 of 6 elements are off).\n"
                                  "What this usually means: a sign slipped")
    with pytest.raises(grading.Failure, match=r"dX has shape \(3, 2\), expected \(2, 3\)"):
        grading.compare("dX", expected.T, expected)
    with pytest.raises(grading.Failure, match="dX is None: did you forget a `return`"):
        grading.compare("dX", None, expected)
    grading.compare("dX", expected + 1e-12, expected)  # within tolerance


def test_learner_errors_become_failures(tmp_path):
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(grading.Failure, match="broken.py does not parse: line 1"):
        grading.load(tmp_path / "broken.py")
    (tmp_path / "raises.py").write_text("def f(x):\n    return x[5]\n")
    module = grading.load(tmp_path / "raises.py")
    with pytest.raises(grading.Failure, match=r"`f` raised IndexError: .*raises.py, line 2"):
        grading.call(module, "f", [1])
    with pytest.raises(grading.Failure, match="your file defines no `g`"):
        grading.call(module, "g")
    (tmp_path / "exits.py").write_text("import sys\ndef f():\n    sys.exit(3)\n")
    with pytest.raises(grading.Failure, match=r"`f` called sys.exit\(3\): return a value instead"):
        grading.call(grading.load(tmp_path / "exits.py"), "f")
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(grading.Failure, match="importing exits_on_import.py called sys.exit"):
        grading.load(tmp_path / "exits_on_import.py")


def _solution_file(ex) -> str:
    """A learner's file that answers with the library's own functions (imports, not copies)."""
    lines = []
    for name, value in vars(ex.solution()).items():
        module = inspect.getmodule(value) if not isinstance(value, types.ModuleType) else None
        lines.append(f"from {module.__name__} import {value.__name__} as {name}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("ex", ON_THIS_PROCESS, ids=ids)
def test_cli_start_fail_fix_pass(ex, tmp_path, capsys):
    assert main(["exercise", "list"]) == 0
    assert ex.TITLE in capsys.readouterr().out
    assert main(["exercise", "start", str(ex.NUMBER), str(tmp_path)]) == 0
    assert (tmp_path / ex.FILE).read_text() == exercises.stub_path(ex).read_text()
    assert main(["exercise", "check", str(ex.NUMBER), str(tmp_path)]) == 1
    assert "not written yet" in capsys.readouterr().out
    assert main(["exercise", "start", str(ex.NUMBER), str(tmp_path)]) == 1  # never overwrites work
    assert "exists already" in capsys.readouterr().err
    (tmp_path / ex.FILE).write_text(_solution_file(ex))
    assert main(["exercise", "check", str(ex.NUMBER), str(tmp_path)]) == 0
    assert "passed" in capsys.readouterr().out
    assert main(["exercise", "hint", str(ex.NUMBER)]) == 0
    assert ex.HINTS[0] in capsys.readouterr().out


def test_cli_start_into_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["exercise", "start", "1", str(tmp_path / "afile")]) == 1
    assert "afile is a file: give a directory" in capsys.readouterr().err


def test_cli_bad_numbers(tmp_path, capsys):
    assert main(["exercise", "check", str(len(exercises.ORDER) + 1), str(tmp_path)]) == 1
    assert "there is no exercise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["exercise", "hint", "zero"])
