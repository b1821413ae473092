"""The text task (any file's bytes) and the text helpers of the command line: streamed
decoding (bytes and tokenizers), token-id prompts, generation past a model's context,
fine-tuning's loop."""

import hashlib

import numpy as np
import pytest

from microattn import nn
from microattn.demo import text
from microattn.demo.loop import Run, TrainConfig
from microattn.demo.tasks import IGNORE, DataFileError, TextFile, make_batch, make_task

SAMPLE = "héllo wörld, 日本語 and 🙂: attention is all we need.\n" * 4


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE)
    return path


# ----------------------------------------------------------------------------- the text task


def test_windows_are_slices_of_the_file_and_every_position_is_scored(corpus):
    task = make_task("text", path=str(corpus), seq_len=16)
    data = np.frombuffer(corpus.read_bytes(), dtype=np.uint8)
    assert task.vocab_size == 256 and task.seq_len == 16 and task.size == len(data)
    assert task.sha256 == hashlib.sha256(corpus.read_bytes()).hexdigest()
    batch = make_batch(task, seed=0, step=3, batch_size=64)
    assert batch.inputs.shape == batch.targets.shape == (64, 16) and batch.inputs.dtype == np.int64
    assert (batch.targets != IGNORE).all()
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])  # next byte
    raw = data.tobytes()
    for row, target in zip(batch.inputs, batch.targets):
        window = bytes(row.tolist()) + bytes([int(target[-1])])
        assert window in raw
    starts = {raw.index(bytes(row.tolist())) for row in make_batch(task, 0, 0, 512).inputs}
    assert len(starts) > 50  # windows are spread over the file, not one place
    np.testing.assert_array_equal(make_batch(task, 0, 3, 64).inputs, batch.inputs)  # pure function


def test_config_round_trips_and_decode_is_utf8_with_replacement(corpus):
    task = TextFile(str(corpus), seq_len=8)
    again = make_task(**task.config())
    assert again.config() == task.config() and again.config()["sha256"] == task.sha256
    assert task.decode(np.frombuffer("日本".encode(), dtype=np.uint8)) == "日本"
    assert task.decode([0xE6, 0x97]) == "\ufffd"  # half a character
    assert len(task.token_names) == 256 and task.token_names[ord("a")] == "a" and task.token_names[10] == "\\n"


