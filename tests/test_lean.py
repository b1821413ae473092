"""nn.lean: the one-call decoding step (one token per sequence, KV caches, no graph) against
the modules' path it stands in for, computed on copies of the same caches with
``lean.applies`` switched off: logits and cache contents over several steps for DecoderLM's
options and CausalLM's families, greedy generation, the cases it must leave to the modules,
hostile inputs, and ``KVCache.make_room``. No torch here."""

import contextlib
import copy

import numpy as np
import pytest

import microattn as ma
from microattn import nn
from microattn.models import CausalLM
from microattn.nn import lean

V = 50  # vocabulary of every model here
PROMPT, STEPS = 3, 6  # prompt tokens, then single-token steps (past every window below)
# float32: the two paths sum in other orders (the lean matvec, BLAS); seen up to 2.3e-6 of the
# largest |logit|, float64 up to 2.5e-15
TOLERANCE = {np.float32: {"rtol": 1e-5, "atol": 5e-6}, np.float64: {"rtol": 1e-11, "atol": 1e-13}}


def assert_close(got, expected, dtype):
    """Within TOLERANCE, the atol scaled by the largest |expected|: an entry near 0 is a
    difference of terms as large as the others, and rounds as they do."""
    tolerance = TOLERANCE[np.dtype(dtype).type]
    atol = tolerance["atol"] * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=tolerance["rtol"], atol=atol)


def rng(seed=0):
    return np.random.default_rng(seed)


def counted(monkeypatch, name):
    """A list that grows by one entry at each call of ``lean.<name>`` (which still runs)."""
    calls = []
    function = getattr(lean, name)
    monkeypatch.setattr(lean, name, lambda *args: calls.append(1) or function(*args))
    return calls


@pytest.fixture
def lean_calls(monkeypatch):
    """The lean.decode_step calls so far (one entry per call)."""
    return counted(monkeypatch, "decode_step")


@pytest.fixture
def greedy_calls(monkeypatch):
    """The lean.greedy calls so far (the compiled greedy loop)."""
    return counted(monkeypatch, "greedy")


@contextlib.contextmanager
def modules_path():
    """Every forward inside takes the modules' path (lean.applies says no)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lean, "applies", lambda *args: False)
        yield


def spread(model, seed=0):
    """Matrices x4 (logits spread, greedy decoding moves), vectors (norm weights and biases,
    initialised to constants) perturbed so that every one of them matters."""
    r = rng(seed)
    for param in model.parameters():
        if param.ndim == 2:
            param.data = param.data * 4
        else:
            param.data = (param.data + 0.3 * r.standard_normal(param.shape)).astype(param.dtype)
    return model


def decoder_lm(dtype=np.float32, seed=0, **options):
    options = {"embed_dim": 32, "num_layers": 2, "num_heads": 4, **options}
    return spread(nn.DecoderLM(V, 16, **options, dtype=dtype, rng=rng(seed)), seed)


def prefilled(model, batch, seed=1):
    """(caches holding a prompt of PROMPT tokens, the STEPS tokens that follow (B, STEPS)).
    The prompt goes through the modules (lean prompts have tests of their own)."""
    tokens = rng(seed).integers(0, V, (batch, PROMPT + STEPS))
    caches = model.make_caches()
    with ma.no_grad(), modules_path():
        model(tokens[:, :PROMPT], kv_caches=caches)
    return caches, tokens[:, PROMPT:]


def single_steps(model, caches, tokens):
    """Logits (B, steps, V) of feeding ``tokens`` (B, steps) one per forward, under no_grad."""
    with ma.no_grad():
        return np.concatenate([model(tokens[:, i : i + 1], kv_caches=caches).data
                               for i in range(tokens.shape[1])], axis=1)


def both_paths(model, caches, tokens, lean_calls):
    """Lean and modules' (logits, caches) of the same single steps from copies of ``caches``."""
    lean_caches, module_caches = copy.deepcopy(caches), copy.deepcopy(caches)
    calls = len(lean_calls) + tokens.shape[1]
    lean_logits = single_steps(model, lean_caches, tokens)
    assert len(lean_calls) == calls  # every step took the lean path
    with modules_path():
        module_logits = single_steps(model, module_caches, tokens)
    assert len(lean_calls) == calls
    return (lean_logits, lean_caches), (module_logits, module_caches)


def both_prompts(model, caches, tokens, lean_calls):
    """Lean and modules' (logits, caches) of ``tokens`` (B, T) fed as one forward (a prompt)
    after copies of ``caches``."""
    lean_caches, module_caches = copy.deepcopy(caches), copy.deepcopy(caches)
    calls = len(lean_calls) + 1
    with ma.no_grad():
        lean_logits = model(tokens, kv_caches=lean_caches).data
        assert len(lean_calls) == calls
        with modules_path():
            module_logits = model(tokens, kv_caches=module_caches).data
    assert len(lean_calls) == calls
    return (lean_logits, lean_caches), (module_logits, module_caches)


def assert_same(lean_result, module_result, dtype):
    (lean_logits, lean_caches), (module_logits, module_caches) = lean_result, module_result
    assert lean_logits.dtype == module_logits.dtype == dtype
    assert_close(lean_logits, module_logits, dtype)
    for got, expected in zip(lean_caches, module_caches):
        assert got.length == expected.length
        assert_close(got.k, expected.k, dtype)
        assert_close(got.v, expected.v, dtype)


# ----------------------------------------------------------------------------- parity: DecoderLM


