"""Text in and out for the command line: tokenizers, streamed decoding, prompts, fine-tuning.

    load_tokenizer(directory)   the ``tokenizers`` Tokenizer of DIR/tokenizer.json, or None
    parse_token_ids("1 2 3")    a prompt given as token ids
    TokenStream(tokenizer, ids) text of tokens as they come: decode(new) - decode(before)
    ByteStream()                the same for byte-level models (UTF-8, errors replaced)
    rolling_generate(...)       a DecoderLM's generation past its context (re-primed)
    finetune(model, tokens)     AdamW on random windows of a token sequence

Streaming text is harder than decoding it once: a character may span several tokens (a
byte-level BPE splits "日" into three byte tokens, none of which decodes alone), and a
token's text may depend on its left neighbour (SentencePiece drops the leading space of
the first token it decodes). ``TokenStream`` therefore decodes a short window ending at
the new token, with a few tokens of left context, and emits only the text beyond what the
context decoded to, once that text does not end in an incomplete character (U+FFFD).
"""

from __future__ import annotations

import codecs
import re

import numpy as np

from .. import losses, optim
from ..autograd import no_grad
from ..nn.transformer import generate_tokens

TOKENIZER = "tokenizer.json"
# Files of a Hugging Face model directory that describe its tokenizer and generation
# defaults; `finetune` copies those present next to the weights it writes.
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model")
MODELS_EXTRA = "pip install 'microattn[models]'"


def load_tokenizer(directory):
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json``, or None if there is none.
    ImportError (naming the extra) without the ``tokenizers`` package; ValueError for a
    file it cannot read."""
    path = directory / TOKENIZER
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{path} needs the tokenizers package: {MODELS_EXTRA}") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001  (tokenizers raises a bare Exception)
        raise ValueError(f"{path} is not a tokenizer file tokenizers can read: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def parse_token_ids(text: str) -> np.ndarray:
    """ "1 2 3" or "1,2,3" -> int64 (N,); ValueError for anything that is not a non-empty
    list of integers >= 0."""
    parts = [part for part in re.split(r"[\s,]+", text.strip()) if part]
    if not parts:
        raise ValueError("--prompt-ids is empty; expected token ids such as \"1 2 3\"")
    bad = [part for part in parts if not re.fullmatch(r"\+?\d+", part)]
    if bad:
        raise ValueError(f"--prompt-ids: {bad[0]!r} is not a token id (an integer >= 0)")
    return np.array([int(part) for part in parts], dtype=np.int64)


def check_token_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """ValueError unless every id is in [0, vocab_size)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise ValueError(f"{what} holds token id {bad}; the model's vocabulary is [0, {vocab_size})")


class TokenStream:
    """Text of generated tokens, as they come, through a ``tokenizers.Tokenizer``.

    ``step(token)`` returns the text the new token completes ("" while it ends in the
    middle of a character); the concatenation of every step's text is the decode of all
    generated tokens (after ``ids``, the prompt, which gives the first ones their left
    context), ``finish()`` giving what is left at the end. The tokens of the last emission
    (at first, the prompt's last ``CONTEXT``) are decoded with each new token as its left
    context, and only the text beyond theirs is emitted.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, ids=(), *, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = [int(i) for i in ids]
        self.read = len(self.ids)  # ids before this have been emitted
        self.prefix = max(self.read - self.CONTEXT, 0)  # left context of the next emission

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def step(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an incomplete character so far (or nothing printable yet): wait
        self.prefix, self.read = self.read, len(self.ids)  # the tokens just emitted: the next context
        return text[len(before):]

    def finish(self) -> str:
        """What the tokens not yet emitted decode to, incomplete characters as U+FFFD."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class ByteStream:
    """Text of generated bytes (a byte-level model's tokens), UTF-8 decoded as they come:
    a character's text appears with its last byte; bytes that cannot be UTF-8 become U+FFFD."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token: int) -> str:
        return self.decoder.decode(bytes([int(token)]))

    def finish(self) -> str:
        return self.decoder.decode(b"", final=True)


def rolling_generate(model, prompt: np.ndarray, max_new_tokens: int, *, pick, on_token) -> np.ndarray:
    """Generate ``max_new_tokens`` after ``prompt`` (N,) with a ``nn.DecoderLM``, whose KV
    cache holds ``model.max_len`` positions: when it is full, decoding starts again from
    the last ``max_len // 2`` tokens (their keys and values recomputed), so the output may
    be longer than the context the model was trained on. Returns the new tokens (M,)."""
    context = model.max_len
    if context < 2:
        raise ValueError(f"a model of context {context} cannot generate: its prompt fills it")
    tokens = np.asarray(prompt, dtype=np.int64)[-(context - 1):]
    new = []
    while len(new) < max_new_tokens:
        room = min(max_new_tokens - len(new), context - len(tokens))
        out = generate_tokens(model, tokens, room, pick=pick, make_caches=lambda total: model.make_caches(),
                              on_token=on_token)
        new.extend(out[len(tokens):].tolist())
        tokens = out[-max(context // 2, 1):]
    return np.array(new, dtype=np.int64)


def finetune(model, tokens: np.ndarray, *, steps: int, lr: float, batch_size: int, seq_len: int,
             seed: int = 0, grad_clip: float = 1.0, on_step=None) -> list[float]:
    """Train ``model`` (tokens (B, N) -> logits (B, N, V)) on next-token prediction over
    random windows of ``tokens`` (T,): each step ``batch_size`` windows of ``seq_len + 1``
    tokens, AdamW at a constant ``lr`` (no weight decay), gradients clipped to norm
    ``grad_clip``. ``on_step(step, loss)`` after every step. Returns the losses; the model
    is left in eval mode."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the text is {len(tokens)} tokens; a training window needs seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng(seed)
    parameters = model.parameters()
    optimizer = optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    offsets = np.arange(seq_len + 1)
    history = []
    model.train()
    try:
        for step in range(1, steps + 1):
            starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
            windows = tokens[starts[:, None] + offsets]  # (B, seq_len + 1)
            optimizer.zero_grad()
            loss = losses.cross_entropy(model(windows[:, :-1]), windows[:, 1:])
            loss.backward()
            optim.clip_grad_norm_(parameters, grad_clip)
            optimizer.step()
            history.append(float(loss.item()))
            if on_step is not None:
                on_step(step, history[-1])
    finally:
        model.eval()
    return history


def mean_loss(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, windows: int = 8, seed: int = 1) -> float:
    """Mean next-token cross-entropy over ``windows`` random windows of ``tokens``, no graph."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    total = 0.0
    with no_grad():
        for start in range(0, windows, batch_size):
            count = min(batch_size, windows - start)
            rows = tokens[rng.integers(0, len(tokens) - seq_len, size=count)[:, None] + offsets]
            total += float(losses.cross_entropy(model(rows[:, :-1]), rows[:, 1:]).item()) * count
    return total / windows
