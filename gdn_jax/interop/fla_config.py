"""FLA's GatedDeltaNetConfig (config.json, model_type "gated_deltanet") <-> our ModelConfig.

Every field of FLA's config has one policy here:
- mapped to a ModelConfig field (`to_model_config`, `from_model_config`);
- ignored, because it does not change the function the network computes (kernel choice, fusion
  flags, the training loss, cache and Hugging Face bookkeeping);
- or accepted only at the values our model computes, and refused otherwise with a ValueError that
  names the field and its value (e.g. `use_short_conv: false`, `hidden_act: "powlu"`).
A field that is in none of these lists is refused too, so a new FLA option never goes unnoticed.

The defaults are those of FLA 0.6.0's GatedDeltaNetConfig: a field missing from config.json takes
FLA's default, as FLA's own `from_pretrained` does.
"""

from __future__ import annotations

import math
from typing import Any

from configs.model import ModelConfig

MODEL_TYPE = "gated_deltanet"
ARCHITECTURE = "GatedDeltaNetForCausalLM"

# FLA 0.6.0 GatedDeltaNetConfig.__init__ defaults.
FLA_DEFAULTS: dict[str, Any] = dict(
    attn_mode="chunk", hidden_size=2048, expand_v=2.0, use_gate=True, use_short_conv=True,
    allow_neg_eigval=False, conv_size=4, head_dim=256, num_heads=6, num_v_heads=None,
    max_position_embeddings=2048, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
    num_hidden_layers=21, norm_eps=1e-6, attn=None, use_cache=True, pad_token_id=None,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02,
    fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, fuse_linear_cross_entropy=False,
    use_l2warp=False, vocab_size=32000, attnres_block_size=None, output_gate_activation="swish",
)

# Fields that set the network's shape or math, mapped to ModelConfig.
MAPPED = ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim", "expand_v",
          "num_v_heads", "conv_size", "allow_neg_eigval", "tie_word_embeddings", "norm_eps",
          "intermediate_size", "hidden_ratio", "attn", "initializer_range")

# Fields accepted only at these values (the only ones our layers compute).
REQUIRED = {
    "use_gate": (True,),  # our GDN layer always has the output gate (g_proj, gated o_norm)
    "use_short_conv": (True,),  # our GDN layer always has the q/k/v short convolutions
    "hidden_act": ("swish",),  # SwiGLU MLP ("powlu" is FLA-only)
    "output_gate_activation": ("swish", "silu"),  # same function; "sigmoid" is FLA-only
    "attnres_block_size": (None,),  # FLA's attention-residual blocks change the residual stream
    "model_type": (MODEL_TYPE,),
}

