"""FLA's tensor names and layouts <-> our parameter tree.

Our parameters are `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, written here flat as
{("blocks", 0, "mixer", "q_proj", "kernel"): array}. FLA's are the state dict of
GatedDeltaNetForCausalLM ("model.layers.0.attn.q_proj.weight"). Per tensor:

    ours                                  FLA                                   layout
    embedding [V, d]                      model.embeddings.weight [V, d]        same
    blocks.i.mixer_norm.scale [d]         model.layers.i.attn_norm.weight       same
    blocks.i.mixer.X_proj.kernel [in,out] model.layers.i.attn.X_proj.weight     transposed
    blocks.i.mixer.X_conv.weight [W, C]   model.layers.i.attn.X_conv1d.weight   [C, 1, W]
    blocks.i.mixer.A_log, dt_bias [HV]    model.layers.i.attn.A_log, dt_bias    same
    blocks.i.mixer.o_norm.scale [V]       model.layers.i.attn.o_norm.weight     same
    blocks.i.mlp_norm.scale [d]           model.layers.i.mlp_norm.weight        same
    blocks.i.mlp.X_proj.kernel            model.layers.i.mlp.X_proj.weight      transposed
    final_norm.scale [d]                  model.norm.weight                     same
    lm_head [d, V] (untied only)          lm_head.weight [V, d]                 transposed

X is q, k, v, a, b, g, o for a Gated DeltaNet layer and q, k, v, o for an attention layer; the
conv is the causal depthwise one, y_t = sum_i w[i] x_{t-W+1+i}, which is torch's Conv1d with
padding W - 1 cut to the first T outputs. With tied embeddings FLA's files hold no lm_head.weight
(transformers drops the tied copy); one that is there must equal the embedding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from configs.model import ModelConfig

Path = tuple


class Entry(NamedTuple):
    fla_name: str
    ours: Path
    fla_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_fla: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _conv_to_ours(x):  # [C, 1, W] -> [W, C]
    return np.ascontiguousarray(x[:, 0, :].T)


def _conv_to_fla(x):  # [W, C] -> [C, 1, W]
    return np.ascontiguousarray(x.T[:, None, :])


def _linear(fla_name: str, ours: Path, d_in: int, d_out: int) -> Entry:
    return Entry(fla_name, ours + ("kernel",), (d_out, d_in), _transpose, _transpose)


def _vector(fla_name: str, ours: Path, n: int) -> Entry:
    return Entry(fla_name, ours, (n,), _same, _same)


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of FLA's GatedDeltaNetForCausalLM for `cfg`, with our path and the layouts.
    Only the layer kinds FLA has ("G", "S", "A") are listed; fla_config.from_model_config refuses
    the others before this is called."""
    d, V = cfg.d_model, cfg.vocab_size
    out = [Entry("model.embeddings.weight", ("embedding",), (V, d), _same, _same)]
    for i, kind in enumerate(cfg.mixers):
        fla, ours = f"model.layers.{i}", ("blocks", i)
        mix, fmix = ours + ("mixer",), f"{fla}.attn"
        out.append(_vector(f"{fla}.attn_norm.weight", ours + ("mixer_norm", "scale"), d))
        if kind == "G":
            H, K, HV, Vd = cfg.gdn_num_heads, cfg.gdn_head_dim, cfg.gdn_v_heads, cfg.gdn_v_dim
            widths = dict(q=H * K, k=H * K, v=HV * Vd, a=HV, b=HV, g=HV * Vd)
            for x, width in widths.items():
                out.append(_linear(f"{fmix}.{x}_proj.weight", mix + (f"{x}_proj",), d, width))
            out.append(_linear(f"{fmix}.o_proj.weight", mix + ("o_proj",), HV * Vd, d))
            for x in "qkv":
                out.append(Entry(f"{fmix}.{x}_conv1d.weight", mix + (f"{x}_conv", "weight"),
                                 (widths[x], 1, cfg.gdn_conv_size), _conv_to_ours, _conv_to_fla))
            out.append(_vector(f"{fmix}.A_log", mix + ("A_log",), HV))
            out.append(_vector(f"{fmix}.dt_bias", mix + ("dt_bias",), HV))
            out.append(_vector(f"{fmix}.o_norm.weight", mix + ("o_norm", "scale"), Vd))
        elif kind in "SA":
            q = cfg.attn_num_heads * cfg.attn_head_dim
            kv = cfg.kv_heads * cfg.attn_head_dim
            for x, width in dict(q=q, k=kv, v=kv).items():
                out.append(_linear(f"{fmix}.{x}_proj.weight", mix + (f"{x}_proj",), d, width))
            out.append(_linear(f"{fmix}.o_proj.weight", mix + ("o_proj",), q, d))
        else:
            raise ValueError(f"layer {i}: mixer {kind!r} has no FLA GatedDeltaNet counterpart")
        out.append(_vector(f"{fla}.mlp_norm.weight", ours + ("mlp_norm", "scale"), d))
        for x in ("gate", "up"):
            out.append(_linear(f"{fla}.mlp.{x}_proj.weight", ours + ("mlp", f"{x}_proj"), d,
                               cfg.mlp_hidden))
        out.append(_linear(f"{fla}.mlp.down_proj.weight", ours + ("mlp", "down_proj"),
                           cfg.mlp_hidden, d))
    out.append(_vector("model.norm.weight", ("final_norm", "scale"), d))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), (V, d), _transpose, _transpose))
    return out


