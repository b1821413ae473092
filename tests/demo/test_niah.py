"""microattn niah: needles placed at a depth, the grid on a tiny checkpoint, the command."""

import numpy as np
import pytest

from microattn.demo import niah, plots
from microattn.demo.loop import Run, TrainConfig
from microattn.demo.tasks import make_task
from tests.demo.command import run_cli, status_of

TINY = ["--embed-dim", "16", "--heads", "2", "--batch-size", "4", "--backend", "reference"]


@pytest.fixture(scope="module")
def needle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    assert run_cli("train", "--task", "needle", "--out", out, "--steps", 2, "--eval-examples", 4,
                   "--no-progress", *TINY) == 0
    return out


@pytest.mark.parametrize("seq_len", [3, 10, 40, 97])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_batch_at_puts_the_needle_at_the_depth(seq_len, depth):
    task = make_task("needle")  # trained 32+ back; batch_at may place it anywhere
    batch = task.batch_at(np.random.default_rng(0), 16, depth, seq_len)
    at = task.needle_position(depth, seq_len)
    assert at == 1 + round(depth * (seq_len - 3))
    assert batch.inputs.shape == (16, seq_len)
    assert ((batch.inputs == task.marker).sum(axis=1) == 1).all()
    assert (batch.inputs[:, at - 1] == task.marker).all()
    assert (batch.inputs[:, -1] == task.query_token).all()
    assert (batch.targets[:, -1] == batch.inputs[:, at]).all()
    assert (batch.targets[:, :-1] == -100).all()
    assert np.array_equal(task.solve(batch.inputs), batch.targets)


def test_depth_runs_from_the_start_to_just_before_the_query():
    task = make_task("needle")
    assert task.needle_position(0, 40) == 1  # marker at 0
    assert task.needle_position(1, 40) == 38  # "?" at 39


@pytest.mark.parametrize("depth, seq_len, message", [(1.5, 40, r"depth must be a number in \[0, 1\]"),
                                                     (-0.1, 40, "depth must be"), (0.5, 2, "at least 3 tokens")])
def test_batch_at_refuses_impossible_layouts(depth, seq_len, message):
    with pytest.raises(ValueError, match=message):
        make_task("needle").batch_at(np.random.default_rng(0), 2, depth, seq_len)


def test_learned_positions_stop_at_max_len():
    run = Run.create(TrainConfig(task="needle", task_options={"seq_len": 12, "min_distance": 4}, rope=False,
                                 embed_dim=16, num_heads=2, backend="reference"))
    grid = niah.evaluate_grid(run, "learned", depths=(0, 1), lengths=(8, 12, 16), examples=3)
    assert grid.lengths == (8, 12) and grid.dropped == (16,) and grid.accuracy.shape == (2, 2)
    assert "not run: lengths 16" in niah.format_grid(grid)


def test_niah_on_a_checkpoint_prints_the_table_and_draws_the_heatmap(needle_run, tmp_path, capsys):
    assert run_cli("niah", "--checkpoint", needle_run, "--depths", "0,0.5,1", "--lengths", "8,48",
                   "--examples", 5, "--out-dir", tmp_path) == 0
    printed = capsys.readouterr().out
    assert "depth \\ length" in printed and "100%" in printed and "48" in printed
    if plots.pyplot() is not None:
        assert (tmp_path / "niah-exact.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_table_is_printed_with_a_note(needle_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "pyplot", lambda: None)
    assert run_cli("niah", "--checkpoint", needle_run, "--depths", "0", "--lengths", "8", "--examples", 2,
                   "--out-dir", tmp_path) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_train_models_trains_once_then_reuses(tmp_path):
    said = []
    first = niah.train_models(tmp_path, ["window"], steps=2, batch_size=2, progress=False, say=said.append)
    second = niah.train_models(tmp_path, ["window"], steps=2, batch_size=2, progress=False, say=said.append)
    assert first == second == {"window": tmp_path / "window"}
    assert "trained 2 steps" in said[0] and "reusing" in said[1]
    with pytest.raises(ValueError, match="holds another run"):
        niah.train_models(tmp_path, ["window"], steps=3, batch_size=2, progress=False, say=said.append)


@pytest.mark.parametrize("argv, status, message", [
    (["--examples", "0"], 2, "expected a positive integer"),
    (["--depths", "0,x"], 2, "expected a number >= 0"),
    (["--depths", "0,2"], 1, "depths must be numbers in [0, 1]"),
    (["--lengths", "2,8"], 1, "lengths must be integers >= 3"),
    (["--checkpoint", "RUN", "--train", "X"], 1, "not both"),
    (["--checkpoint", "RUN", "--variants", "exact"], 1, "--variants picks the models --train trains"),
])
def test_bad_arguments_are_one_line(argv, status, message, needle_run, capsys):
    argv = [str(needle_run) if a == "RUN" else a for a in argv]
    assert status_of("niah", *argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("microattn: error: ") and message in err and len(err.splitlines()) == 1


def test_a_run_of_another_task_is_refused(tmp_path, capsys):
    assert run_cli("train", "--out", tmp_path, "--steps", 1, "--eval-examples", 2, "--no-progress", *TINY) == 0
    capsys.readouterr()
    assert run_cli("niah", "--checkpoint", tmp_path) == 1
    assert "learned the recall task; niah needs a needle run" in capsys.readouterr().err
