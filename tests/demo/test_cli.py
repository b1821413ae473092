"""The microattn command: every subcommand end to end, and its errors."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from microattn.demo import cli, loop
from microattn.demo.checkpoint import load_checkpoint, save_checkpoint
from microattn.demo.tasks import TextFile

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
    assert cli.demo_plan(["needle"], None) == [("needle", v) for v in loop.VARIANTS]
    assert cli.demo_plan(None, ["exact"]) == [("recall", "exact"), ("needle", "exact")]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "microattn", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "attention-map" in result.stdout


# ----------------------------------------------------------------------------- train, resume


def test_train_writes_a_checkpoint_and_reports(trained, capsys):
    state = load_checkpoint(trained)
    assert int(state["step"]) == 8 and len(state["losses"]) == 8
    assert sorted(os.listdir(trained)) in (["checkpoint.npz"], ["checkpoint.npz", "loss.png"])


def test_train_resume_continues_exactly(tmp_path, capsys):
    straight, partial = tmp_path / "straight", tmp_path / "partial"
    assert run_cli("train", "--out", straight, "--steps", 6, "--no-progress", *TINY) == 0
    reference = loop.Run.load(straight)

    def interrupt_at_3(run, loss):
        if run.step == 3:
            raise KeyboardInterrupt

    assert loop.train(loop.Run.create(reference.config), partial, on_step=interrupt_at_3).interrupted
    capsys.readouterr()
    assert run_cli("train", "--out", partial, "--resume", "--no-progress") == 0
    assert "resuming recall / exact at step 3 of 6" in capsys.readouterr().out
    resumed = loop.Run.load(partial)
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
    state = load_checkpoint(out)
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


@pytest.mark.parametrize("content", [b"", b"not a zip file"])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(content, tmp_path, capsys):
    """Before: garbage gave NumPy's advice to load it with allow_pickle."""
    (tmp_path / "checkpoint.npz").write_bytes(content)
    assert run_cli("eval", "--checkpoint", tmp_path) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "is not a microattn checkpoint, or it is corrupt" in line and "pickle" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "1e999", "-1", "0", "NaN", "Infinity"])
def test_lr_must_be_finite_and_positive(value, tmp_path, capsys):
    """Before: --lr inf was accepted, trained to NaN and exited 0."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli("train", "--out", tmp_path / "run", "--steps", 2, "--no-progress", *TINY, "--lr", value)
    assert exit_info.value.code == 2
    assert "--lr: expected a finite positive number" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--out", ""],
    ["eval", "--checkpoint", " "],
    ["attention-map", "--checkpoint", "x", "--out", ""],
])
def test_empty_paths_are_refused(argv, capsys):
    """Before: --out "" trained into the current directory."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2
    assert "expected a path, got an empty string" in one_error_line(capsys.readouterr().err)


def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert run_cli("train", "--out", tmp_path / "taken", *TINY) == 1
    assert "is a file; expected a directory" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("out, message", [("{tmp}", "is a directory"),
                                          ("{tmp}/nowhere/map.png", "not an existing folder")])