# Fields that do not change the function: kernels, fusions, the loss, the cache, token ids
# (they frame documents; the tokenizer and data config handle that), HF bookkeeping.
IGNORED = frozenset({
    "attn_mode",  # chunk vs fused_recurrent kernel: same function
    "fuse_norm", "fuse_swiglu",  # fused vs unfused kernels of the same norm / SwiGLU
    "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp",  # training loss only
    "max_position_embeddings",  # size of FLA's RoPE cos/sin cache; no effect on the output
    "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id",  # nn.Embedding padding_idx: freezes that row's gradient; same forward
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "auto_map",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "keys_to_ignore_at_inference",
    # generation defaults that older transformers wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})

# Keys of one entry of FLA's `attn` (a dict, or a list of dicts for several layer groups).
_ATTN_KEYS = ("layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta")

# ModelConfig fields that do not change the function, for export: compute dtype and kernels,
# remat, and the init recipe (used only when a model is built from scratch).
RUNTIME_FIELDS = ("name", "dtype", "remat", "gdn_impl", "gdn_chunk_size", "gdn_split_output",
                  "conv_impl", "attn_impl")
INIT_FIELDS = ("gdn_A_init_max", "gdn_dt_init_min", "gdn_dt_init_max")


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"FLA config field {field!r} = {value!r}: {why}")


def fla_intermediate_size(hidden_size: int, hidden_ratio, intermediate_size) -> int:
    """The SwiGLU width FLA's GatedMLP builds: intermediate_size, else 2/3 * hidden_ratio *
    hidden_size rounded up to a multiple of 256 (hidden_ratio None means 4)."""
    if intermediate_size is not None:
        return int(intermediate_size)
    ratio = 4 if hidden_ratio is None else hidden_ratio
    width = int(hidden_size * ratio * 2 / 3)
    return 256 * math.ceil(width / 256)


def _int_field(fla: dict, field: str, minimum: int = 1) -> int:
    value = fla[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(field, value, f"expected an integer >= {minimum}")
    return value


def _attn_layers(fla: dict, num_layers: int, hidden: int) -> tuple[str, dict]:
    """(layer pattern over all layers, attention fields of ModelConfig) from FLA's `attn`."""
    attn = fla.get("attn")
    if attn is None:
        return "G", {}
    specs = [attn] if isinstance(attn, dict) else attn
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise _refuse("attn", attn, "expected a dict or a list of dicts")
    letters = ["G"] * num_layers
    shared: dict[str, Any] = {}
    window = None
    for i, spec in enumerate(specs):
        where = "attn" if isinstance(attn, dict) else f"attn[{i}]"
        unknown = sorted(set(spec) - set(_ATTN_KEYS))
        if unknown:
            raise _refuse(f"{where}.{unknown[0]}", spec[unknown[0]],
                          f"unknown attention option; known: {', '.join(_ATTN_KEYS)}")
        for key in ("layers", "num_heads"):
            if key not in spec:
                raise _refuse(f"{where}.{key}", None, "required by FLA's attention spec")
        if spec.get("qkv_bias", False):
            raise _refuse(f"{where}.qkv_bias", spec["qkv_bias"],
                          "our attention layer has no q/k/v bias")
        heads = spec["num_heads"]
        if not isinstance(heads, int) or heads <= 0 or hidden % heads:
            raise _refuse(f"{where}.num_heads", heads,
                          f"must divide hidden_size = {hidden} (FLA's head_dim is hidden/heads)")
        kv = spec.get("num_kv_heads") or heads
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise _refuse(f"{where}.num_kv_heads", kv, f"must divide num_heads = {heads}")
        theta = float(spec.get("rope_theta", 10000.0) or 10000.0)
        this = dict(attn_num_heads=heads, attn_num_kv_heads=kv, attn_head_dim=hidden // heads,
                    rope_theta=theta)
        for key, value in this.items():
            if key in shared and shared[key] != value:
                raise _refuse(f"{where}.{key.replace('attn_', '')}", value,
                              f"differs from an earlier attention spec ({shared[key]!r}); our "
                              f"attention layers share one setting")
            shared[key] = value
        w = spec.get("window_size")
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
                raise _refuse(f"{where}.window_size", w, "expected a positive integer or null")
            if window is not None and w != window:
                raise _refuse(f"{where}.window_size", w,
                              f"differs from an earlier window ({window}); our sliding-window "
                              f"layers share one window_size")
            window = w
        for layer in spec["layers"]:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise _refuse(f"{where}.layers", spec["layers"],
                              f"layer indices must lie in [0, {num_layers})")
            if letters[layer] != "G":
                raise _refuse(f"{where}.layers", spec["layers"], f"layer {layer} listed twice")
            letters[layer] = "A" if w is None else "S"
    if window is not None:
        shared["window_size"] = window
    return _shortest_period("".join(letters)), shared


def _shortest_period(letters: str) -> str:
    """The shortest pattern whose cyclic tiling gives `letters` ("GGGG" -> "G", "GSGS" -> "GS")."""
    for p in range(1, len(letters) + 1):
        if all(letters[i] == letters[i % p] for i in range(len(letters))):
            return letters[:p]
    return letters


def check_fields(fla: dict) -> dict:
    """FLA's config.json dict completed with FLA's defaults; raises ValueError naming the first
    field that our model cannot compute or that this module does not know."""
    if not isinstance(fla, dict):
        raise ValueError(f"FLA config: expected a JSON object, got {type(fla).__name__}")
    if "model_type" not in fla:
        raise ValueError("FLA config: no 'model_type' field; expected 'gated_deltanet' "
                         "(a config.json written by FLA's GatedDeltaNetForCausalLM)")
    known = set(FLA_DEFAULTS) | set(MAPPED) | set(REQUIRED) | IGNORED
    for field in sorted(fla):
        if field not in known:
            raise _refuse(field, fla[field], "unknown field; this importer maps, ignores or "
                          "refuses each field of FLA 0.6's GatedDeltaNetConfig, and not this one")
    full = {**FLA_DEFAULTS, **fla}
    for field, allowed in REQUIRED.items():
        if full.get(field) not in allowed:
            raise _refuse(field, full.get(field),
                          f"our model computes only {' or '.join(map(repr, allowed))}")
    archs = full.get("architectures") or [ARCHITECTURE]
    if any(a != ARCHITECTURE for a in archs):
        raise _refuse("architectures", archs, f"only {ARCHITECTURE} checkpoints (with lm_head) "
                      "are supported")
    return full


def to_model_config(fla: dict, **runtime) -> ModelConfig:
    """Our ModelConfig for FLA's config.json dict. `runtime` sets the fields that do not change
    the function (dtype, gdn_impl, gdn_chunk_size, gdn_split_output, conv_impl, remat, attn_impl,
    name)."""
    bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"{bad[0]!r} is not a runtime ModelConfig field; choose from "
                         f"{', '.join(RUNTIME_FIELDS)}")
    full = check_fields(fla)
    hidden = _int_field(full, "hidden_size")
    num_layers = _int_field(full, "num_hidden_layers")
    H = _int_field(full, "num_heads")
    K = _int_field(full, "head_dim")
    expand_v = full["expand_v"]
    if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)) or expand_v <= 0:
        raise _refuse("expand_v", expand_v, "expected a positive number")
    if not math.isclose(K * expand_v, round(K * expand_v), rel_tol=0, abs_tol=1e-6):
        raise _refuse("expand_v", expand_v, f"head_dim * expand_v = {K * expand_v} is not an "
                      "integer")
    HV = full["num_v_heads"]
    if HV is not None:
        HV = _int_field(full, "num_v_heads")
        if HV % H:
            raise _refuse("num_v_heads", HV, f"must be a multiple of num_heads = {H}")
    eps = full["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise _refuse("norm_eps", eps, "expected a positive number")
    allow_neg = full["allow_neg_eigval"]
    tie = full["tie_word_embeddings"]
    for field, value in (("allow_neg_eigval", allow_neg), ("tie_word_embeddings", tie)):
        if not isinstance(value, bool):
            raise _refuse(field, value, "expected true or false")
    if full["intermediate_size"] is not None:
        _int_field(full, "intermediate_size")
    mlp = fla_intermediate_size(hidden, full["hidden_ratio"], full["intermediate_size"])
    pattern, attn_fields = _attn_layers(full, num_layers, hidden)
    init_std = full["initializer_range"]
    fields = dict(
        name="fla_import", vocab_size=_int_field(full, "vocab_size"), d_model=hidden,
        num_layers=num_layers, layer_pattern=pattern, mlp_hidden=mlp, tie_embeddings=tie,
        norm_eps=float(eps), init_std=float(init_std), gdn_num_heads=H, gdn_head_dim=K,
        gdn_expand_v=float(expand_v), gdn_num_v_heads=None if HV in (None, H) else HV,
        gdn_conv_size=_int_field(full, "conv_size"), gdn_allow_neg_eigval=allow_neg,
        **attn_fields)
    fields.update(runtime)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"FLA config {fla!r} maps to an invalid ModelConfig: {e}") from None