TIED_HEAD = "lm_head.weight"


def _fmt(path: Path) -> str:
    return ".".join(str(p) for p in path)


def fla_to_ours(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[Path, np.ndarray]:
    """Our flat float32 parameters from FLA's tensors. Raises ValueError naming a missing or
    unexpected tensor, or one of the wrong shape."""
    table = entries(cfg)
    expected = {e.fla_name for e in table}
    extra = sorted(set(tensors) - expected)
    if cfg.tie_embeddings and TIED_HEAD in extra:
        extra.remove(TIED_HEAD)
        head, emb = tensors[TIED_HEAD], tensors.get("model.embeddings.weight")
        if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError(f"tensor {TIED_HEAD!r}: the config ties the embeddings "
                             f"(tie_word_embeddings) but this lm_head differs from "
                             f"model.embeddings.weight")
    if extra:
        more = f" ({len(extra) - 1} more: {', '.join(extra[1:4])}...)" if len(extra) > 1 else ""
        raise ValueError(f"unexpected tensor {extra[0]!r}: the config has no parameter of that "
                         f"name{more}")
    out = {}
    for e in table:
        if e.fla_name not in tensors:
            raise ValueError(f"missing tensor {e.fla_name!r} (shape {e.fla_shape}), needed for "
                             f"{_fmt(e.ours)}")
        x = np.asarray(tensors[e.fla_name])
        if tuple(x.shape) != e.fla_shape:
            raise ValueError(f"tensor {e.fla_name!r} has shape {tuple(x.shape)}; the config needs "
                             f"{e.fla_shape}")
        out[e.ours] = e.to_ours(x.astype(np.float32))
    return out


def ours_to_fla(cfg: ModelConfig, params: dict[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """FLA's tensors from our flat float32 parameters. Raises ValueError naming a parameter that
    has no FLA counterpart, or a missing one."""
    table = entries(cfg)
    extra = sorted(set(params) - {e.ours for e in table}, key=str)
    if extra:
        raise ValueError(f"parameter {_fmt(extra[0])} has no counterpart in FLA's "
                         f"GatedDeltaNetForCausalLM")
    out = {}
    for e in table:
        if e.ours not in params:
            raise ValueError(f"parameter {_fmt(e.ours)} missing from the model")
        x = e.to_fla(np.asarray(params[e.ours]))
        if tuple(x.shape) != e.fla_shape:
            raise ValueError(f"parameter {_fmt(e.ours)} gives {e.fla_name} of shape "
                             f"{tuple(x.shape)}; expected {e.fla_shape}")
        out[e.fla_name] = x
    return out


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, np.ndarray]:
    """{path: leaf} of a nested pure dict (nnx.to_pure_dict)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: dict[Path, np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
