"""The checkpoint file: round trip, atomic save, leftovers of killed saves, unreadable
files, and crafted checkpoints that a run must refuse with a clear message."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from microattn.demo import checkpoint, loop
from microattn.demo.checkpoint import CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from microattn.demo.loop import Run
from tests.demo.tiny import tiny_run


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """The state of a tiny run after 2 steps, as a checkpoint holds it."""
    out = tmp_path_factory.mktemp("run")
    run = tiny_run(steps=2)
    loop.train(run, out)
    return load_checkpoint(out)


# ----------------------------------------------------------------------------- the format, atomic save


def test_checkpoint_round_trip_keeps_types(tmp_path):
    state = {
        "config": '{"a": 1}', "step": 7, "lr": 0.1 + 0.2, "none": None, "flag": True,
        "betas": (0.9, 0.99), "losses": [1.5, np.float32(2.25)],
        "by_index": {0: {"step": 3, "exp_avg": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "scalar": np.int64(5),
    }
    path = save_checkpoint(tmp_path / "state.npz", state)
    loaded = load_checkpoint(path)
    assert loaded["config"] == '{"a": 1}' and loaded["step"] == 7 and loaded["lr"] == 0.1 + 0.2
    assert loaded["none"] is None and loaded["flag"] is True and loaded["betas"] == (0.9, 0.99)
    assert loaded["losses"][1] == np.float32(2.25) and loaded["losses"][1].dtype == np.float32
    assert list(loaded["by_index"]) == [0]
    np.testing.assert_array_equal(loaded["by_index"][0]["exp_avg"], state["by_index"][0]["exp_avg"])
    assert loaded["by_index"][0]["exp_avg"].dtype == np.float32
    assert loaded["scalar"] == 5 and loaded["scalar"].dtype == np.int64


def test_a_failed_save_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    run = tiny_run()
    loop.train(run, tmp_path)  # a good checkpoint at step 12

    def savez_that_dies(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_that_dies)
    run.step = 99
    with pytest.raises(OSError, match="disk full"):
        run.save(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]
    assert int(load_checkpoint(tmp_path)["step"]) == 12


def test_a_checkpoint_path_may_name_any_file(tmp_path):
    """Before: --checkpoint run.ckpt (a file not ending in .npz) looked for run.ckpt/checkpoint.npz."""
    path = save_checkpoint(tmp_path / "run.ckpt", {"step": 3})
    assert load_checkpoint(path) == {"step": 3}


# ----------------------------------------------------------------------------- leftovers of killed saves


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from microattn.demo import checkpoint
    handle, temp_path = checkpoint._create_locked_temp_file(Path(sys.argv[1]))
    os.write(handle, b"PK half a checkpoint")
    print(temp_path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the save
""")


def killed_save(target):
    """Run a save in a child process and kill -9 it mid-write; returns the temp file it left."""
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftover = target.parent / os.path.basename(result.stdout.strip())
    assert leftover.exists()
    return leftover


@pytest.mark.parametrize("next_use", ["save", "load"])
def test_the_next_save_or_load_removes_what_a_killed_save_left(tmp_path, next_use):
    """Before: checkpoint.npz.*.tmp files of killed saves stayed forever."""
    target = tmp_path / "checkpoint.npz"
    save_checkpoint(target, {"step": 1})
    leftovers = [killed_save(target), killed_save(target)]
    old_style = tmp_path / "checkpoint.npz.k2x_9qab.tmp"  # a tempfile.mkstemp name, as earlier versions wrote
    old_style.write_bytes(b"PK")
    user_files = ["checkpoint.npz.backup", "checkpoint.npz.my-notes.tmp", "other.npz.abcdefgh.tmp",
                  "checkpoint.npz.abcdefgh.tmp.keep"]
    for name in user_files:
        (tmp_path / name).write_bytes(b"user data")
    if next_use == "save":
        save_checkpoint(target, {"step": 2})
    else:
        assert load_checkpoint(target) == {"step": 1}
    assert not any(path.exists() for path in [*leftovers, old_style])
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.npz", *user_files])


def test_a_save_in_progress_is_not_a_leftover(tmp_path):
    """Another process saving the same checkpoint holds its temp file's lock: leave it be."""
    target = tmp_path / "checkpoint.npz"
    handle, temp_path = checkpoint._create_locked_temp_file(target)
    try:
        assert remove_stale_temp_files(target) == [] and temp_path.exists()
    finally:
        os.close(handle)  # the save "dies" without renaming: now it is a leftover
    assert remove_stale_temp_files(target) == [temp_path] and not temp_path.exists()


def test_a_killed_training_run_leaves_nothing_after_the_next_save(tmp_path):
    run = tiny_run(steps=2)
    loop.train(run, tmp_path)
    killed_save(tmp_path / "checkpoint.npz")
    resumed = Run.load(tmp_path)
    resumed.config.steps = 4
    loop.train(resumed, tmp_path)
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


# ----------------------------------------------------------------------------- unreadable files


def write_npz(path, **arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)


