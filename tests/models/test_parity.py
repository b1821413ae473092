"""Every family against Hugging Face transformers (the oracle): logits, greedy tokens, KV cache.

A tiny random model of each case (tests/models/oracle.py: every family and its switches:
GQA, llama3 rope scaling, biases, tied heads, sliding windows shorter than the sequences,
Gemma 2's softcaps and local/global layers, GPT-2's Conv1D and learned positions) is saved
by transformers' ``save_pretrained`` and loaded by ``microattn.models.from_pretrained``.
"""

import json

import numpy as np
import pytest

from tests.conftest import require

require("safetensors")
torch = require("torch")
require("transformers")

from microattn.models import from_pretrained
from tests.models.oracle import (
    CASES,
    WINDOW,
    hf_greedy,
    hf_logits,
    hf_model,
    relative_error,
    tokens,
)

SEQUENCE = 4 * WINDOW  # longer than every sliding window


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> {dtype name: (transformers model, checkpoint directory)}, made once."""
    made = {}
    for case in CASES:
        made[case] = {}
        for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
            model = hf_model(case, dtype=dtype)
            directory = tmp_path_factory.mktemp(f"{case}-{name}")
            model.save_pretrained(directory)
            made[case][name] = model, directory
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_match_transformers(checkpoints, case):
    model, directory = checkpoints[case]["float32"]
    ours = from_pretrained(directory)
    x = tokens(length=SEQUENCE)
    logits = ours(x).data
    assert logits.dtype == np.float32 and logits.shape == (*x.shape, 100)
    assert relative_error(logits, hf_logits(model, x)) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_logits_float64_match_transformers(checkpoints, case):
    model, directory = checkpoints[case]["float64"]
    ours = from_pretrained(directory, dtype=np.float64)
    x = tokens(length=SEQUENCE, seed=1)
    logits = ours(x).data
    assert logits.dtype == np.float64
    assert relative_error(logits, hf_logits(model, x)) <= 1e-9


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(checkpoints, case):
    model, directory = checkpoints[case]["float32"]
    prompt = tokens(length=7, seed=2)
    expected = hf_greedy(model, prompt, 32)
    ours = from_pretrained(directory).generate(prompt, 32)
    assert ours.shape == (2, 7 + 32)
    np.testing.assert_array_equal(ours, expected)
    assert len(np.unique(expected[:, 7:])) > 3  # not one token repeated: the test can fail


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_decoding_equals_the_full_forward(checkpoints, case):
    _, directory = checkpoints[case]["float64"]
    ours = from_pretrained(directory, dtype=np.float64)
    x = tokens(length=SEQUENCE, seed=3)
    full = ours(x).data
    caches = ours.make_caches()
    chunks, start = [], 0
    for size in (3, 1, 1, WINDOW + 2, 1, SEQUENCE - 3 - 1 - 1 - (WINDOW + 2) - 1):
        chunks.append(ours(x[:, start:start + size], kv_caches=caches).data)
        start += size
    assert start == SEQUENCE and caches[0].length == SEQUENCE
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-12, atol=1e-12)


# Each switch changes the logits of the test sequences: without it, the parity above would
# fail (so it is exercised, not passed over). case -> config.json changes that undo it.
SWITCHES = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "gemma2": {"sliding_window": None},
    "gemma2 attention softcap": {"attn_logit_softcapping": None},
    "gemma2 final softcap": {"final_logit_softcapping": None},
    "gemma2 query_pre_attn_scalar": {"query_pre_attn_scalar": 16},
    "llama3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "llama-options": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "gpt2-options": {"scale_attn_by_inverse_layer_idx": False},
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_changes_the_logits(checkpoints, switch, tmp_path):
    case = switch.split()[0]
    _, directory = checkpoints[case]["float64"]
    x = tokens(length=SEQUENCE, seed=4)
    with_switch = from_pretrained(directory, dtype=np.float64)(x).data
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **SWITCHES[switch]}))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    without = from_pretrained(tmp_path, dtype=np.float64)(x).data
    assert relative_error(without, with_switch) > 1e-3
