"""The training loop: config checks, steps, resume, interrupts, checkpoint cadence, progress."""

import json
import math
import os
import re
import signal

import numpy as np
import pytest

from microattn.demo import loop
from microattn.demo.checkpoint import load_checkpoint
from microattn.demo.loop import Run, TrainConfig
from tests.demo.tiny import TINY, tiny_run


def model_state(run):
    return run.model.state_dict()


def assert_same_state(a: Run, b: Run):
    assert a.step == b.step
    state_a, state_b = model_state(a), model_state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        np.testing.assert_array_equal(state_a[name], state_b[name], err_msg=name)


def test_training_lowers_the_loss():
    run = tiny_run(steps=40, lr=1e-2)
    result = loop.train(run)
    assert result.steps_done == 40 and not result.interrupted and result.checkpoint is None
    assert len(run.losses) == 40
    assert np.mean(run.losses[-5:]) < np.mean(run.losses[:5])


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = tiny_run()
    loop.train(straight)

    def interrupt_at_7(run, loss):
        if run.step == 7:
            raise KeyboardInterrupt

    first = tiny_run()
    result = loop.train(first, tmp_path, on_step=interrupt_at_7)
    assert result.interrupted and result.steps_done == 7
    assert int(load_checkpoint(tmp_path)["step"]) == 7

    resumed = Run.load(tmp_path)
    assert resumed.step == 7 and resumed.losses == straight.losses[:7]
    result = loop.train(resumed, tmp_path)
    assert result.steps_done == 5 and not result.interrupted
    assert resumed.losses == straight.losses  # exact float equality, every step
    assert_same_state(resumed, straight)
    assert resumed.optimizer.lr == straight.optimizer.lr


def test_sigint_stops_at_a_step_boundary_and_saves(tmp_path):
    def ctrl_c_at_3(run, loss):
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    run = tiny_run()
    result = loop.train(run, tmp_path, on_step=ctrl_c_at_3)
    assert result.interrupted and run.step == 3
    assert int(load_checkpoint(tmp_path)["step"]) == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back


def test_checkpoints_are_written_at_the_interval_and_at_the_end(tmp_path, monkeypatch):
    saved_steps = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint",
                        lambda path, state: saved_steps.append(state["step"]) or real_save(path, state))
    loop.train(tiny_run(), tmp_path)
    assert saved_steps == [5, 10, 12]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]


def test_loading_a_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Run.load(tmp_path)


def test_step_peak_memory_counts_something_and_leaves_no_gradients():
    run = tiny_run()
    assert loop.step_peak_memory(run) > 0
    assert all(p.grad is None for p in run.model.parameters())


@pytest.mark.parametrize("bad, message", [
    ({"attention": "sparse"}, "unknown attention"),
    ({"task": "sorting"}, "unknown task"),
    ({"steps": 0}, "steps"),
    ({"embed_dim": 30, "num_heads": 4}, "multiple"),
    ({"attention": "gqa", "num_heads": 4, "kv_heads": 3}, "kv_heads"),
    ({"warmup_steps": 50, "steps": 10}, "warmup_steps"),
    ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr must be a finite number"),
    ({"lr": math.inf}, "lr must be a finite number"),
    ({"min_lr": math.nan}, "min_lr"),
    ({"min_lr": -1e-4}, "min_lr"),
    ({"weight_decay": math.inf}, "weight_decay"),
    ({"grad_clip": math.nan}, "grad_clip"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"seed": -1}, "seed"),
    ({"task_options": {"num_pairs": 3, "pairs": 4}}, "has no option 'pairs'; its options are num_pairs"),
    ({"task_options": {"num_values": 0}}, "1 to 10 values"),
    ({"task_options": {"num_pairs": 2.5}}, "num_pairs must be an integer"),
])
def test_bad_configs_are_value_errors(bad, message):
    """Before: lr nan/inf, nan min_lr/weight_decay/grad_clip were accepted (and trained to
    NaN); unknown task options were a TypeError from deep inside the task."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**TINY, **bad})


@pytest.mark.parametrize("bad, message", [
    ({"steps": "12"}, "steps must be an integer, got '12' (str)"),
    ({"steps": True}, "steps must be an integer"),
    ({"lr": "0.1"}, "lr must be a number"),
    ({"rope": 1}, "rope must be true or false"),
    ({"task": 3}, "task must be a string"),
    ({"task_options": [1, 2]}, "task_options must be a dict"),
    ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
])
def test_config_fields_of_the_wrong_kind_are_type_errors(bad, message):
    """A config read back from a file can hold anything: before, a string for steps was a
    TypeError from a comparison, far from the field that caused it."""
    with pytest.raises(TypeError, match=re.escape(message)):
        TrainConfig(**{**TINY, **bad})


def test_config_json_round_trip_and_its_errors():
    config = TrainConfig(**TINY)
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="expected a JSON object"):
        TrainConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="fields this version does not know: colour"):
        TrainConfig.from_json(json.dumps({**TINY, "colour": "red"}))
    with pytest.raises(ValueError):
        TrainConfig.from_json("{not json")


def test_progress_bar_prints_one_final_line_when_not_a_terminal(capsys):
    import io

    stream = io.StringIO()
    bar = loop.ProgressBar(10, "exact", stream=stream)
    for step in range(1, 11):
        bar.update(step, 1.0 / step)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "10/10" in lines[0] and "loss 0.100" in lines[0]