UNREADABLE = {
    "empty": (lambda path: path.write_bytes(b""), "not an .npz (zip) archive"),
    "garbage": (lambda path: path.write_bytes(b"not a zip file"), "not an .npz (zip) archive"),
    "a .npy": (lambda path: np.save(open(path, "wb"), np.ones(3)), "not an .npz (zip) archive"),
    "pickled objects": (lambda path: write_npz(path, a=np.array([{"x": 1}], dtype=object)), "Python objects"),
    "no skeleton": (lambda path: write_npz(path, a=np.ones(3)), "no __skeleton__ entry"),
    "skeleton not text": (lambda path: write_npz(path, __skeleton__=np.ones(3)), "not a JSON string"),
    "skeleton not JSON": (lambda path: write_npz(path, __skeleton__=np.array("{oops")), "malformed"),
    "skeleton names a missing array": (
        lambda path: write_npz(path, __skeleton__=np.array(json.dumps({"array": "a7", "scalar": False}))),
        "malformed"),
    "skeleton of an unknown node": (
        lambda path: write_npz(path, __skeleton__=np.array(json.dumps({"set": [1, 2]}))), "malformed"),
    "skeleton a bare list": (lambda path: write_npz(path, __skeleton__=np.array("[1, 2]")), "malformed"),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_files_say_not_a_checkpoint_or_corrupt(kind, tmp_path):
    """Before: NumPy's advice to pass allow_pickle, or a bare KeyError / AttributeError."""
    make, reason = UNREADABLE[kind]
    path = tmp_path / "checkpoint.npz"
    make(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a microattn checkpoint, or it is corrupt: ") and reason in message
    assert "allow_pickle" not in message and "\n" not in message


def test_a_truncated_checkpoint_is_corrupt(tmp_path, saved_state):
    path = save_checkpoint(tmp_path / "checkpoint.npz", saved_state)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a microattn checkpoint, or it is corrupt"):
        load_checkpoint(path)


def test_a_directory_where_the_checkpoint_should_be(tmp_path):
    (tmp_path / "checkpoint.npz").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_loading_a_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Run.load(tmp_path)


# ----------------------------------------------------------------------------- crafted run states


def first_parameter(state):
    return next(iter(state["model"]))


def crafted(change):
    def apply(state):
        state = {**state, "model": dict(state["model"]), "optimizer": {
            "hyperparameters": dict(state["optimizer"]["hyperparameters"]), "state": dict(state["optimizer"]["state"])}}
        change(state)
        return state
    return apply


def with_config(**fields):
    def change(state):
        config = json.loads(state["config"])
        config.update(fields)
        state["config"] = json.dumps(config)
    return crafted(change)


CRAFTED = {
    "float64 params": (crafted(lambda s: s["model"].update(
        {first_parameter(s): s["model"][first_parameter(s)].astype(np.float64)})), "is float64, expected float32"),
    "missing parameter": (crafted(lambda s: s["model"].pop(first_parameter(s))), "missing token_embedding.weight"),
    "extra parameter": (crafted(lambda s: s["model"].update(extra=np.ones(2, np.float32))), "unexpected 'extra'"),
    "wrong shape": (crafted(lambda s: s["model"].update(
        {first_parameter(s): np.zeros((2, 2), np.float32)})), "has shape (2, 2), expected"),
    "parameter not an array": (crafted(lambda s: s["model"].update({first_parameter(s): 3.0})), "should be an array"),
    "no config": (crafted(lambda s: s.pop("config")), "missing config"),
    "an extra entry": (crafted(lambda s: s.update(notes="hi")), "unexpected 'notes'"),
    "config not a string": (crafted(lambda s: s.update(config={"task": "recall"})), "'config' entry should be a str"),
    "config not a dict": (crafted(lambda s: s.update(config="[1, 2, 3]")), "expected a JSON object"),
    "config not JSON": (crafted(lambda s: s.update(config="{task: recall")), "not a valid TrainConfig"),
    "config steps a string": (with_config(steps="12"), "steps must be an integer, got '12' (str)"),
    "config lr inf": (with_config(lr=float("inf")), "lr must be a finite number > 0"),
    "config unknown field": (with_config(colour="red"), "does not know: colour"),
    "config unknown task option": (with_config(task_options={"pairs": 3}), "has no option 'pairs'"),
    "config too many heads": (with_config(num_heads=3), "not a multiple of num_heads"),
    "step negative": (crafted(lambda s: s.update(step=-1)), "'step' entry should be a non-negative integer"),
    "losses do not match the steps": (crafted(lambda s: s.update(losses=np.ones(5))), "one float loss per step"),
    "optimizer lr nan": (crafted(lambda s: s["optimizer"]["hyperparameters"].update(lr=float("nan"))),
                         "optimizer state does not fit this run: AdamW: lr must be a finite number"),
    "optimizer state of a missing parameter": (crafted(lambda s: s["optimizer"]["state"].update({999: {}})),
                                               "names parameter 999"),
    "schedule not a dict": (crafted(lambda s: s.update(schedule=[1, 2])), "'schedule' entry should be a dict"),
    "schedule min_lr nan": (crafted(lambda s: s.update(schedule={**s["schedule"], "min_lr": float("nan")})),
                            "schedule state does not fit this run: CosineSchedule: min_lr"),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_checkpoints_are_refused_with_what_was_wrong(kind, tmp_path, saved_state):
    """Before: tracebacks (TypeError, AttributeError, KeyError) or a bare 'config'."""
    change, expected = CRAFTED[kind]
    path = save_checkpoint(tmp_path / "checkpoint.npz", change(saved_state))
    with pytest.raises(CheckpointError) as error:
        Run.load(tmp_path)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message, message


def test_a_state_that_is_not_a_dict(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.npz", [1, 2, 3])
    with pytest.raises(CheckpointError, match="expected the state of a run"):
        Run.load(tmp_path)


def test_the_saved_state_itself_loads(tmp_path, saved_state):
    save_checkpoint(tmp_path / "checkpoint.npz", saved_state)
    assert Run.load(tmp_path).step == 2
