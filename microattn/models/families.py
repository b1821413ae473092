"""Hugging Face configs, read into one ``Architecture``: the families as tables of choices.

Every family supported here is the same decoder (token embedding -> blocks of norm,
attention, norm, MLP -> final norm -> head) with a few choices changed; a ``Family`` is one
row of those choices, and ``read_config`` turns a config.json (a dict) into the resolved
numbers of one model. What each family changes:

=========  =========  ========  =========  ======================  =====================
family     norm       MLP       positions  attention               extras
=========  =========  ========  =========  ======================  =====================
llama      RMSNorm    gated     RoPE       GQA, attention_bias,    mlp_bias,
                                           rope_scaling llama3     head_dim
mistral    RMSNorm    gated     RoPE       sliding_window          -
qwen2      RMSNorm    gated     RoPE       q/k/v biases, windows   -
                                           (use_sliding_window)
gemma2     1 + w      gated     RoPE       softcap, local/global   post norms, embedding
           RMSNorm                         layers, query_pre_      x sqrt(hidden), final
                                           attn_scalar             logit softcap
gpt2       LayerNorm  GELU      learned    fused c_attn (Conv1D)   tied head
=========  =========  ========  =========  ======================  =====================

A field that would change the maths and is not supported (another architecture, an
unknown rope type, a bias the family does not have, an activation not implemented...)
is a ``ValueError`` naming the field; fields that do not change the maths (token ids,
dropout rates, ``use_cache``, ``dtype``, ``max_position_embeddings`` of RoPE models, ...)
are ignored.

Weight names: ``Family.global_names`` and ``Family.layer_names`` pair module paths of
``microattn.models.CausalLM`` with the checkpoint's; an entry with several of ours (GPT-2's
``c_attn``) is their concatenation along the output axis, and ``conv1d`` marks weights
stored (in, out) rather than (out, in).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..nn.rope import ROPE_SCALINGS


@dataclass(frozen=True)
class Weights:
    """One checkpoint tensor name (without ``.weight``/``.bias``) and the module(s) it fills."""

    ours: tuple[str, ...]  # module paths in CausalLM; several: concatenated along the output axis
    theirs: str
    conv1d: bool = False  # weight stored (in, out), GPT-2's Conv1D


def _names(*pairs) -> tuple[Weights, ...]:
    """(ours, theirs) or (ours, theirs, "conv1d"); ``ours`` a path or a tuple of paths."""
    return tuple(Weights((ours,) if isinstance(ours, str) else ours, theirs, bool(rest))
                 for ours, theirs, *rest in pairs)


LLAMA_GLOBAL = _names(("embed_tokens", "model.embed_tokens"), ("norm", "model.norm"), ("lm_head", "lm_head"))
LLAMA_ATTENTION = _names(("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                         ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                         ("mlp.fc_gate", "mlp.gate_proj"), ("mlp.fc_in", "mlp.up_proj"),
                         ("mlp.fc_out", "mlp.down_proj"))
LLAMA_LAYER = _names(("norm_1", "input_layernorm"), ("norm_2", "post_attention_layernorm")) + LLAMA_ATTENTION
GEMMA2_LAYER = _names(("norm_1", "input_layernorm"), ("post_norm_1", "post_attention_layernorm"),
                      ("norm_2", "pre_feedforward_layernorm"),
                      ("post_norm_2", "post_feedforward_layernorm")) + LLAMA_ATTENTION
GPT2_GLOBAL = _names(("embed_tokens", "transformer.wte"), ("position_embedding", "transformer.wpe"),
                     ("norm", "transformer.ln_f"), ("lm_head", "lm_head"))
GPT2_LAYER = _names(("norm_1", "ln_1"), (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.c_attn", "conv1d"),
                    ("attn.out_proj", "attn.c_proj", "conv1d"), ("norm_2", "ln_2"),
                    ("mlp.fc_in", "mlp.c_fc", "conv1d"), ("mlp.fc_out", "mlp.c_proj", "conv1d"))

# Hugging Face activation names -> nn.MLP's, for a plain and for a gated (act(gate) * up) MLP.
# The tanh GELUs are one function under several names; "gelu" (erf) is not implemented.
PLAIN_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu",
                     "swish": "silu"}
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_new": "geglu", "gelu_pytorch_tanh": "geglu"}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """One family's choices. ``fields`` names the config keys of the common numbers."""

    model_type: str
    architectures: tuple[str, ...]  # the class names config.json's "architectures" may hold
    fields: dict  # vocab, hidden, mlp_hidden, layers, heads, kv_heads, eps, activation -> config key
    norm: str  # "rmsnorm" or "layernorm"
    global_names: tuple[Weights, ...]
    layer_names: tuple[Weights, ...]
    layer_prefix: str  # checkpoint name of layer i: layer_prefix.format(i=i) + theirs
    tie_default: bool
    norm_offset: float = 0.0  # RMSNorm scale (offset + w): Gemma's 1 + w
    post_norms: bool = False  # norms on each branch's output (Gemma 2)
    gated: bool = True  # MLP down(act(gate(x)) * up(x)), else fc_out(act(fc_in(x)))
    positions: str = "rope"  # or "learned" (GPT-2)
    qkv_bias: bool | str = False  # a constant, or the config key that says
    out_bias: bool | str = False
    mlp_bias: bool | str = False
    windows: str = "none"  # how sliding windows are chosen: "none", "all", "qwen2", "gemma2"
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    must_be_off: tuple[str, ...] = ()  # config keys that would change the maths when true
    ignored_weights: tuple[str, ...] = ()  # checkpoint names (suffixes) that are buffers, not weights
    defaults: dict | None = None  # transformers' class defaults, for keys config.json leaves out


