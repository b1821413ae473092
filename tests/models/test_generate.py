"""CausalLM.generate's sampling (greedy parity with transformers is in test_parity.py):
temperature, top-k and top-p filter as transformers' warpers do, and one seed is one
sequence. Models are built here (no checkpoint, no oracle needed)."""

import numpy as np
import pytest

from microattn.models import CausalLM
from microattn.nn import sample_next_token

CONFIG = {"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def model():
    model = CausalLM(CONFIG, dtype=np.float64, rng=np.random.default_rng(0))
    for param in model.parameters():  # spread the logits, so that sampling differs from greedy
        param.data = param.data * 8 if param.ndim == 2 else param.data
    return model


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model):
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = model.generate(prompt, 12, temperature=1.0, seed=7)
    np.testing.assert_array_equal(a, model.generate(prompt, 12, temperature=1.0, seed=7))
    assert not np.array_equal(a, model.generate(prompt, 12, temperature=1.0, seed=8))
    greedy = model.generate(prompt, 12)
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(a[:, :3], prompt)
    # filters that keep only the most likely token are greedy, whatever the seed
    np.testing.assert_array_equal(model.generate(prompt, 12, temperature=1.0, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(model.generate(prompt, 12, temperature=2.0, top_p=1e-6, seed=3), greedy)


def test_a_batch_decodes_as_its_rows_do(model):
    prompt = np.array([[1, 2, 3, 9], [4, 5, 6, 7]])
    both = model.generate(prompt, 10)
    for row in range(2):
        np.testing.assert_array_equal(model.generate(prompt[row], 10), both[row])


def test_on_token_streams_what_generate_returns(model):
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    seen = []
    out = model.generate(prompt, 6, temperature=1.0, seed=4, on_token=seen.append)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 3:])
    np.testing.assert_array_equal(out, model.generate(prompt, 6, temperature=1.0, seed=4))


def test_sampling_follows_the_filtered_distribution():
    """20000 draws from one row of logits: frequencies match softmax(logits / T) restricted
    to the top-k, then to the top-p nucleus, renormalised."""
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))  # probabilities at temperature 1
    rows = np.tile(logits, (20000, 1))
    rng = np.random.default_rng(0)
    cases = [  # (keywords, expected probabilities)
        ({"temperature": 1.0}, [0.05, 0.4, 0.1, 0.3, 0.15]),
        ({"temperature": 1.0, "top_k": 3}, np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85),
        # nucleus 0.75: 0.4, then 0.3 (0.4 before it < 0.75), then 0.15 (0.7 before it < 0.75)
        ({"temperature": 1.0, "top_p": 0.75}, np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85),
        ({"temperature": 1.0, "top_p": 0.65}, np.array([0, 0.4, 0, 0.3, 0]) / 0.7),  # 0.7 before 0.15
        ({"temperature": 2.0, "top_k": 2}, np.sqrt([0.4, 0.3]) / np.sqrt([0.4, 0.3]).sum()),
    ]
    for keywords, expected in cases:
        drawn = sample_next_token(rows, rng=rng, **keywords)[:, 0]
        frequencies = np.bincount(drawn, minlength=5) / len(drawn)
        if keywords.get("top_k") == 2:
            expected = np.array([0, expected[0], 0, expected[1], 0])
        np.testing.assert_allclose(frequencies, expected, atol=0.015, err_msg=str(keywords))


@pytest.mark.parametrize("keywords", [{"temperature": -1.0}, {"temperature": float("nan")},
                                      {"top_k": 0}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_settings_are_errors(model, keywords):
    with pytest.raises(ValueError, match=next(iter(keywords))):
        model.generate(np.array([1, 2]), 3, **keywords)


def test_max_new_tokens_must_be_a_count(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(np.array([1, 2]), -1)
    assert model.generate(np.array([1, 2]), 0).tolist() == [1, 2]
