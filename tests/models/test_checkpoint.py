"""Reading and writing checkpoint directories: save_pretrained round trips through
transformers, shards, bfloat16, and the errors for what is not supported."""

import json

import numpy as np
import pytest

from tests.conftest import require

require("safetensors")
torch = require("torch")
transformers = require("transformers")

import safetensors.numpy as safetensors_numpy

from microattn import optim
from microattn.models import CausalLM, from_pretrained, read_config, save_pretrained
from microattn.nn import cross_entropy
from tests.models.oracle import (
    CASES,
    VOCAB,
    hf_logits,
    hf_model,
    relative_error,
    tokens,
)


def hf_checkpoint(case, directory, **overrides):
    model = hf_model(case, **overrides)
    model.save_pretrained(directory)
    return model


def fine_tune_step(model, x):
    """One SGD step on next-token prediction: every weight moves."""
    model.train()
    logits = model(x)
    loss = cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_a_fine_tuned_model_saves_and_loads_in_transformers(case, tmp_path):
    hf_checkpoint(case, tmp_path / "original")
    ours = from_pretrained(tmp_path / "original")
    before = {name: p.data.copy() for name, p in ours.named_parameters()}
    x = tokens(length=12)
    fine_tune_step(ours, x)
    assert all(not np.array_equal(before[name], p.data) for name, p in ours.named_parameters())
    save_pretrained(ours, tmp_path / "tuned")
    assert sorted(path.name for path in (tmp_path / "tuned").iterdir()) == ["config.json", "model.safetensors"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    logits = ours(x).data
    assert relative_error(logits, hf_logits(theirs, x)) <= 1e-4
    again = from_pretrained(tmp_path / "tuned")
    for (name, p), (_, q) in zip(ours.named_parameters(), again.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_float64_saves_as_float64(tmp_path):
    hf_checkpoint("qwen2", tmp_path / "original")
    ours = from_pretrained(tmp_path / "original", dtype=np.float64)
    save_pretrained(ours, tmp_path / "f64")
    assert json.loads((tmp_path / "f64" / "config.json").read_text())["dtype"] == "float64"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f64")
    assert theirs.dtype == torch.float64
    np.testing.assert_array_equal(theirs.model.embed_tokens.weight.detach().numpy(), ours.embed_tokens.weight.data)


def test_sharded_checkpoints_load_and_are_replaced_whole(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = tokens()
    sharded = from_pretrained(tmp_path / "sharded")
    np.testing.assert_array_equal(sharded(x).data, from_pretrained(tmp_path / "one")(x).data)
    save_pretrained(sharded, tmp_path / "sharded")  # into the sharded directory: one file remains
    names = sorted(path.name for path in (tmp_path / "sharded").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    np.testing.assert_array_equal(from_pretrained(tmp_path / "sharded")(x).data, sharded(x).data)


def test_bfloat16_checkpoints_widen_exactly(tmp_path):
    model = hf_model("mistral").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    expected = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(ours.blocks[0].attn.q_proj.weight.data, expected)
    widened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens()
    assert relative_error(ours(x).data, hf_logits(widened, x)) <= 1e-4


def test_a_model_built_here_round_trips(tmp_path):
    config = {"model_type": "gemma2", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
              "sliding_window": 3}
    model = CausalLM(config, rng=np.random.default_rng(0))
    save_pretrained(model, tmp_path / "new" / "model")
    x = np.random.default_rng(1).integers(0, 50, (1, 9))
    np.testing.assert_array_equal(from_pretrained(tmp_path / "new" / "model")(x).data, model(x).data)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new" / "model").eval()
    assert relative_error(model(x).data, hf_logits(theirs, x)) <= 1e-4
    assert not list((tmp_path / "new").glob(".*"))  # no temporary left behind


def config_of(case, **changes):
    return {**json.loads(hf_model(case).config.to_json_string()), **changes}


# (case, config.json changes, the field the error must name)
BAD_CONFIGS = [
    ("llama", {"model_type": "bert"}, "model_type"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"hidden_size": None}, "hidden_size"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads"),
    ("mistral", {"attention_bias": True}, "attention_bias"),
    ("mistral", {"sliding_window": -4}, "sliding_window"),
    ("qwen2", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"], "use_sliding_window": True,
               "sliding_window": 4}, "layer_types"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
    ("gpt2", {"activation_function": "gelu"}, "activation_function"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
]


@pytest.mark.parametrize(("case", "changes", "field"), BAD_CONFIGS, ids=[b[2] for b in BAD_CONFIGS])
def test_unsupported_config_fields_are_errors_naming_the_field(case, changes, field, tmp_path):
    config = config_of(case, **changes)
    with pytest.raises(ValueError, match=field):
        read_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))  # before any weight is read
    with pytest.raises(ValueError, match=field):
        from_pretrained(tmp_path)


def test_fields_that_do_not_change_the_maths_are_ignored(tmp_path):
    hf_checkpoint("gpt2", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    ignored = {"attn_pdrop": 0.5, "use_cache": False, "bos_token_id": 7, "some_future_field": [1, 2],
               "torch_dtype": "bfloat16", "summary_type": "mean", "reorder_and_upcast_attn": True}
    (tmp_path / "noisy").mkdir()
    (tmp_path / "noisy" / "config.json").write_text(json.dumps({**config, **ignored}))
    (tmp_path / "noisy" / "model.safetensors").symlink_to(tmp_path / "plain" / "model.safetensors")
    x = tokens()
    np.testing.assert_array_equal(from_pretrained(tmp_path / "noisy")(x).data,
                                  from_pretrained(tmp_path / "plain")(x).data)


def test_tensors_that_do_not_match_the_config_are_named(tmp_path):
    hf_checkpoint("qwen2", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors_numpy.load_file(path)
    bias = tensors.pop("model.layers.1.self_attn.k_proj.bias")
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"):
        from_pretrained(tmp_path)
    tensors["model.layers.1.self_attn.k_proj.bias"] = bias
    tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(32, np.float32)  # Qwen2 has none
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensors.*o_proj.bias"):
        from_pretrained(tmp_path)
    tensors.pop("model.layers.1.self_attn.o_proj.bias")
    tensors["model.norm.weight"] = np.ones(31, np.float32)
    safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        from_pretrained(tmp_path)


def test_gpt2_checkpoints_of_the_base_model_load(tmp_path):
    """The original GPT-2 files name tensors without "transformer." and carry the causal-mask
    buffers attn.bias / attn.masked_bias: both are understood."""
    model = hf_checkpoint("gpt2", tmp_path / "full")
    tensors = safetensors_numpy.load_file(tmp_path / "full" / "model.safetensors")
    tensors = {name.removeprefix("transformer."): array for name, array in tensors.items()}
    tensors.update({f"h.{i}.attn.{buffer}": np.tril(np.ones((64, 64), np.float32))
                    for i in range(2) for buffer in ("bias", "masked_bias")})
    (tmp_path / "base").mkdir()
    safetensors_numpy.save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    x = tokens()
    assert relative_error(from_pretrained(tmp_path / "base")(x).data, hf_logits(model, x)) <= 1e-4
    tensors["h.0.mlp.c_fc.scale"] = np.ones(3, np.float32)  # not a buffer GPT-2 has: refused
    safetensors_numpy.save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors \['h.0.mlp.c_fc.scale'\]"):
        from_pretrained(tmp_path / "base")


def test_directories_without_a_checkpoint_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(hf_model("llama").config.to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(tmp_path)


def test_gpt2_stops_at_its_learned_positions(tmp_path):
    hf_checkpoint("gpt2", tmp_path)
    model = from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="n_positions"):
        model(tokens(length=65))
    assert model.generate(tokens(length=60), 5).shape == (2, 65)  # the 5th needs no position 64
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(tokens(length=60), 6)  # the 6th new token needs position 64


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma2", "gpt2"])
def test_keys_left_out_mean_what_they_mean_to_transformers(model_type):
    """A config.json of just the model_type is transformers' default model of the family."""
    arch = read_config({"model_type": model_type})
    theirs = transformers.AutoConfig.for_model(model_type)
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers, arch.num_heads) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads)
    assert arch.num_kv_heads == getattr(theirs, "num_key_value_heads", theirs.num_attention_heads)
    assert arch.head_dim == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    assert arch.tie_embeddings == theirs.tie_word_embeddings
    windows = [getattr(theirs, "sliding_window", None) if kind == "sliding_attention" else None
               for kind in getattr(theirs, "layer_types", None) or ["full_attention"] * arch.num_layers]
    if model_type == "mistral":
        windows = [theirs.sliding_window] * arch.num_layers
    assert list(arch.windows) == windows
    assert arch.attn_softcap == getattr(theirs, "attn_logit_softcapping", None)
    assert arch.final_softcap == getattr(theirs, "final_logit_softcapping", None)


def test_from_pretrained_draws_no_random_weights(tmp_path, monkeypatch):
    """Every weight is overwritten by the checkpoint's: the layers are built under
    nn.skip_init (a 100M-parameter Llama drew them for ~3 s before)."""
    from microattn.nn import layers

    hf_checkpoint("llama", tmp_path / "llama")
    expected = from_pretrained(tmp_path / "llama")

    def refuse(draw, shape, dtype):
        assert getattr(layers._SKIPPING, "on", False), "a weight was initialised randomly"
        return np.zeros(shape, dtype)

    monkeypatch.setattr(layers, "_initial", refuse)
    loaded = from_pretrained(tmp_path / "llama")
    for (name, p), (_, q) in zip(expected.named_parameters(), loaded.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