LLAMA_FIELDS = {"vocab": "vocab_size", "hidden": "hidden_size", "mlp_hidden": "intermediate_size",
                "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "eps": "rms_norm_eps", "activation": "hidden_act"}
LLAMA_LIKE = {"fields": LLAMA_FIELDS, "norm": "rmsnorm", "global_names": LLAMA_GLOBAL,
              "layer_names": LLAMA_LAYER, "layer_prefix": "model.layers.{i}.", "tie_default": False,
              "ignored_weights": ("rotary_emb.inv_freq",)}
# transformers' defaults (its configuration_*.py) for the keys that change the maths: a
# config.json without a key means the model transformers builds with the default. An
# explicit null keeps its own meaning (derive head_dim, no sliding window, no softcap...).
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
                  "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}

FAMILIES = {family.model_type: family for family in (
    Family("llama", ("LlamaForCausalLM",), **LLAMA_LIKE,
           qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias",
           defaults=LLAMA_DEFAULTS),
    Family("mistral", ("MistralForCausalLM",), **LLAMA_LIKE, windows="all",
           must_be_off=("attention_bias", "mlp_bias"),
           defaults={**LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                     "max_position_embeddings": 4096 * 32, "sliding_window": 4096}),
    Family("qwen2", ("Qwen2ForCausalLM",), **LLAMA_LIKE, qkv_bias=True, windows="qwen2",
           must_be_off=("attention_bias", "mlp_bias"),
           defaults={**LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016,
                     "num_key_value_heads": 32, "max_position_embeddings": 32768,
                     "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}),
    Family("gemma2", ("Gemma2ForCausalLM",), **{**LLAMA_LIKE, "layer_names": GEMMA2_LAYER,
                                               "tie_default": True,
                                               "fields": {**LLAMA_FIELDS, "activation": "hidden_activation"}},
           norm_offset=1.0, post_norms=True, qkv_bias="attention_bias", out_bias="attention_bias",
           windows="gemma2", embed_scale=True, must_be_off=("use_bidirectional_attention", "mlp_bias"),
           defaults={"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
                     "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 8192, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                     "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    Family("gpt2", ("GPT2LMHeadModel",),
           fields={"vocab": "vocab_size", "hidden": "n_embd", "mlp_hidden": "n_inner", "layers": "n_layer",
                   "heads": "n_head", "kv_heads": None, "eps": "layer_norm_epsilon",
                   "activation": "activation_function"},
           norm="layernorm", global_names=GPT2_GLOBAL, layer_names=GPT2_LAYER, layer_prefix="transformer.h.{i}.",
           tie_default=True, gated=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
           must_be_off=("add_cross_attention",), ignored_weights=("attn.bias", "attn.masked_bias"),
           defaults={"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                     "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                     "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}),
)}


@dataclass(frozen=True)
class Architecture:
    """The resolved numbers of one model (``read_config``). Per-layer choices are tuples."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_hidden: int
    activation: str  # nn.MLP's name: "swiglu", "geglu", "gelu", "relu", "silu"
    norm_eps: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    rope_theta: float | None  # None: learned positions
    rope_scaling: functools.partial | None  # frequencies -> frequencies (nn.rope.ROPE_SCALINGS)
    max_positions: int | None  # the learned position table's length
    windows: tuple[int | None, ...]  # per layer: Hugging Face's sliding_window (key j seen iff i - j < w)
    scales: tuple[float, ...]  # per layer: the softmax scale
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None


def unsupported(field: str, value, reason: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} is not supported: {reason}")


def read_config(config: dict) -> Architecture:
    """A Hugging Face config.json (as a dict) -> ``Architecture``; ValueError naming the
    field for anything that would change the maths and is not supported."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (config.json), got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise unsupported("model_type", model_type, f"the families are {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    config = {**family.defaults, **config}
    for name in config.get("architectures") or ():
        if name not in family.architectures:
            raise unsupported("architectures", config["architectures"],
                              f"a {model_type} checkpoint loads as {family.architectures[0]} only")
    for key in family.must_be_off:
        if config.get(key):
            raise unsupported(key, config[key], f"{model_type} models here do not have it")

    f = family.fields
    hidden, heads, layers = _positive(config, f["hidden"]), _positive(config, f["heads"]), _positive(config, f["layers"])
    kv_heads = _positive(config, f["kv_heads"], heads) if f["kv_heads"] else heads  # null: as many as heads
    head_dim = _positive(config, "head_dim", None) if family.positions == "rope" else None  # null: derived
    if head_dim is None:
        if hidden % heads:
            raise unsupported(f["hidden"], hidden, f"not a multiple of {f['heads']}={heads}")
        head_dim = hidden // heads
    mlp_hidden = _positive(config, f["mlp_hidden"], _REQUIRED if family.gated else 4 * hidden)  # n_inner null: 4E
    theta, scaling = _rope(config) if family.positions == "rope" else (None, None)
    return Architecture(
        family=family, vocab_size=_positive(config, f["vocab"]), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, mlp_hidden=mlp_hidden,
        activation=_activation(config, family), norm_eps=_number(config, f["eps"]),
        qkv_bias=_flag(config, family.qkv_bias), out_bias=_flag(config, family.out_bias),
        mlp_bias=_flag(config, family.mlp_bias),
        tie_embeddings=bool(config.get("tie_word_embeddings", family.tie_default)),
        rope_theta=theta, rope_scaling=scaling,
        max_positions=_positive(config, "n_positions") if family.positions == "learned" else None,
        windows=_windows(config, family, layers), scales=_scales(config, family, layers, head_dim),
        attn_softcap=_softcap(config, "attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=_softcap(config, "final_logit_softcapping") if model_type == "gemma2" else None,
        embed_scale=math.sqrt(hidden) if family.embed_scale else None,
    )


_REQUIRED = object()


def _positive(config: dict, key: str, default=_REQUIRED) -> int | None:
    """config[key], a positive integer; ``default`` when it is null (an error if required)."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json: {key}={value!r}: a positive integer is needed")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json: {key}={value!r} must be a positive integer")
    return value


def _number(config: dict, key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"config.json: {key}={value!r} must be a finite number >= 0")
    return float(value)


def _flag(config: dict, choice: bool | str) -> bool:
    return bool(config.get(choice, False)) if isinstance(choice, str) else choice


def _softcap(config: dict, key: str) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"config.json: {key}={value!r} must be null or a finite number > 0")
    return float(value)


def _activation(config: dict, family: Family) -> str:
    key = family.fields["activation"]
    name = config.get(key)
    table = GATED_ACTIVATIONS if family.gated else PLAIN_ACTIVATIONS
    if name not in table:
        raise unsupported(key, name, f"the activations implemented here are {sorted(table)}")
    return table[name]


def _rope(config: dict) -> tuple[float, functools.partial | None]:
    """(theta, scaling): transformers 5 writes rope_parameters; older configs rope_theta and
    rope_scaling (which wins when both are there, as in transformers)."""
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(field) or {}
    if not isinstance(params, dict):
        raise unsupported(field, params, "expected a dict of rope parameters")
    layer_types = set(config.get("layer_types") or ())
    if layer_types & set(params):
        raise unsupported(field, params, "rope parameters per layer type are not implemented")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise unsupported("rope_theta", theta, "must be a finite number > 0")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise unsupported("partial_rotary_factor", partial, "RoPE on part of the head is not implemented")
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALINGS:
        raise unsupported(field, params, f"rope_type {kind!r}; implemented: ['default', *{sorted(ROPE_SCALINGS)}]")
    needed = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [key for key in needed if key not in params]
    if missing:
        raise unsupported(field, params, f"rope_type {kind!r} needs {missing}")
    original = params.get("original_max_position_embeddings", config.get("max_position_embeddings"))
    if original is None:
        raise unsupported(field, params, "needs original_max_position_embeddings")
    return float(theta), functools.partial(
        ROPE_SCALINGS[kind], original_max_position_embeddings=original,
        **{key: float(params[key]) for key in needed})


def _windows(config: dict, family: Family, layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window w (Hugging Face's meaning: query i sees key j iff
    i - w < j <= i), or None for full causal attention."""
    if family.windows == "none":
        return (None,) * layers
    window = config.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "must be null or a positive integer")
    if family.windows == "all" or window is None:
        return (window,) * layers
    if family.windows == "qwen2" and not config["use_sliding_window"]:
        return (None,) * layers
    layer_types = config.get("layer_types")
    if layer_types is None:  # configs written before layer_types existed: transformers' rule
        if family.windows == "qwen2":
            first = config["max_window_layers"]
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        else:  # gemma2: local layers first, alternating
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or any(kind not in LAYER_TYPES for kind in layer_types):
        raise unsupported("layer_types", layer_types, f"expected {layers} entries from {LAYER_TYPES}")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _scales(config: dict, family: Family, layers: int, head_dim: int) -> tuple[float, ...]:
    """Per layer, the softmax scale: 1/sqrt(head_dim) unless the family says otherwise."""
    if family.model_type == "gemma2":
        scalar = config.get("query_pre_attn_scalar")
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
            raise unsupported("query_pre_attn_scalar", scalar, "must be a number > 0")
        return (scalar ** -0.5,) * layers
    scale = head_dim ** -0.5
    if family.model_type == "gpt2":
        scale = scale if config["scale_attn_weights"] else 1.0
        if config["scale_attn_by_inverse_layer_idx"]:
            return tuple(scale / (i + 1) for i in range(layers))
    return (scale,) * layers