def test_attention_map_out_is_checked_before_any_work(out, message, trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(cli.Run, "load", lambda path: pytest.fail("loaded the checkpoint before checking --out"))
    assert run_cli("attention-map", "--checkpoint", trained, "--out", out.format(tmp=tmp_path)) == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_out_of_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def huge(config):
        raise MemoryError("Unable to allocate 400. GiB")

    monkeypatch.setattr(cli.Run, "create", huge)
    assert run_cli("train", "--out", tmp_path / "run", "--embed-dim", 2**30) == 1
    assert "out of memory" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("change, message", [
    (lambda state: state["model"].update({k: v.astype(np.float64) for k, v in state["model"].items()}),
     "is float64, expected float32"),
    (lambda state: state.pop("config"), "missing config"),
    (lambda state: state.update(config="[1, 2]"), "expected a JSON object"),
    (lambda state: state.update(config=state["config"].replace('"steps": 8', '"steps": "8"')),
     "steps must be an integer"),
    (lambda state: state["model"].popitem(), "its parameters do not fit the model"),
])
def test_crafted_checkpoints_are_one_line_errors(change, message, trained, tmp_path, capsys):
    """Before: tracebacks, or a bare 'microattn: error: config'."""
    state = load_checkpoint(trained)
    change(state)
    save_checkpoint(tmp_path / "checkpoint.npz", state)
    for command in (["eval", "--checkpoint", tmp_path], ["sample", "--checkpoint", tmp_path],
                    ["train", "--out", tmp_path, "--resume"]):
        assert run_cli(*command) == 1
        assert message in one_error_line(capsys.readouterr().err)


def test_train_removes_what_a_killed_save_left(trained, tmp_path, capsys):
    """Before: a checkpoint.npz.*.tmp of a kill -9 during a save stayed forever."""
    leftover = trained / "checkpoint.npz.k9deadxx.tmp"
    leftover.write_bytes(b"PK half a checkpoint")
    assert run_cli("eval", "--checkpoint", trained, "--examples", 4) == 0
    assert not leftover.exists()


# ----------------------------------------------------------------------------- train --text, sample --prompt

TEXT = "Tiny text, with UTF-8: naïve café, 日本語, 🙂. The attention reads every earlier byte.\n" * 8
TEXT_RUN = ["--seq-len", 16, "--no-progress", *TINY]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A directory with corpus.txt and run/, a --text run of 6 steps."""
    root = tmp_path_factory.mktemp("text")
    (root / "corpus.txt").write_text(TEXT)
    assert run_cli("train", "--text", root / "corpus.txt", "--out", root / "run", "--steps", 6,
                   "--checkpoint-every", 3, *TEXT_RUN) == 0
    return root


def test_train_text_records_the_file_and_reports_bits_per_byte(text_run, capsys):
    run = loop.Run.load(text_run / "run")
    options = run.config.task_options
    assert run.config.task == "text" and run.step == 6 and run.model.vocab_size == 256
    assert options["path"] == str((text_run / "corpus.txt").resolve()) and options["seq_len"] == 16
    assert options["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()


def test_train_text_output(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    assert run_cli("train", "--text", tmp_path / "c.txt", "--out", tmp_path / "run", "--steps", 2, *TEXT_RUN) == 0
    out = capsys.readouterr().out
    assert f"training c.txt ({len(TEXT.encode()):,} bytes) / exact" in out and "2 steps of 4 x 16 tokens" in out
    assert "bits per byte" in out and "microattn sample --checkpoint" in out and "held-out accuracy" not in out


def test_train_text_resumes_exactly(text_run, tmp_path, capsys):
    reference = loop.Run.load(text_run / "run")

    def interrupt_at_2(run, loss):
        if run.step == 2:
            raise KeyboardInterrupt

    assert loop.train(loop.Run.create(reference.config), tmp_path / "partial", on_step=interrupt_at_2).interrupted
    capsys.readouterr()
    assert run_cli("train", "--out", tmp_path / "partial", "--resume", "--text", text_run / "corpus.txt",
                   "--no-progress") == 0
    assert "resuming corpus.txt" in capsys.readouterr().out
    assert loop.Run.load(tmp_path / "partial").losses == reference.losses  # bit for bit


def test_a_changed_or_missing_file_stops_a_resume_but_not_sampling(tmp_path, capsys):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(TEXT)
    options = {"path": str(corpus), "sha256": TextFile(str(corpus)).check(), "seq_len": 16}
    config = loop.TrainConfig(task="text", task_options=options, embed_dim=16, num_heads=2, batch_size=4, steps=4,
                              backend="reference")

    def interrupt_at_2(run, loss):
        if run.step == 2:
            raise KeyboardInterrupt

    assert loop.train(loop.Run.create(config), out, on_step=interrupt_at_2).interrupted
    for change, message in [(lambda: corpus.write_text(TEXT.replace("café", "cafe")), "has changed since this run began"),
                            (corpus.unlink, "does not exist")]:
        change()
        for command in (["train", "--out", out, "--resume", "--no-progress"], ["eval", "--checkpoint", out]):
            assert run_cli(*command) == 1
            line = one_error_line(capsys.readouterr().err)
            assert message in line and str(corpus) in line
        assert loop.Run.load(out).step == 2  # nothing trained on other data
        # sampling needs the model only
        assert run_cli("sample", "--checkpoint", out, "--prompt", "a", "--max-new-tokens", 3) == 0
        assert capsys.readouterr().out.startswith("a")


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"too short", "has 9 bytes; a training window")])
def test_train_text_on_an_empty_or_short_file(content, message, tmp_path, capsys):
    (tmp_path / "f.txt").write_bytes(content)
    assert run_cli("train", "--text", tmp_path / "f.txt", "--out", tmp_path / "run", *TEXT_RUN) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("argv, message", [
    (["--text", "{tmp}/none.txt"], "does not exist"),
    (["--text", "{tmp}"], "is not a file"),
    (["--text", "{corpus}", "--task", "copy"], "choose one"),
    (["--task", "text"], "give the file itself with --text FILE"),
    (["--seq-len", "16"], "--seq-len sets the context of a --text run"),
    (["--out", "{run}", "--resume", "--text", "{tmp}/other.txt"], "a resumed run keeps its file"),
    (["--out", "{run}", "--resume", "--seq-len", "32"], "drop --seq-len 32 (the checkpoint has 16)"),
    (["--out", "{trained}", "--resume", "--text", "{corpus}"], "this run learns the recall task"),
])
def test_bad_text_training_requests(argv, message, text_run, trained, tmp_path, capsys):
    names = {"tmp": tmp_path, "corpus": text_run / "corpus.txt", "run": text_run / "run", "trained": trained}
    argv = [arg.format(**names) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    assert run_cli("train", *argv, "--no-progress") == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_sample_continues_a_prompt_streaming_text(text_run, capsys):
    argv = ["sample", "--checkpoint", text_run / "run", "--prompt", "naïve ", "--max-new-tokens", 40]
    assert run_cli(*argv, "--seed", 3) == 0
    out = capsys.readouterr().out
    assert out.startswith("naïve ") and out.endswith("\n")
    assert 10 <= len(out) - 1 - len("naïve ") <= 40  # 40 bytes: 10 to 40 characters (U+FFFD for stray bytes)
    assert run_cli(*argv, "--seed", 3) == 0
    assert capsys.readouterr().out == out  # one seed, one text
    assert run_cli(*argv, "--seed", 4, "--num", 2, "--top-k", 5, "--top-p", 0.9) == 0
    assert capsys.readouterr().out.count("naïve ") == 2


def test_sample_of_a_text_run_matches_the_model_greedily(text_run, capsys):
    """--temperature 0: the bytes the model's own greedy generate gives (60 > the context of
    16, so generation restarts from the last 8 bytes every 8 bytes)."""
    assert run_cli("sample", "--checkpoint", text_run / "run", "--prompt", "The", "--max-new-tokens", 60,
                   "--temperature", 0) == 0
    out = capsys.readouterr().out
    model = loop.Run.load(text_run / "run").model
    context, expected = list(b"The"), []
    while len(expected) < 60:
        byte = int(model.generate(np.array(context), 1)[-1])
        expected.append(byte)
        context = context + [byte] if len(context) < 15 else (context + [byte])[-8:]
    assert out == "The" + bytes(expected).decode("utf-8", errors="replace") + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{run}"], "give --prompt TEXT to continue"),
    (["--checkpoint", "{run}", "--prompt", ""], "--prompt is empty"),
    (["--checkpoint", "{trained}", "--prompt", "abc"], "this run learned the recall task"),
])
def test_bad_sample_requests(argv, message, text_run, trained, capsys):
    argv = [arg.format(run=text_run / "run", trained=trained) for arg in argv]
    assert run_cli("sample", *argv) == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_eval_of_a_text_run_says_what_it_scores(text_run, capsys):
    assert run_cli("eval", "--checkpoint", text_run / "run", "--examples", 8) == 0
    out = capsys.readouterr().out
    assert "next-byte accuracy" in out and "bits per byte" in out and "no held-out part" in out
    assert run_cli("eval", "--checkpoint", text_run / "run", "--examples", 8, "--no-cache") == 0
    assert capsys.readouterr().out.split("accuracy")[1].split("%")[0] == out.split("accuracy")[1].split("%")[0]


def test_attention_map_of_a_text_run_labels_bytes(text_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run_cli("attention-map", "--checkpoint", text_run / "run", "--out", tmp_path / "map.png",
                   "--no-ablation") == 0
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
