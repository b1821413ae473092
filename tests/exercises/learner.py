"""A learner's file, written by a test: the stub filled in, or a whole file; and the check
that grading it fails with the expected diagnosis."""

import textwrap

import pytest

from microattn import exercises
from microattn.exercises import grading


def filled_stub(tmp_path, ex, *answers):
    """The stub of ``ex`` with its ``raise NotImplementedError`` lines replaced, in order, by
    ``answers``, loaded as the learner's module. An answer of several lines goes in as it is
    (indented as written); a one-line answer is indented like the line it replaces, with
    ';' separating its statements."""
    lines, out, answer = exercises.stub_path(ex).read_text().splitlines(keepends=True), [], iter(answers)
    for line in lines:
        if not line.lstrip().startswith("raise NotImplementedError"):
            out.append(line)
            continue
        body = next(answer, None)
        assert body is not None, "fewer answers than blanks"
        if "\n" not in body.rstrip("\n"):
            indent = line[: len(line) - len(line.lstrip())]
            body = "".join(f"{indent}{part.strip()}\n" for part in body.split(";"))
        out.append(body)
    assert next(answer, None) is None, "more answers than blanks"
    path = tmp_path / ex.FILE
    path.write_text("".join(out))
    return grading.load(path)


def whole_file(tmp_path, ex, code):
    """The learner's file of ``ex`` written out whole (dedented), loaded as a module."""
    path = tmp_path / ex.FILE
    path.write_text(textwrap.dedent(code))
    return grading.load(path)


def fails_saying(ex, module, *phrases):
    """Grading ``module`` fails, and the message holds every one of ``phrases``."""
    with pytest.raises(grading.Failure) as failure:
        ex.check(module)
    for phrase in phrases:
        assert phrase in str(failure.value), str(failure.value)
