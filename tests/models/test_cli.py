"""`microattn generate` and `microattn finetune` on tiny checkpoints made here: streamed
text and ids, the model's own tokens, fine-tuned checkpoints that transformers loads, and
one-line errors for what a user can get wrong."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import require

require("safetensors")
tokenizers = require("tokenizers")

from microattn import models
from microattn.demo import cli

CORPUS = ("The attention layer reads every earlier token. Attention is all we need, naïve café, 日本語 🙂.\n"
          "A small model learns the words of a small text. ") * 6


def run_cli(*argv):
    return cli.main([str(arg) for arg in argv])


def one_error_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microattn: error: "), text
    return lines[0]


def byte_level_tokenizer():
    from tokenizers import decoders, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([CORPUS], trainer)
    return tokenizer


def tiny_llama(vocab_size, seed=0):
    config = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False}
    model = models.CausalLM(config, rng=np.random.default_rng(seed))
    for param in model.parameters():  # spread the logits: greedy decoding then varies its tokens
        if param.ndim == 2:
            param.data = param.data * 4
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory with tokenizer.json, the same checkpoint without it, the tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(tokenizer.get_vocab_size())
    models.save_pretrained(model, root / "with")
    models.save_pretrained(model, root / "bare")
    tokenizer.save(str(root / "with" / "tokenizer.json"))
    return root / "with", root / "bare", tokenizer


# ----------------------------------------------------------------------------- generate


def test_generate_prints_the_prompt_and_the_models_own_greedy_tokens_as_text(checkpoint, capsys):
    directory, _, tokenizer = checkpoint
    assert run_cli("generate", "--model", directory, "--prompt", "The attention", "--max-new-tokens", 12) == 0
    captured = capsys.readouterr()
    ids = tokenizer.encode("The attention").ids
    expected = models.from_pretrained(directory).generate(np.array(ids), 12)
    assert captured.out == "The attention" + tokenizer.decode(expected.tolist())[len("The attention"):] + "\n"
    assert "llama" in captured.err and "parameters" in captured.err and "tokens/s" in captured.err


def test_generate_with_ids_and_no_tokenizer_prints_ids(checkpoint, capsys):
    _, bare, _ = checkpoint
    assert run_cli("generate", "--model", bare, "--prompt-ids", "5, 9 13", "--max-new-tokens", 6) == 0
    expected = models.from_pretrained(bare).generate(np.array([5, 9, 13]), 6)
    assert capsys.readouterr().out == " ".join(map(str, expected)) + "\n"


def test_generate_sampling_is_seeded(checkpoint, capsys):
    _, bare, _ = checkpoint
    argv = ["generate", "--model", bare, "--prompt-ids", "1 2 3", "--max-new-tokens", 10, "--temperature", 1.5,
            "--top-k", 50, "--top-p", 0.95]
    outputs = []
    for seed in (1, 1, 2):
        assert run_cli(*argv, "--seed", seed) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    expected = models.from_pretrained(bare).generate(np.array([1, 2, 3]), 10, temperature=1.5, top_k=50,
                                                     top_p=0.95, seed=1)
    assert outputs[0] == " ".join(map(str, expected)) + "\n"


class Recorder:
    """A stdout that remembers what had been flushed, and when."""

    def __init__(self):
        self.written, self.flushed = "", ""

    def write(self, text):
        self.written += text

    def flush(self):
        self.flushed = self.written


def test_generate_streams_each_token_before_computing_the_next(checkpoint, monkeypatch):
    _, bare, _ = checkpoint
    seen_at_forward = []
    load = models.from_pretrained
    out = Recorder()

    def loading(directory, *args, **kwargs):
        model = load(directory, *args, **kwargs)
        forward = model.forward

        def recording(*a, **k):
            seen_at_forward.append(len(out.flushed.split()))
            return forward(*a, **k)

        object.__setattr__(model, "forward", recording)
        return model

    monkeypatch.setattr(models, "from_pretrained", loading)
    monkeypatch.setattr(sys, "stdout", out)
    assert run_cli("generate", "--model", bare, "--prompt-ids", "1 2 3", "--max-new-tokens", 5) == 0
    # the prompt's pass sees the 3 prompt ids out; the pass after new token k sees 3 + k
    assert seen_at_forward == [3, 4, 5, 6, 7]
    assert len(out.flushed.split()) == 8


def test_generate_text_streams_whole_characters(checkpoint, monkeypatch, capsys):
    """A model that always continues with the byte tokens of "日本語": each character is
    printed whole, once its third byte is out."""
    directory, _, tokenizer = checkpoint
    target = tokenizer.encode("日本語").ids
    assert len(target) > 3  # the characters are split into byte tokens
    chunks = []
    out = Recorder()
    original_write = out.write

    def write(text):
        chunks.append(text)
        original_write(text)

    out.write = write
    original = models.CausalLM.generate

    def scripted(self, prompt, max_new_tokens, *, on_token=None, **kwargs):
        for token in target[:max_new_tokens]:
            on_token(np.array([token]))
        return np.concatenate([prompt, target[:max_new_tokens]])

    monkeypatch.setattr(models.CausalLM, "generate", scripted)
    monkeypatch.setattr(sys, "stdout", out)
    assert run_cli("generate", "--model", directory, "--prompt", "A", "--max-new-tokens", len(target)) == 0
    monkeypatch.setattr(models.CausalLM, "generate", original)
    assert chunks[0] == "A" and "".join(chunks[1:]) == "日本語\n"
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_a_reader_that_stops_early_ends_generate_quietly(checkpoint):
    """`microattn generate ... | head -c 20`: the pipe closes under a running generation."""
    _, bare, _ = checkpoint
    process = subprocess.Popen([sys.executable, "-m", "microattn", "generate", "--model", str(bare),
                                "--prompt-ids", "1 2 3", "--max-new-tokens", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.read(20)
        process.stdout.close()
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == cli.BROKEN_PIPE
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr and b"error" not in stderr


@pytest.mark.parametrize("argv, message", [
    (["--model", "{root}/nowhere", "--prompt-ids", "1"], "no such directory"),
    (["--model", "{bare}/config.json", "--prompt-ids", "1"], "is a file; expected a checkpoint directory"),
    (["--model", "{bare}", "--prompt", "hello"], "has no tokenizer.json; give token ids with --prompt-ids"),
    (["--model", "{bare}", "--prompt-ids", "1 two 3"], "'two' is not a token id"),
    (["--model", "{bare}", "--prompt-ids", " "], "--prompt-ids is empty"),
    (["--model", "{bare}", "--prompt-ids", "1 -2"], "'-2' is not a token id"),
    (["--model", "{bare}", "--prompt-ids", "1 100000"], "token id 100000; the model's vocabulary is [0, 320)"),
    (["--model", "{root}", "--prompt-ids", "1"], "has no config.json"),
])
def test_generate_bad_requests_are_one_line_errors(argv, message, checkpoint, capsys):
    _, bare, _ = checkpoint
    argv = [arg.format(root=bare.parent, bare=bare) for arg in argv]
    assert run_cli("generate", *argv) == 1
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [
    ["--model", "x"],  # no prompt
    ["--model", "x", "--prompt", "a", "--prompt-ids", "1"],
    ["--model", "x", "--prompt-ids", "1", "--temperature", "-1"],
    ["--model", "x", "--prompt-ids", "1", "--top-p", "1.5"],
    ["--model", "x", "--prompt-ids", "1", "--top-k", "0"],
    ["--model", "", "--prompt-ids", "1"],
])
def test_generate_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("generate", *argv)
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr().err)


def broken_copy(checkpoint, tmp_path, change):
    _, bare, _ = checkpoint
    target = tmp_path / "broken"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((bare / name).read_bytes())
    change(target)
    return target


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), "has neither model.safetensors nor"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})), "model_type"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json is not a tokenizer file"),
])
def test_a_broken_checkpoint_is_a_one_line_error(change, message, checkpoint, tmp_path, capsys):
    directory = broken_copy(checkpoint, tmp_path, change)
    assert run_cli("generate", "--model", directory, "--prompt-ids", "1 2") == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_gpt2_positions_are_checked_before_generating(tmp_path, capsys):
    config = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 8}
    models.save_pretrained(models.CausalLM(config, rng=np.random.default_rng(0)), tmp_path / "gpt2")
    assert run_cli("generate", "--model", tmp_path / "gpt2", "--prompt-ids", "1 2 3", "--max-new-tokens", 6) == 1
    assert "is 9 tokens; this model has 8 positions" in one_error_line(capsys.readouterr().err)
    assert run_cli("generate", "--model", tmp_path / "gpt2", "--prompt-ids", "1 2 3", "--max-new-tokens", 5) == 0


# ----------------------------------------------------------------------------- finetune


FINETUNE = ["--steps", 12, "--lr", 3e-3, "--batch-size", 2, "--seq-len", 16, "--no-progress"]


def test_finetune_saves_a_checkpoint_transformers_loads(checkpoint, tmp_path, capsys):
    torch = require("torch")
    transformers = require("transformers")
    directory, _, tokenizer = checkpoint
    (tmp_path / "corpus.txt").write_text(CORPUS)
    out = tmp_path / "tuned"
    assert run_cli("finetune", "--model", directory, "--text", tmp_path / "corpus.txt", "--out", out, *FINETUNE) == 0
    report = capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    losses = report.split("on 8 random windows of the text: ")[1]
    before, after = float(losses.split(" before")[0]), float(losses.split(", ")[1].split(" after")[0])
    assert after < before

    ours = models.from_pretrained(out)
    original = models.from_pretrained(directory)
    assert not np.array_equal(ours.embed_tokens.weight.data, original.embed_tokens.weight.data)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = np.array([tokenizer.encode("The attention layer").ids])
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).logits.numpy()
    logits = ours(x).data
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    # and the command line runs what it wrote
    assert run_cli("generate", "--model", out, "--prompt", "The", "--max-new-tokens", 3) == 0


def test_finetune_learns_the_text(checkpoint, tmp_path, capsys):
    """Its own loop, measured: the loss on the text falls well below where it started."""
    directory, _, _ = checkpoint
    (tmp_path / "corpus.txt").write_text(CORPUS)
    assert run_cli("finetune", "--model", directory, "--text", tmp_path / "corpus.txt", "--out", tmp_path / "t",
                   "--steps", 40, "--lr", 1e-2, "--batch-size", 4, "--seq-len", 16, "--no-progress") == 0
    losses = capsys.readouterr().out.split("on 8 random windows of the text: ")[1]
    before, after = float(losses.split(" before")[0]), float(losses.split(", ")[1].split(" after")[0])
    assert after < 0.6 * before


@pytest.mark.parametrize("setup, argv, message", [
    (None, ["--model", "{bare}"], "has no tokenizer.json"),
    (lambda t: t.write_text(""), ["--model", "{with}"], "is empty"),
    (lambda t: t.write_bytes(b"caf\xe9 latin-1"), ["--model", "{with}"], "is not UTF-8 text (byte 3"),
    (lambda t: t.write_text("tiny"), ["--model", "{with}"], "a training window needs --seq-len + 1 = 17"),
    (lambda t: t.unlink(missing_ok=True), ["--model", "{with}"], "no such file"),
    (None, ["--model", "{with}", "--out", "{with}"], "exists and is not an empty directory"),
    (None, ["--model", "{root}/nowhere"], "no such directory"),
])
def test_finetune_bad_requests_are_one_line_errors(setup, argv, message, checkpoint, tmp_path, capsys):
    directory, bare, _ = checkpoint
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    if setup is not None:
        setup(corpus)
    argv = [arg.format(bare=bare, root=bare.parent, **{"with": directory}) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert run_cli("finetune", *argv, "--text", corpus, *FINETUNE) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