DECODER_CASES = {  # name -> (batch, dtype, DecoderLM options)
    "layernorm-gelu-rope": (1, np.float32, {}),
    "rmsnorm-silu-rope": (3, np.float64, {"norm": "rmsnorm", "activation": "silu"}),
    "layernorm-relu-positions": (3, np.float32, {"activation": "relu", "rope": False}),
    "rmsnorm-swiglu-gqa": (3, np.float32, {"norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 2}),
    "layernorm-geglu-mqa": (1, np.float64, {"activation": "geglu", "num_kv_heads": 1}),
    "rmsnorm-swiglu-gqa-window": (3, np.float32, {"norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 2,
                                                  "attention": "window", "window": 2}),
    "layernorm-gelu-window-1-positions": (3, np.float64, {"attention": "window", "window": 1, "rope": False}),
    "rmsnorm-relu-mqa-window": (3, np.float64, {"norm": "rmsnorm", "activation": "relu", "num_kv_heads": 1,
                                                "attention": "window", "window": 3}),
    "layernorm-silu-positions": (1, np.float64, {"activation": "silu", "rope": False}),
    "rmsnorm-geglu-rope": (3, np.float32, {"norm": "rmsnorm", "activation": "geglu"}),
    "layernorm-swiglu-window-positions": (3, np.float64, {"activation": "swiglu", "attention": "window",
                                                          "window": 2, "rope": False}),
    "rmsnorm-gelu-mqa-window-0": (1, np.float32, {"norm": "rmsnorm", "num_kv_heads": 1, "attention": "window",
                                                  "window": 0}),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_lm_lean_steps_equal_the_modules_path(case, lean_calls):
    """Logits of every step and the cached k, v after them, for DecoderLM's options."""
    batch, dtype, options = DECODER_CASES[case]
    model = decoder_lm(dtype, **options).eval()
    caches, tokens = prefilled(model, batch)
    assert_same(*both_paths(model, caches, tokens, lean_calls), dtype)


@pytest.mark.parametrize("cached", [0, PROMPT], ids=["empty-cache", "after-a-prompt"])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_lm_lean_prompts_equal_the_modules_path(case, cached, lean_calls):
    """STEPS tokens in one forward, from an empty cache or after PROMPT cached tokens (the
    band's diagonal and RoPE's positions move): logits and the cached k, v."""
    batch, dtype, options = DECODER_CASES[case]
    model = decoder_lm(dtype, **options).eval()
    caches, tokens = prefilled(model, batch)
    if not cached:
        caches = model.make_caches()
    assert_same(*both_prompts(model, caches, tokens, lean_calls), dtype)


def test_lean_and_module_steps_can_alternate():
    """Caches extended by the lean path carry on under the modules' path and back: the same
    logits as feeding the whole sequence at once."""
    model = decoder_lm(np.float64, num_kv_heads=2, attention="window", window=3).eval()
    tokens = rng(2).integers(0, V, (2, 10))
    with ma.no_grad():
        full = model(tokens).data
        caches = model.make_caches()
        parts = [model(tokens[:, :2], kv_caches=caches).data]
        for i in range(2, 10):
            if i % 3 == 0:
                with modules_path():
                    parts.append(model(tokens[:, i : i + 1], kv_caches=caches).data)
            else:
                parts.append(model(tokens[:, i : i + 1], kv_caches=caches).data)
    assert_close(np.concatenate(parts, axis=1), full, np.float64)


# ----------------------------------------------------------------------------- parity: CausalLM


COMMON = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
WINDOW = 3  # Hugging Face's sliding_window: shorter than the sequences decoded here
# as tests/models/oracle.py's CASES, as plain config.json dicts (no transformers needed)
CONFIGS = {
    "llama": {"model_type": "llama", **COMMON},  # RoPE halves, GQA, RMSNorm, swiglu, no biases
    "llama3-mqa-biases": {"model_type": "llama", **COMMON, "num_key_value_heads": 1, "attention_bias": True,
                          "mlp_bias": True, "tie_word_embeddings": True, "rope_scaling": {
                              "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 4}},
    "qwen2": {"model_type": "qwen2", **COMMON, "use_sliding_window": True, "sliding_window": WINDOW,
              "max_window_layers": 1},  # q/k/v biases; layer 0 full, layer 1 windowed
    "gemma2": {"model_type": "gemma2", **COMMON, "head_dim": 16, "sliding_window": WINDOW,
               "query_pre_attn_scalar": 12, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 10.0},
    "gpt2": {"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16},
}


def causal_lm(case, dtype=np.float32, seed=0):
    return spread(CausalLM(CONFIGS[case], dtype=dtype, rng=rng(seed)), seed).eval()


def test_the_configs_have_what_they_are_here_for():
    """Each CausalLM case builds the parts it is meant to exercise, and all of them are lean."""
    gemma, qwen = causal_lm("gemma2"), causal_lm("qwen2")
    assert gemma.arch.embed_scale and gemma.arch.final_softcap and gemma.arch.attn_softcap
    assert gemma.blocks[0].post_norm_1 is not None and gemma.norm.offset == 1.0
    assert [block.attn.attention for block in gemma.blocks] == ["window", "flash"]
    assert [block.attn.attention for block in qwen.blocks] == ["flash", "window"]
    assert qwen.blocks[0].attn.q_proj.bias is not None and qwen.blocks[0].attn.out_proj.bias is None
    assert causal_lm("llama").blocks[0].attn.rope.pairs == "halves"
    for case in CONFIGS:
        assert all(lean.block_reason(block) is None for block in causal_lm(case).blocks), case


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_causal_lm_lean_steps_equal_the_modules_path(case, dtype, lean_calls):
    model = causal_lm(case, dtype)
    caches, tokens = prefilled(model, 2)
    assert_same(*both_paths(model, caches, tokens, lean_calls), dtype)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_causal_lm_lean_prompts_equal_the_modules_path(case, lean_calls):
    model = causal_lm(case, np.float64)
    caches, tokens = prefilled(model, 2)
    assert_same(*both_prompts(model, caches, tokens, lean_calls), np.float64)


# ----------------------------------------------------------------------------- generate


GENERATE_MODELS = {  # name -> (model, whether greedy decoding runs as one compiled loop)
    "decoder_lm-rope-gqa": (lambda: decoder_lm(np.float64, norm="rmsnorm", activation="swiglu",
                                               num_kv_heads=2), True),
    "decoder_lm-positions-float32": (lambda: decoder_lm(np.float32, rope=False), True),
    "llama": (lambda: causal_lm("llama", np.float64), True),
    "gpt2": (lambda: causal_lm("gpt2", np.float64), True),
    "gemma2-embed-scale-final-softcap": (lambda: causal_lm("gemma2", np.float64), False),
}


def greedy_generate(model, prompt, count, **options):
    if isinstance(model, CausalLM):
        return model.generate(prompt, count, **options)
    return model.generate(prompt, count, greedy=True, **options)


@pytest.mark.parametrize("case", list(GENERATE_MODELS))
def test_greedy_generate_is_the_same_with_and_without_the_lean_path(case, lean_calls, greedy_calls):
    """The prompt's forward is one lean call; then either the compiled greedy loop (one
    call for every token) or one lean step a token (a final softcap: the argmax is taken
    after tanh); and with ``on_token`` (streaming) always one step a token."""
    make, loop = GENERATE_MODELS[case]
    model = make()
    prompt = rng(3).integers(0, V, (2, 3))
    tokens = greedy_generate(model, prompt, 10)
    assert (len(lean_calls), len(greedy_calls)) == ((1, 1) if loop else (10, 0))
    streamed = []
    np.testing.assert_array_equal(greedy_generate(model, prompt, 10, on_token=streamed.append), tokens)
    assert (len(lean_calls), len(greedy_calls)) == ((11, 1) if loop else (20, 0))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), tokens[:, 3:])
    with modules_path():
        np.testing.assert_array_equal(greedy_generate(model, prompt, 10), tokens)
    assert len(set(tokens[:, 3:].ravel().tolist())) > 2  # decoding moves: a real comparison


def test_greedy_loop_picks_a_nan_logit_as_np_argmax_does(greedy_calls):
    """A NaN logit is the argmax (np.argmax's first NaN), in the loop as in Python."""
    model = decoder_lm(np.float64)
    model.lm_head.weight.data[7, 0] = np.nan  # token 7's logit: NaN at every step
    prompt = rng(3).integers(0, V, (2, 3))
    tokens = model.generate(prompt, 6)
    assert len(greedy_calls) == 1
    np.testing.assert_array_equal(tokens[:, 3:], 7)
    with modules_path():
        np.testing.assert_array_equal(model.generate(prompt, 6), tokens)


def test_greedy_generate_past_max_len_is_the_modules_error(greedy_calls):
    """The loop would pass max_len: the steps run one by one and stop where forward does."""
    model = decoder_lm(np.float64, rope=False)  # max_len 16
    prompt = rng(3).integers(0, V, (1, 3))
    with pytest.raises(ValueError, match="exceeds max_len 16"):
        model.generate(prompt, 15)
    assert not greedy_calls
    assert model.generate(prompt, 13).shape == (1, 16)
    assert len(greedy_calls) == 1


def test_sampling_steps_one_token_at_a_time(lean_calls, greedy_calls):
    model = decoder_lm(np.float64)
    model.generate(rng(3).integers(0, V, (2, 3)), 5, greedy=False, rng=rng(1))
    assert (len(lean_calls), len(greedy_calls)) == (5, 0)


# ----------------------------------------------------------------------------- when it must not apply


def next_logits(model, caches, token):
    with ma.no_grad():
        return model(token, kv_caches=copy.deepcopy(caches)).data


def test_not_with_grad_enabled_a_graph_is_recorded(lean_calls):
    model = decoder_lm(np.float64).eval()
    caches, tokens = prefilled(model, 2)
    expected = next_logits(model, caches, tokens[:, :1])  # lean
    assert len(lean_calls) == 1
    assert not lean.applies(model, tokens[:, :1], caches)  # grad is on here
    logits = model(tokens[:, :1], kv_caches=caches)
    assert len(lean_calls) == 1 and logits.requires_grad
    assert_close(logits.data, expected, np.float64)
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None and model.blocks[0].attn.q_proj.weight.grad is not None


def test_two_tokens_give_the_logits_of_two_lean_steps(lean_calls):
    model = decoder_lm(np.float64, activation="geglu").eval()
    caches, tokens = prefilled(model, 3)
    with ma.no_grad():
        two = model(tokens[:, :2], kv_caches=copy.deepcopy(caches)).data
        assert len(lean_calls) == 1
        steps = single_steps(model, caches, tokens[:, :2])
    assert len(lean_calls) == 3
    assert_close(two, steps, np.float64)


@pytest.mark.parametrize("T, cached, lean_", [
    (1, 10**6, True),  # one token: lean after any cache
    (128, 0, True), (129, 0, False),  # 128 * 128 = MAX_SCORES
    (64, 192, True), (64, 193, False), (2, 8190, True), (2, 8191, False),
])
def test_a_prompt_is_lean_while_its_scores_are_few(T, cached, lean_):
    """T new tokens after n cached ones: lean while T * (n + T) <= MAX_SCORES (the step's
    attention is one thread's); longer prompts take the modules' flash kernel."""
    assert lean.MAX_SCORES == 128 * 128
    model = decoder_lm(np.float64).eval()
    caches = model.make_caches()
    for cache in caches:
        cache.length = cached
    with ma.no_grad():
        assert lean.applies(model, np.zeros((1, T), dtype=np.int64), caches) == lean_


def test_not_without_caches(lean_calls):
    model = decoder_lm(np.float64).eval()
    token = np.array([[7], [8]])
    with ma.no_grad():
        assert not lean.applies(model, token, None)
        logits = model(token).data
        assert not lean_calls
        assert_close(model(token, kv_caches=model.make_caches()).data, logits, np.float64)
    assert len(lean_calls) == 1  # with (empty) caches: lean, from position 0


def test_not_in_training_with_dropout_but_with_dropout_zero(lean_calls):
    model = decoder_lm(np.float64, dropout=0.2)
    caches, tokens = prefilled(model.eval(), 2)
    token = tokens[:, :1]
    with ma.no_grad():
        model.train()
        assert not lean.applies(model, token, caches)
        model(token, kv_caches=copy.deepcopy(caches))
        assert not lean_calls
        model.eval()
        assert lean.applies(model, token, caches)
    without = decoder_lm(np.float64).train()  # dropout 0: training mode changes nothing
    caches, tokens = prefilled(without, 2)
    with ma.no_grad():
        assert lean.applies(without, token, caches)
    assert_same(*both_paths(without, caches, tokens, lean_calls), np.float64)


@pytest.mark.parametrize("backend", ["reference", "composed"])
def test_not_on_another_backend(backend, lean_calls):
    model = decoder_lm(np.float64, num_kv_heads=2).eval()
    other = decoder_lm(np.float64, num_kv_heads=2, backend=backend).eval()  # the same weights
    assert lean.block_reason(other.blocks[0]) == f"backend {backend!r} does not run on the CPU kernels"
    caches, tokens = prefilled(model, 2)
    other_caches, _ = prefilled(other, 2)
    with ma.no_grad():
        assert not lean.applies(other, tokens[:, :1], other_caches)
    expected = single_steps(model, caches, tokens)
    assert len(lean_calls) == STEPS
    got = single_steps(other, other_caches, tokens)
    assert len(lean_calls) == STEPS
    assert_close(got, expected, np.float64)


class WrappedMLP(nn.Module):
    """An MLP of another class (the same maths as the one it wraps)."""

    def __init__(self, mlp):
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        return self.inner(x)


class CustomBlock(nn.TransformerBlock):
    pass


class CustomNorm(nn.RMSNorm):
    pass


def rebuilt(block, cls=nn.TransformerBlock, **parts):
    parts = {"norm_1": block.norm_1, "attn": block.attn, "norm_2": block.norm_2, "mlp": block.mlp, **parts}
    return cls.from_parts(**parts)


def custom_norm(norm):
    custom = CustomNorm(norm.dim, eps=norm.eps, dtype=norm.weight.dtype)
    custom.weight = norm.weight
    return custom


CUSTOM_BLOCKS = {  # name -> (block 1 -> its replacement, what block_reason says)
    "subclass": (lambda block: rebuilt(block, CustomBlock), "CustomBlock is not a TransformerBlock"),
    "mlp": (lambda block: rebuilt(block, mlp=WrappedMLP(block.mlp)), "the MLP is not nn.MLP"),
    "norm": (lambda block: rebuilt(block, norm_2=custom_norm(block.norm_2)), "a norm is not"),
}


@pytest.mark.parametrize("case", list(CUSTOM_BLOCKS))
def test_not_with_a_block_it_does_not_know(case, lean_calls):
    model = decoder_lm(np.float64, norm="rmsnorm", activation="swiglu").eval()
    caches, tokens = prefilled(model, 2)
    expected = single_steps(model, copy.deepcopy(caches), tokens)
    assert len(lean_calls) == STEPS
    replace, reason = CUSTOM_BLOCKS[case]
    model.blocks = nn.ModuleList([model.blocks[0], replace(model.blocks[1])])
    assert lean.block_reason(model.blocks[0]) is None
    assert reason in lean.block_reason(model.blocks[1])
    with ma.no_grad():
        assert not lean.applies(model, tokens[:, :1], caches)
    got = single_steps(model, caches, tokens)
    assert len(lean_calls) == STEPS
    assert_close(got, expected, np.float64)


def test_not_with_linear_attention():
    model = decoder_lm(np.float64, attention="linear", rope=False).eval()
    assert "flash or window" in lean.block_reason(model.blocks[0])
    caches, tokens = prefilled(model, 1)
    with ma.no_grad():
        assert not lean.applies(model, tokens[:, :1], caches)


def test_the_lean_step_follows_changes_to_the_model(lean_calls):
    """A parameter's data, a replaced Parameter or module, a dropout's p set after lean
    steps ran: the next lean step sees them (the same as the modules' path) or stands aside."""
    model = decoder_lm(np.float64, norm="rmsnorm", activation="swiglu", num_kv_heads=2).train()
    caches, tokens = prefilled(model, 2)
    single_steps(model, caches, tokens[:, :1])
    model.blocks[0].mlp.fc_gate.weight.data = model.blocks[0].mlp.fc_gate.weight.data * -1.5
    model.blocks[1].attn.v_proj.weight = nn.Parameter(rng(7).standard_normal((16, 32)))
    norm = nn.RMSNorm(32, offset=1.0, dtype=np.float64)
    norm.weight.data = rng(8).standard_normal(32) * 0.3
    model.blocks[1].norm_2 = norm
    model.norm = nn.LayerNorm(32, dtype=np.float64)
    assert_same(*both_paths(model, caches, tokens[:, 1:], lean_calls), np.float64)
    model.blocks[1].dropout.p = 0.5
    with ma.no_grad():
        assert not lean.applies(model, tokens[:, :1], caches)
        model.eval()
        assert lean.applies(model, tokens[:, :1], caches)


def test_not_when_a_block_is_in_training_mode_with_dropout():
    model = decoder_lm(np.float64, dropout=0.3).eval()
    caches, tokens = prefilled(model, 2)
    model.blocks[1].train()
    with ma.no_grad():
        assert not lean.applies(model, tokens[:, :1], caches)


def test_weights_in_another_memory_layout(lean_calls):
    model = decoder_lm(np.float64).eval()
    caches, tokens = prefilled(model, 2)
    weight = model.blocks[1].attn.q_proj.weight
    model.blocks[1].attn.q_proj.weight = nn.Parameter(np.asfortranarray(weight.data))
    assert_same(*both_paths(model, caches, tokens[:, :2], lean_calls), np.float64)


# ----------------------------------------------------------------------------- hostile input


def lengths(caches):
    return [cache.length for cache in caches]


HOSTILE_MODELS = {"decoder_lm": lambda: decoder_lm(np.float32).eval(), "gemma2": lambda: causal_lm("gemma2")}


def snapshot(caches):
    return [(cache.length, cache.k.copy(), cache.v.copy()) for cache in caches]


def assert_unchanged(caches, before):
    for cache, (length, k, v) in zip(caches, before):
        assert cache.length == length
        np.testing.assert_array_equal(cache.k, k)
        np.testing.assert_array_equal(cache.v, v)


BAD_INPUTS = {  # (batch of the prompt, the step's tokens, the error, what it says)
    "token id V": (2, np.array([[3], [V]]), ValueError, "token ids"),
    "token id -1": (2, np.array([[3], [-1]]), ValueError, "token ids"),
    "float tokens": (1, np.array([[3.0]]), TypeError, "integer tokens"),
    "another batch size": (2, np.array([[1], [2], [3]]), ValueError, r"reset\(\)"),
    "token id V in a prompt": (2, np.array([[3, 4], [5, V]]), ValueError, "token ids"),
    "a prompt of another batch size": (2, np.array([[1, 2], [2, 3], [3, 4]]), ValueError, r"reset\(\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("model", list(HOSTILE_MODELS))
def test_bad_input_is_an_error_before_any_cache_changes(model, case):
    batch, tokens, error, says = BAD_INPUTS[case]
    model = HOSTILE_MODELS[model]()
    caches, _ = prefilled(model, batch)
    before = snapshot(caches)
    with ma.no_grad():
        assert lean.applies(model, tokens, caches)
        with pytest.raises(error, match=says):
            model(tokens, kv_caches=caches)
    assert_unchanged(caches, before)


@pytest.mark.parametrize("model", list(HOSTILE_MODELS))
def test_caches_of_different_lengths_are_an_error(model):
    model = HOSTILE_MODELS[model]()
    short, _ = prefilled(model, 2)
    with ma.no_grad():
        model(np.array([[1], [2]]), kv_caches=short)
    longer = copy.deepcopy(short)
    with ma.no_grad():
        model(np.array([[1], [2]]), kv_caches=longer)
    for mixed in ([short[0], longer[1]], [longer[0], short[1]]):
        before = snapshot(mixed)
        with ma.no_grad(), pytest.raises(ValueError, match="different lengths"):
            model(np.array([[1], [2]]), kv_caches=mixed)
        assert_unchanged(mixed, before)


def test_decoding_past_max_len_is_an_error(lean_calls):
    model = nn.DecoderLM(V, PROMPT + 1, embed_dim=32, num_heads=4, rng=rng()).eval()
    caches, _ = prefilled(model, 2)
    with ma.no_grad():
        model(np.array([[1], [2]]), kv_caches=caches)  # position max_len - 1: the last one
        assert len(lean_calls) == 1
        with pytest.raises(ValueError, match="max_len"):
            model(np.array([[1], [2]]), kv_caches=caches)
    assert lengths(caches) == [PROMPT + 1] * 2


def test_decoding_past_the_learned_positions_is_an_error(lean_calls):
    model = causal_lm("gpt2")
    caches = model.make_caches()
    with ma.no_grad():
        model(rng().integers(0, V, (1, 15)), kv_caches=caches)  # a lean prompt
        model(np.array([[1]]), kv_caches=caches)  # position 15 of n_positions 16
        assert len(lean_calls) == 2
        with pytest.raises(ValueError, match="n_positions"):
            model(np.array([[1]]), kv_caches=caches)
    assert lengths(caches) == [16] * 2


@pytest.mark.parametrize("model", [lambda: causal_lm("qwen2"), lambda: decoder_lm(np.float32).eval()])
def test_caches_without_capacity_grow_by_doubling(model, lean_calls):
    """Caches with no capacity (CausalLM.make_caches()'s default) grow under the lean step,
    keeping what they hold: the same logits and contents as the modules' path."""
    model = model()
    caches = [nn.KVCache() for _ in model.blocks]
    tokens = rng(5).integers(0, V, (2, 14))
    with ma.no_grad():
        model(tokens[:, :1], kv_caches=caches)  # lean from position 0: capacity 1
    assert [cache._k.shape[2] for cache in caches] == [1, 1]
    lean_caches, module_caches = copy.deepcopy(caches), copy.deepcopy(caches)
    seen = set()
    with ma.no_grad():
        lean_logits = []
        for i in range(1, 14):
            lean_logits.append(model(tokens[:, i : i + 1], kv_caches=lean_caches).data)
            seen.add(lean_caches[0]._k.shape[2])
    assert seen == {2, 4, 8, 16} and len(lean_calls) == 14
    with modules_path():
        module_logits = single_steps(model, module_caches, tokens[:, 1:])
    assert_same((np.concatenate(lean_logits, axis=1), lean_caches), (module_logits, module_caches), np.float32)


# ----------------------------------------------------------------------------- KVCache.make_room


def test_make_room_hands_out_the_storage_and_where_new_rows_go():
    cache = nn.KVCache(capacity=8)
    k_store, v_store, start = cache.make_room((2, 1, 3, 4), (2, 1, 3, 5), np.float64)
    assert start == 0 and k_store.shape == (2, 1, 8, 4) and v_store.shape == (2, 1, 8, 5)
    assert k_store.dtype == v_store.dtype == np.float64
    assert k_store is cache._k and v_store is cache._v
    k_store[:, :, :3], v_store[:, :, :3] = 1.0, 2.0
    cache.length = 3
    again = cache.make_room((2, 1, 5, 4), (2, 1, 5, 5), np.float64)  # fits: the same storage
    assert again[0] is k_store and again[1] is v_store and again[2] == 3
    assert cache.length == 3  # the caller sets it
    np.testing.assert_array_equal(cache.k, np.ones((2, 1, 3, 4)))
    np.testing.assert_array_equal(cache.v, np.full((2, 1, 3, 5), 2.0))


def test_make_room_grows_by_doubling_and_keeps_the_rows():
    cache = nn.KVCache()
    rows = rng().standard_normal((1, 2, 9, 3))
    capacities = []
    for n in range(9):
        k_store, v_store, start = cache.make_room((1, 2, 1, 3), (1, 2, 1, 3), np.float32)
        assert start == n
        k_store[:, :, n], v_store[:, :, n] = rows[:, :, n], -rows[:, :, n]
        cache.length = n + 1
        capacities.append(k_store.shape[2])
        np.testing.assert_array_equal(cache.k, rows[:, :, : n + 1].astype(np.float32))
        np.testing.assert_array_equal(cache.v, -rows[:, :, : n + 1].astype(np.float32))
    assert capacities == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    _, _, start = cache.make_room((1, 2, 30, 3), (1, 2, 30, 3), np.float32)  # past double: as needed
    assert start == 9 and cache._k.shape[2] == 39 and cache._v.shape[2] == 39
    np.testing.assert_array_equal(cache.k, rows.astype(np.float32))


@pytest.mark.parametrize("k_shape, v_shape", [
    ((3, 2, 1, 4), (3, 2, 1, 5)),  # batch
    ((2, 1, 1, 4), (2, 1, 1, 5)),  # kv heads
    ((2, 2, 1, 6), (2, 2, 1, 5)),  # key head dim
    ((2, 2, 1, 4), (2, 2, 1, 4)),  # value head dim
])
def test_make_room_refuses_other_shapes(k_shape, v_shape):
    cache = nn.KVCache(capacity=4)
    cache.make_room((2, 2, 1, 4), (2, 2, 1, 5), np.float64)
    cache.length = 1
    k_store = cache._k
    with pytest.raises(ValueError, match=r"reset\(\)"):
        cache.make_room(k_shape, v_shape, np.float64)
    assert cache._k is k_store and cache.length == 1


def test_make_room_refuses_another_dtype():
    """float32 rows into a float64 cache would be cast silently: a ValueError instead."""
    cache = nn.KVCache(capacity=4)
    cache.make_room((1, 2, 1, 4), (1, 2, 1, 4), np.float64)
    with pytest.raises(ValueError, match=r"float64 keys; cannot append float32"):
        cache.make_room((1, 2, 1, 4), (1, 2, 1, 4), np.float32)


# -- the helper thread (kernels/cpu/team.py's claim board) ---------------------------------


@contextlib.contextmanager
def numba_threads(n):
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def test_the_helper_changes_nothing_but_the_time():
    """Alone (one numba thread: no helper) and with the helper: bit for bit the same logits,
    since each chunk of rows is computed by the same code whoever claims it."""
    model = decoder_lm(np.float32, num_layers=3).eval()
    with numba_threads(1):
        caches, tokens = prefilled(model, 2)
        alone = single_steps(model, caches, tokens)
    caches, tokens = prefilled(model, 2)
    together = single_steps(model, caches, tokens)
    np.testing.assert_array_equal(together, alone)


def test_steps_of_two_models_in_turn():
    """The helper's arrays follow the model of each step (another shape each time)."""
    small, wide = decoder_lm(np.float64).eval(), decoder_lm(np.float64, embed_dim=48, seed=3).eval()
    runs = {name: prefilled(model, 1) for name, model in (("small", small), ("wide", wide))}
    got = {"small": [], "wide": []}
    with ma.no_grad():
        for i in range(STEPS):
            for name, model in (("small", small), ("wide", wide)):
                caches, tokens = runs[name]
                got[name].append(model(tokens[:, i : i + 1], kv_caches=caches).data)
    for name, model in (("small", small), ("wide", wide)):
        caches, tokens = prefilled(model, 1)
        with modules_path():
            expected = single_steps(model, caches, tokens)
        assert_close(np.concatenate(got[name], axis=1), expected, np.float64)


def test_two_threads_decoding_at_once():
    """Two Python threads decoding two models at the same time: one has the helper, the
    other runs alone on a board of its own; both get their sequential answers."""
    import threading

    models = [decoder_lm(np.float64, seed=s).eval() for s in (0, 1)]
    prompts = [prefilled(m, 2) for m in models]  # here: prefilled patches lean.applies a while
    expected = [single_steps(m, copy.deepcopy(caches), tokens) for m, (caches, tokens) in zip(models, prompts)]
    results = [None, None]

    def decode(i):
        caches, tokens = prompts[i]
        results[i] = single_steps(models[i], caches, tokens)

    threads = [threading.Thread(target=decode, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a decoding thread hung"
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def _child_decodes(queue):
    model = decoder_lm(np.float64).eval()
    caches, tokens = prefilled(model, 1)
    queue.put(single_steps(model, caches, tokens))


def test_a_forked_child_decodes():
    """After fork the child has no helper thread, whatever the parent's board said: it
    must neither hang waiting for one nor differ."""
    import multiprocessing

    model = decoder_lm(np.float64).eval()
    caches, tokens = prefilled(model, 1)
    expected = single_steps(model, caches, tokens)  # the parent's helper is awake now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_decodes, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_in_place_parameter_updates_are_seen(norm):
    """The plan keeps the step's arrays while each Parameter's .data is the same array:
    an in-place update (an optimizer's ``param.data -= ...``) must still reach the next
    step, as must one of a parameter whose array the step derives (RMSNorm's offset)."""
    model = decoder_lm(np.float64, norm=norm).eval()
    if norm == "rmsnorm":
        model.blocks[0].norm_2.offset = 1.0  # Gemma's 1 + weight: derived every step
    twin = copy.deepcopy(model)

    def update(m):
        m.blocks[0].norm_1.weight.data *= 3
        m.blocks[0].norm_2.weight.data -= 0.5
        m.blocks[1].mlp.fc_in.weight.data += 0.1

    caches, tokens = prefilled(model, 1)
    single_steps(model, caches, tokens[:, :1])  # the plan keeps its arrays now
    update(model)
    got = single_steps(model, caches, tokens[:, 1:3])
    with modules_path():
        caches, tokens = prefilled(twin, 1)
        single_steps(twin, caches, tokens[:, :1])
        update(twin)
        expected = single_steps(twin, caches, tokens[:, 1:3])
    assert_close(got, expected, np.float64)


def test_layers_of_different_widths_take_the_modules_path():
    """The step's buffers are shared by the layers; a model whose blocks differ in MLP
    width (assembled by hand) is left to the modules, and still right."""
    model = decoder_lm(np.float64).eval()
    wide = nn.TransformerBlock(32, 4, mlp_ratio=2, dtype=np.float64, rng=rng(5))
    model.blocks = nn.ModuleList([model.blocks[0], wide])
    caches, tokens = prefilled(model, 1)
    with ma.no_grad():
        assert not lean.applies(model, tokens[:, :1], caches)
    assert single_steps(model, caches, tokens).shape == (1, STEPS, V)


def test_an_empty_batch_is_the_same_error_on_both_paths():
    model = decoder_lm(np.float32).eval()
    tokens = np.zeros((0, 1), dtype=np.int64)
    with ma.no_grad():
        assert lean.applies(model, tokens, model.make_caches())
        with pytest.raises(ValueError, match="empty dimension"):
            model(tokens, kv_caches=model.make_caches())
        with modules_path(), pytest.raises(ValueError, match="empty dimension"):
            model(tokens, kv_caches=model.make_caches())


def test_greedy_runs_in_chunks_with_the_caches_kept_up(monkeypatch, greedy_calls):
    """Chunks of GREEDY_CHUNK steps (Python, and Ctrl-C, between them): the same tokens
    as the per-step path, and after an interruption between chunks the caches hold
    exactly the tokens decoded so far."""
    monkeypatch.setattr(lean, "GREEDY_CHUNK", 3)
    model = decoder_lm(np.float64)
    prompt = rng(3).integers(0, V, (2, 3))
    tokens = model.generate(prompt, 10)  # 9 steps after the prompt: chunks of 3, 3, 3
    with modules_path():
        np.testing.assert_array_equal(model.generate(prompt, 10), tokens)
    chunks = []
    loop = lean._greedy
    monkeypatch.setattr(lean, "_greedy", lambda *args: chunks.append(args[-1].shape[1] - 1) or loop(*args))
    caches = model.make_caches()
    with ma.no_grad():
        model(prompt, kv_caches=caches)
        lean.greedy(model, tokens[:, 3:4], caches, 7, (model.token_embedding.weight.data, None, 1.0))
    assert chunks == [3, 3, 1] and [cache.length for cache in caches] == [10, 10]

    def interrupted(*args):
        if len(chunks) == 4:
            raise KeyboardInterrupt
        return chunks.append(args[-1].shape[1] - 1) or loop(*args)

    monkeypatch.setattr(lean, "_greedy", interrupted)
    caches = model.make_caches()
    with ma.no_grad(), pytest.raises(KeyboardInterrupt):
        model(prompt, kv_caches=caches)
        lean.greedy(model, tokens[:, 3:4], caches, 7, (model.token_embedding.weight.data, None, 1.0))
    assert [cache.length for cache in caches] == [6, 6]  # the prompt and one chunk
    with modules_path(), ma.no_grad():  # the caches hold the prompt and the first 3 tokens
        expected = model.make_caches()
        model(tokens[:, :6], kv_caches=expected)
    for got, want in zip(caches, expected):
        assert_close(got.k, want.k, np.float64)


def test_rope_tables_grow_past_their_span_and_are_shared_by_the_layers(lean_calls):
    """The RoPE tables cover 64 positions, then 128, ...: steps from position 60 to 70
    cross the first span and equal the modules' path; the layers share one table."""
    model = spread(nn.DecoderLM(V, 200, embed_dim=32, num_layers=2, num_heads=4, dtype=np.float64,
                                rng=rng(0)), 0).eval()
    tokens = rng(9).integers(0, V, (2, 71))
    caches = model.make_caches()
    with ma.no_grad():
        model(tokens[:, :60], kv_caches=caches)
    assert_same(*both_paths(model, caches, tokens[:, 60:], lean_calls), np.float64)
    layers = lean._plan(model).kept_layers[4]
    assert layers[0][2][0] is layers[1][2][0] and layers[0][2][0].shape[0] == 128


MISFITS = {  # what is replaced -> (its new Parameter's shape); embed_dim is 32
    "a norm's weight": lambda m: setattr(m.blocks[0].norm_1, "weight", nn.Parameter(np.ones(16))),
    "a norm's bias": lambda m: setattr(m.blocks[1].norm_2, "bias", nn.Parameter(np.zeros(8))),
    "the final norm's weight": lambda m: setattr(m.norm, "weight", nn.Parameter(np.ones(40))),
    "a wider embedding": lambda m: setattr(m.token_embedding, "weight", nn.Parameter(np.ones((V, 48)))),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_parameters_that_do_not_fit_are_an_error_on_both_paths(case):
    """The compiled step reads norms and embeddings without bounds checks: one that does
    not fit embed_dim must be a ValueError, as on the modules' path, not a read past an
    array (garbage logits, a crash). The lean step checks before it runs: the caches are
    unchanged (the modules' path has extended those of the layers before the misfit)."""
    model = decoder_lm(np.float64).eval()
    MISFITS[case](model)
    for path in (contextlib.nullcontext, modules_path):
        caches = model.make_caches()
        with path(), ma.no_grad(), pytest.raises(ValueError, match="shape"):
            model(np.array([[1, 2]]), kv_caches=caches)
        if path is contextlib.nullcontext:
            assert lengths(caches) == [0, 0]


@pytest.mark.parametrize("head_dim", [4, 16])
def test_a_rope_of_another_head_dim_is_left_to_the_modules(head_dim, lean_calls):
    """The step's rotation takes the rope's width as the heads' (it would write past each
    head's channels): a rope of another head dim is not lean, and the modules say why."""
    model = decoder_lm(np.float64).eval()  # head_dim 8
    model.blocks[1].attn.rope = nn.RotaryEmbedding(head_dim)
    assert lean.block_reason(model.blocks[1]) is not None
    with ma.no_grad(), pytest.raises(ValueError, match="head dim"):
        model(np.array([[1, 2]]), kv_caches=model.make_caches())
    assert not lean_calls


def test_a_parameter_of_another_dtype_is_cast_to_the_models(lean_calls):
    """A float32 LM head in a float64 model: the modules' path promotes it (NumPy), and the
    lean step, compiled for one dtype, computes with it cast to float64: the same logits
    (it raised numba's TypingError, and its helper thread died with it)."""
    model = decoder_lm(np.float64).eval()
    model.lm_head.weight.data = model.lm_head.weight.data.astype(np.float32)
    model.blocks[1].norm_2.bias.data = model.blocks[1].norm_2.bias.data.astype(np.float32)
    caches, tokens = prefilled(model, 2)
    assert_same(*both_paths(model, caches, tokens[:, :2], lean_calls), np.float64)
    assert_same(*both_prompts(model, caches, tokens[:, :3], lean_calls), np.float64)


def test_a_helper_that_fails_leaves_nobody_waiting(monkeypatch):
    """The helper's compiled loop raising (as a typing error would) ends its thread; the
    board must not stay ACTIVE, or the next step that changes the helper's arrays (another
    model) waits forever for it to leave. A later step starts a helper again."""
    import threading
    import time

    def broken(board, team, idle_spins):
        raise RuntimeError("the helper's loop failed")

    first, second = decoder_lm(np.float64).eval(), decoder_lm(np.float64, seed=1).eval()
    caches, tokens = prefilled(first, 1)
    single_steps(first, caches, tokens[:, :1])  # a helper thread is there, asleep or spinning
    helper = lean._HELPER.thread
    monkeypatch.setattr(lean, "_serve", broken)
    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type))
    lean._HELPER.team = None  # the next step hands the helper a new team and wakes it
    single_steps(first, caches, tokens[:, 1:2])
    deadline = time.monotonic() + 30
    while (helper is None or helper.is_alive()) and time.monotonic() < deadline:
        helper = lean._HELPER.thread if helper is None else helper
        time.sleep(0.01)
    monkeypatch.undo()
    assert raised in ([], [RuntimeError])  # [] with one numba thread: no helper
    results = []
    caches, tokens = prefilled(second, 1)
    runner = threading.Thread(target=lambda: results.append(single_steps(second, caches, tokens)), daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "a step waited for a helper that had died"
    caches, tokens = prefilled(second, 1)
    with modules_path():
        assert_close(results[0], single_steps(second, caches, tokens), np.float64)


BAD_CALLS = {  # what a user passes -> (the error, what it says); the caches stay as they were
    "no new token": (lambda m, c: m(np.zeros((2, 0), dtype=np.int64), kv_caches=c), ValueError, "N >= 1"),
    "one cache for two layers": (lambda m, c: m(np.array([[1], [2]]), kv_caches=[c[0], c[0]]),
                                 ValueError, "each layer needs its own"),
    "a float prompt": (lambda m, c: m.generate(np.array([[1.7, 2.2]]), 2), TypeError, "integer token ids"),
    "a bool prompt": (lambda m, c: m.generate(np.array([True, False]), 2), TypeError, "integer token ids"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("model", list(HOSTILE_MODELS))
def test_bad_calls_are_clear_errors_on_every_path(model, case):
    """Errors before any work, with lean on and off: an empty prompt (a TypeError from deep
    inside before), one cache object shared by layers (silently wrong before), and
    non-integer prompts (truncated to ids before)."""
    call, error, says = BAD_CALLS[case]
    model = HOSTILE_MODELS[model]()
    for enabled in (True, False):
        caches, _ = prefilled(model, 2)
        before = snapshot(caches)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lean, "ENABLED", enabled)
            with ma.no_grad(), pytest.raises(error, match=says):
                call(model, caches)
        assert_unchanged(caches, before)
