"""Training loop, checkpoints, resume, interrupts, evaluation helpers."""

import os
import signal
import sys

import numpy as np
import pytest

from microattn import training
from microattn.training import Run, TrainConfig, load_checkpoint, save_checkpoint

# A model small enough that a dozen steps take well under a second.
TINY = dict(task="recall", task_options={"num_pairs": 3, "num_queries": 2, "num_keys": 6, "num_values": 5},
            embed_dim=16, num_heads=2, num_layers=2, batch_size=4, steps=12, checkpoint_every=5,
            backend="reference")


def tiny_run(**overrides) -> Run:
    return Run.create(TrainConfig(**{**TINY, **overrides}))


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
    result = training.train(run)
    assert result.steps_done == 40 and not result.interrupted and result.checkpoint is None
    assert len(run.losses) == 40
    assert np.mean(run.losses[-5:]) < np.mean(run.losses[:5])


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = tiny_run()
    training.train(straight)

    def interrupt_at_7(run, loss):
        if run.step == 7:
            raise KeyboardInterrupt

    first = tiny_run()
    result = training.train(first, tmp_path, on_step=interrupt_at_7)
    assert result.interrupted and result.steps_done == 7
    assert int(load_checkpoint(tmp_path)["step"]) == 7

    resumed = Run.load(tmp_path)
    assert resumed.step == 7 and resumed.losses == straight.losses[:7]
    result = training.train(resumed, tmp_path)
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
    result = training.train(run, tmp_path, on_step=ctrl_c_at_3)
    assert result.interrupted and run.step == 3
    assert int(load_checkpoint(tmp_path)["step"]) == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back


def test_checkpoints_are_written_at_the_interval_and_at_the_end(tmp_path, monkeypatch):
    saved_steps = []
    real_save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda path, state: saved_steps.append(state["step"]) or real_save(path, state))
    training.train(tiny_run(), tmp_path)
    assert saved_steps == [5, 10, 12]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]


def test_a_failed_save_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    run = tiny_run()
    training.train(run, tmp_path)  # a good checkpoint at step 12

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


def test_loading_a_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Run.load(tmp_path)


@pytest.mark.parametrize("attention", ["exact", "window", "linear", "gqa"])
def test_kv_cache_decoding_agrees_with_one_forward_pass(attention):
    run = tiny_run(attention=attention, window=3, kv_heads=1)
    training.train(run)
    batch = training.make_batch(run.task, 0, 0, 8, split="heldout")
    full = training.predict(run.model, batch.inputs)
    cached = training.predict(run.model, batch.inputs, use_cache=True)
    np.testing.assert_array_equal(full, cached)
    assert run.model.training  # predict restores the mode it found


def test_evaluate_scores_only_answer_tokens():
    run = tiny_run()
    accuracy = training.evaluate(run.model, run.task, seed=0, num_examples=64)
    assert 0.0 <= accuracy <= 1.0
    assert run.model.training


def test_head_ablation_restores_the_weights_and_reports_each_head():
    run = tiny_run(steps=30, lr=1e-2)
    training.train(run)
    before = model_state(run)
    with training.ablate_head(run.model, layer=1, head=0):
        weight = training.attention_layers(run.model)[1].out_proj.weight.data
        assert not weight[:, :8].any() and weight[:, 8:].any()  # head 0 of 2, head_dim 8
    after = model_state(run)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    baseline, drops = training.head_ablation(run.model, run.task, num_examples=32)
    assert drops.shape == (2, 2) and 0 <= baseline <= 1


def test_attention_maps_have_one_array_per_layer():
    run = tiny_run()
    inputs = training.make_batch(run.task, 0, 0, 1).inputs
    maps = training.attention_maps(run.model, inputs)
    N = run.task.seq_len
    assert [m.shape for m in maps] == [(1, 2, N, N)] * 2
    np.testing.assert_allclose(maps[0].sum(axis=-1), 1.0, rtol=1e-5)
    assert np.triu(maps[0][0, 0], k=1).max() == 0  # causal
    assert "forward" not in training.attention_layers(run.model)[0].__dict__  # wrapper removed


def test_step_peak_memory_counts_something_and_leaves_no_gradients():
    run = tiny_run()
    assert training.step_peak_memory(run) > 0
    assert all(p.grad is None for p in run.model.parameters())


def test_loss_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    note = training.save_loss_plot([3.0, 2.0, 1.0], tmp_path / "loss.png")
    assert "matplotlib" in note and not (tmp_path / "loss.png").exists()


def test_loss_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert training.save_loss_plot([3.0, 2.0, 1.0], tmp_path / "loss.png") is None
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad, message", [
    ({"attention": "sparse"}, "unknown attention"),
    ({"task": "sorting"}, "unknown task"),
    ({"steps": 0}, "steps"),
    ({"embed_dim": 30, "num_heads": 4}, "multiple"),
    ({"attention": "gqa", "num_heads": 4, "kv_heads": 3}, "kv_heads"),
    ({"warmup_steps": 50, "steps": 10}, "warmup_steps"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_configs_are_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**TINY, **bad})


def test_progress_bar_prints_one_final_line_when_not_a_terminal(capsys):
    import io

    stream = io.StringIO()
    bar = training.ProgressBar(10, "exact", stream=stream)
    for step in range(1, 11):
        bar.update(step, 1.0 / step)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "10/10" in lines[0] and "loss 0.100" in lines[0]
