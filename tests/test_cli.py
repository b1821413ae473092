"""The microattn command: every subcommand end to end, and its errors."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from microattn import cli, training

# A tiny model on a tiny recall task, so a CLI run takes about a second.
TINY = ["--embed-dim", "16", "--heads", "2", "--batch-size", "4", "--backend", "reference"]


def run_cli(*argv):
    return cli.main([str(arg) for arg in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory of a short recall run."""
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--out", out, "--steps", 8, "--checkpoint-every", 4, "--no-progress", *TINY) == 0
    return out


def one_error_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microattn: error: "), text
    assert "Traceback" not in text
    return lines[0]


# ----------------------------------------------------------------------------- demo


def test_demo_quick_runs_end_to_end(capsys):
    assert run_cli("demo", "--quick", "--no-progress") == 0
    out = capsys.readouterr().out
    for task, attention in cli.DEMO_PLAN:
        assert any(line.split()[:2] == [task, attention] for line in out.splitlines()), (task, attention)
    assert "held-out acc" in out and "tokens/s" in out and "tracemalloc" in out
    assert "what the table shows" in out


def test_demo_overrides_select_the_runs(capsys):
    assert run_cli("demo", "--quick", "--tasks", "copy", "--variants", "exact,linear", "--steps", 2,
                   "--backend", "reference") == 0
    captured = capsys.readouterr()
    rows = [line.split()[:2] for line in captured.out.splitlines() if line.startswith("copy ")]
    assert rows == [["copy", "exact"], ["copy", "linear"]]
    assert "2/2" in captured.err  # the progress bar's final line


def test_demo_plan():
    assert cli.demo_plan(None, None) == cli.DEMO_PLAN
    assert cli.demo_plan(["needle"], None) == [("needle", v) for v in training.VARIANTS]
    assert cli.demo_plan(None, ["exact"]) == [("recall", "exact"), ("needle", "exact")]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "microattn", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "attention-map" in result.stdout


# ----------------------------------------------------------------------------- train, resume


def test_train_writes_a_checkpoint_and_reports(trained, capsys):
    state = training.load_checkpoint(trained)
    assert int(state["step"]) == 8 and len(state["losses"]) == 8
    assert sorted(os.listdir(trained)) in (["checkpoint.npz"], ["checkpoint.npz", "loss.png"])


def test_train_resume_continues_exactly(tmp_path, capsys):
    straight, partial = tmp_path / "straight", tmp_path / "partial"
    assert run_cli("train", "--out", straight, "--steps", 6, "--no-progress", *TINY) == 0
    reference = training.Run.load(straight)

    def interrupt_at_3(run, loss):
        if run.step == 3:
            raise KeyboardInterrupt

    assert training.train(training.Run.create(reference.config), partial, on_step=interrupt_at_3).interrupted
    capsys.readouterr()
    assert run_cli("train", "--out", partial, "--resume", "--no-progress") == 0
    assert "resuming recall / exact at step 3 of 6" in capsys.readouterr().out
    resumed = training.Run.load(partial)
    assert resumed.losses == reference.losses  # bit for bit
    for name, array in reference.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], array)


def test_resume_refuses_a_changed_configuration(trained, capsys):
    assert run_cli("train", "--out", trained, "--resume", "--steps", 50) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--steps 50 (the checkpoint has 8)" in line


def test_resume_of_a_finished_run_does_nothing(trained, capsys):
    assert run_cli("train", "--out", trained, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_train_refuses_to_overwrite_a_run(trained, capsys):
    assert run_cli("train", "--out", trained, *TINY) == 1
    assert "--resume" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "microattn", "train", "--out", str(out), "--steps", "100000",
               "--checkpoint-every", "1", "--no-progress", *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == cli.INTERRUPTED
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    state = training.load_checkpoint(out)
    assert int(state["step"]) >= 1 and len(state["losses"]) == int(state["step"])
    assert os.listdir(out) == ["checkpoint.npz"]  # no temporary file left behind


# ----------------------------------------------------------------------------- eval, sample, maps


def test_eval_with_and_without_the_kv_cache_agree(trained, capsys):
    assert run_cli("eval", "--checkpoint", trained, "--examples", 32) == 0
    with_cache = capsys.readouterr().out
    assert run_cli("eval", "--checkpoint", trained, "--examples", 32, "--no-cache") == 0
    without = capsys.readouterr().out
    assert "KV cache" in with_cache and "held-out accuracy" in with_cache
    assert with_cache.split("accuracy")[1].split("%")[0] == without.split("accuracy")[1].split("%")[0]


def test_sample_prints_prompts_and_continuations(trained, capsys):
    assert run_cli("sample", "--checkpoint", trained, "--num", 2) == 0
    out = capsys.readouterr().out
    assert out.count("prompt:") == 2 and out.count("generated:") == 2


def test_attention_map_without_matplotlib_is_a_clear_error(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run_cli("attention-map", "--checkpoint", trained, "--out", tmp_path / "map.png") == 1
    assert "matplotlib" in one_error_line(capsys.readouterr().err)


def test_attention_map_writes_a_png_and_ablates_heads(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "map.png"
    assert run_cli("attention-map", "--checkpoint", trained, "--out", target, "--examples", 32) == 0
    assert target.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "head ablation" in out and out.count(" pts") == 4  # 2 layers x 2 heads


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv", [
    [],
    ["fly"],
    ["train"],  # --out is required
    ["train", "--out", "x", "--steps", "-3"],
    ["train", "--out", "x", "--lr", "fast"],
    ["demo", "--variants", "exact,sparse"],
    ["demo", "--tasks", ""],
    ["eval"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "{tmp}/nowhere"], "no checkpoint"),
    (["sample", "--checkpoint", "{tmp}/nowhere"], "no checkpoint"),
    (["train", "--out", "{tmp}/run", "--task", "sorting"], "unknown task"),
    (["train", "--out", "{tmp}/run", "--attention", "sparse"], "unknown attention"),
    (["train", "--out", "{tmp}/run", "--embed-dim", "30"], "multiple"),
    (["train", "--out", "{tmp}/run", "--backend", "gpu9000"], "backend"),
    (["train", "--out", "{tmp}/run", "--resume"], "no checkpoint"),
])
def test_bad_requests_exit_1_with_one_line(argv, message, tmp_path, capsys):
    assert run_cli(*[arg.format(tmp=tmp_path) for arg in argv]) == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file")
    assert run_cli("eval", "--checkpoint", tmp_path) == 1
    assert "not a readable microattn checkpoint" in one_error_line(capsys.readouterr().err)