@pytest.mark.parametrize("content, seq_len, message", [
    (b"", 8, "is empty"),
    (b"short", 8, r"has 5 bytes; a training window needs seq_len \+ 1 = 9: use a longer file or a smaller seq_len"),
    (b"123456789", 8, None),  # exactly one window fits
])
def test_empty_and_short_files_are_clear_errors(content, seq_len, message, tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    task = make_task("text", path=str(path), seq_len=seq_len)  # the file is read when needed
    if message is None:
        assert make_batch(task, 0, 0, 2).inputs.shape == (2, 8)
        return
    for use in (task.check, lambda: make_batch(task, 0, 0, 2)):
        with pytest.raises(DataFileError, match=message):
            use()


def test_a_changed_or_missing_file_is_refused_when_its_bytes_are_needed(corpus, tmp_path):
    recorded = TextFile(str(corpus)).check()
    assert TextFile(str(corpus), sha256=recorded).check() == recorded
    corpus.write_text(SAMPLE.replace("wörld", "world"))
    changed = TextFile(str(corpus), sha256=recorded)
    assert changed.sha256 == recorded and changed.vocab_size == 256  # what a model needs, without the file
    for use in (changed.check, lambda: make_batch(changed, 0, 0, 2)):
        with pytest.raises(DataFileError, match="has changed since this run began"):
            use()
    with pytest.raises(DataFileError, match="does not exist"):
        TextFile(str(tmp_path / "gone.txt")).check()
    with pytest.raises(DataFileError, match="is not a file"):
        TextFile(str(tmp_path)).check()
    with pytest.raises(ValueError, match="task text needs the option path"):
        make_task("text")
    with pytest.raises(ValueError, match="seq_len must be an integer"):
        make_task("text", path=str(corpus), seq_len="8")


def test_a_text_run_trains_any_bytes(tmp_path):
    """Not UTF-8 at all: still 256 byte values to predict."""
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    task = TextFile(str(path), seq_len=12)
    config = TrainConfig(task="text", task_options={"path": str(path), "sha256": task.sha256, "seq_len": 12},
                         embed_dim=16, num_heads=2, batch_size=2, steps=2, backend="reference")
    run = Run.create(config)
    assert run.model.vocab_size == 256 and run.model.max_len == 12
    assert TrainConfig.from_json(config.to_json()) == config


# ----------------------------------------------------------------------------- streams


def test_byte_stream_prints_each_character_with_its_last_byte():
    stream = text.ByteStream()
    pieces = [stream.step(b) for b in "a日🙂".encode()]
    assert pieces == ["a", "", "", "日", "", "", "", "🙂"]
    assert [stream.step(b) for b in b"\xff\x80z"] == ["\ufffd", "\ufffd", "z"]
    stream.step(0xE6)
    assert stream.finish() == "\ufffd"  # a character cut short at the end


def byte_level_tokenizer(vocab_size=300):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(["attention is all we need. " * 20, "hello world " * 20], trainer)
    return tokenizer


def metaspace_tokenizer():
    """SentencePiece's convention (Llama 2): "▁" marks a space, and decoding drops the
    leading one, so a token decoded alone loses the space before it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, pre_tokenizers

    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "▁attention": 3, "▁is": 4, ",": 5, "▁": 6, "s": 7}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


def streamed(tokenizer, prompt, generated):
    stream = text.TokenStream(tokenizer, prompt)
    pieces = [stream.step(token) for token in generated]
    return pieces, stream.finish()


def test_token_stream_holds_a_split_character_until_it_is_whole():
    tokenizer = byte_level_tokenizer()
    prompt = tokenizer.encode("hello world").ids
    sentence = " 日本語 and 🙂 attention"
    generated = tokenizer.encode(sentence).ids
    assert len(generated) > len(sentence.split()) + 6  # the characters are split into byte tokens
    pieces, rest = streamed(tokenizer, prompt, generated)
    assert "".join(pieces) == sentence and rest == ""
    assert "" in pieces and not any("\ufffd" in piece for piece in pieces)
    whole = tokenizer.decode(prompt + generated)
    assert whole == tokenizer.decode(prompt) + "".join(pieces)


def test_token_stream_keeps_the_spaces_a_lone_token_would_lose():
    tokenizer = metaspace_tokenizer()
    assert tokenizer.decode([2]) == "world"  # alone, "▁world" loses its space
    pieces, rest = streamed(tokenizer, [1], [2, 5, 3, 4, 6, 7])
    assert pieces == [" world", ",", " attention", " is", " ", "s"] and rest == ""
    assert tokenizer.decode([1, 2, 5, 3, 4, 6, 7]) == "hello" + "".join(pieces)


def test_token_stream_of_random_ids_adds_up_to_the_whole_decode():
    tokenizer = byte_level_tokenizer()
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(20):
        prompt, generated = rng.integers(0, 300, 3).tolist(), rng.integers(0, 300, 40).tolist()
        pieces, rest = streamed(tokenizer, prompt, generated)
        head = tokenizer.decode(prompt)
        whole = tokenizer.decode(prompt + generated)
        if whole.startswith(head):  # a prompt ending mid-character may change its own text
            assert "".join(pieces) + rest == whole[len(head):]
            checked += 1
    assert checked >= 10


def test_parse_token_ids():
    np.testing.assert_array_equal(text.parse_token_ids(" 1 2,3\n+4 "), [1, 2, 3, 4])
    for bad, message in [("", "empty"), ("1 x", "'x' is not a token id"), ("1 -2", "'-2'"), ("1.5", "'1.5'")]:
        with pytest.raises(ValueError, match=message):
            text.parse_token_ids(bad)
    with pytest.raises(ValueError, match="token id 9; the model's vocabulary is"):
        text.check_token_ids(np.array([1, 9]), 9, "--prompt-ids")


# ----------------------------------------------------------------------------- generation, fine-tuning


def tiny_decoder(max_len):
    return nn.DecoderLM(11, max_len, embed_dim=8, num_heads=2, backend="reference", dtype=np.float64,
                        rng=np.random.default_rng(0))


def test_rolling_generation_runs_past_the_context_and_restarts_from_its_second_half():
    model = tiny_decoder(max_len=6)
    seen = []

    def pick(logits):
        return np.argmax(logits, axis=-1)[:, None]

    new = text.rolling_generate(model, np.array([1, 2, 3, 4, 5, 6, 7]), 9, pick=pick, on_token=seen.append)
    assert len(new) == 9 and [int(t[0]) for t in seen] == new.tolist()
    # the prompt keeps its last 5 tokens (room for one more), then each restart its last 3
    context, expected = [3, 4, 5, 6, 7], []
    while len(expected) < 9:
        step = model.generate(np.array(context), 1)[-1]
        expected.append(int(step))
        context = context + [int(step)]
        if len(context) == 6:
            context = context[-3:]
    assert new.tolist() == expected
    with pytest.raises(ValueError, match="context 1"):
        text.rolling_generate(tiny_decoder(max_len=1), np.array([1]), 2, pick=pick, on_token=None)


def test_finetune_lowers_the_loss_on_its_text():
    model = tiny_decoder(max_len=16)
    tokens = np.tile(np.arange(10), 30)  # a pattern to learn
    before = text.mean_loss(model, tokens, 8)
    steps = []
    history = text.finetune(model, tokens, steps=40, lr=3e-2, batch_size=4, seq_len=8,
                            on_step=lambda step, loss: steps.append(step))
    assert steps == list(range(1, 41)) and len(history) == 40 and not model.training
    assert text.mean_loss(model, tokens, 8) < before / 3
    with pytest.raises(ValueError, match="a training window needs seq_len"):
        text.finetune(model, tokens[:8], steps=1, lr=1e-3, batch_size=1, seq_len=8)