def from_model_config(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id=None,
                      eos_token_id=None, max_position_embeddings: int = 2048) -> dict:
    """FLA's config.json dict for our ModelConfig. Raises ValueError naming the first layer or
    field FLA's GatedDeltaNetForCausalLM cannot represent."""
    for i, kind in enumerate(cfg.mixers):
        if kind not in "GSA":
            raise ValueError(f"layer {i} is {kind!r} ({_mixer_name(kind)}): FLA's "
                             f"GatedDeltaNetForCausalLM holds only Gated DeltaNet and attention "
                             f"layers")
    attn = None
    attn_layers = [i for i, kind in enumerate(cfg.mixers) if kind in "SA"]
    if attn_layers:
        if cfg.attn_num_heads * cfg.attn_head_dim != cfg.d_model:
            raise ValueError(f"attn_num_heads * attn_head_dim = {cfg.attn_num_heads} * "
                             f"{cfg.attn_head_dim} != d_model = {cfg.d_model}: FLA's attention "
                             f"layer has head_dim = hidden_size / num_heads")
        specs = []
        for kind, window in (("S", cfg.window_size), ("A", None)):
            layers = [i for i, k in enumerate(cfg.mixers) if k == kind]
            if layers:
                specs.append(dict(layers=layers, num_heads=cfg.attn_num_heads,
                                  num_kv_heads=cfg.kv_heads, qkv_bias=False, window_size=window,
                                  rope_theta=cfg.rope_theta))
        attn = specs[0] if len(specs) == 1 else specs
    fla = dict(FLA_DEFAULTS)
    fla.update(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, dtype=dtype,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
        num_heads=cfg.gdn_num_heads, head_dim=cfg.gdn_head_dim, expand_v=cfg.gdn_expand_v,
        num_v_heads=cfg.gdn_num_v_heads, conv_size=cfg.gdn_conv_size,
        allow_neg_eigval=cfg.gdn_allow_neg_eigval, tie_word_embeddings=cfg.tie_embeddings,
        norm_eps=cfg.norm_eps, intermediate_size=cfg.mlp_hidden, initializer_range=cfg.init_std,
        attn=attn, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        max_position_embeddings=max_position_embeddings,
    )
    return fla


def _mixer_name(kind: str) -> str:
    from configs.model import MIXER_KINDS

    return MIXER_KINDS.get(kind, "unknown")
