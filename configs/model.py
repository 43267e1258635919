"""Model configurations: one frozen dataclass and named presets.

Paper sizes come from NVlabs/GatedDeltaNet `lit_gpt/config.py` together with the defaults of its
`GatedDeltaNet(hidden_size=n_embd)` layer (expand_k 0.75, expand_v 1.5, 9 heads, conv 4), which is how
that code builds the mixer whatever `n_head` says (see NVlabs/GatedDeltaNet issue #10). The SWA layers
of the hybrids use `n_head` heads of n_embd / n_head, a 2048-token window and full RoPE. Embeddings are
tied there (`mamba_init=True` ties them). The paper publishes no H2 config; the H2 presets below are
ours: the H1 sizes with the pattern Mamba2 -> GDN -> SWA repeated (see docs/models.md).

FLA's default GatedDeltaNetConfig: hidden 2048, 21 layers, 6 heads x 256, expand_v 2, MLP hidden
ratio 4 -> 5632 (int(2048 * 4 * 2 / 3) rounded up to a multiple of 256), untied, vocab 32000.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gdn_jax.impls import CONV_IMPLS
from gdn_jax.impls import IMPLS as GDN_IMPLS

MIXER_KINDS = {
    "G": "Gated DeltaNet",
    "D": "DeltaNet (gated delta rule with g = 0)",
    "M": "Mamba2 (scalar-decay SSD)",
    "S": "sliding-window attention",
    "A": "full causal attention",
}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_gdn", "dots_gdn_acts",
                  "dots_gdn_mixer", "dots_gdn_all")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"  # preset name, for logs only
    vocab_size: int = 256  # number of token ids (rows of the embedding table)
    d_model: int = 64  # residual stream width, features
    num_layers: int = 2  # number of blocks (mixer + MLP each)
    layer_pattern: str = "G"  # mixer letters (see MIXER_KINDS), tiled cyclically over num_layers
    mlp_hidden: int = 128  # SwiGLU hidden width, features
    tie_embeddings: bool = True  # LM head reuses the embedding table
    norm_eps: float = 1e-5  # RMSNorm epsilon (all norms)
    init_std: float = 0.02  # std of the normal init of embeddings, projections and convs
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls; params stay float32
    remat: str = "none"  # per-block rematerialisation: one of REMAT_POLICIES (gdn_jax/model.py)
    # Gated DeltaNet / DeltaNet mixers ("G", "D").
    gdn_num_heads: int = 2  # q/k heads H
    gdn_head_dim: int = 32  # q/k head dim K, features
    gdn_expand_v: float = 2.0  # value head dim V = gdn_head_dim * gdn_expand_v
    gdn_num_v_heads: int | None = None  # value heads HV (GVA when > gdn_num_heads); None means H
    gdn_conv_size: int = 4  # short causal depthwise conv kernel, tokens
    gdn_allow_neg_eigval: bool = False  # beta = 2 * sigmoid(.) in (0, 2) instead of sigmoid(.)
    gdn_impl: str = "auto"  # gated_delta_rule impl, one of gdn_jax.impls.IMPLS
    gdn_chunk_size: int = 64  # chunk length of the chunk / pallas paths, tokens (16, 32 or 64)
    # "auto" keeps the Pallas kernels' default: with the Triton sweeps at K > 128 and 16-bit inputs
    # the forward keeps its per-chunk states for the backward (faster; ~0.5 GB a layer more at
    # fla_gdn_1.3b's 4 x 4096). "off": the backward recomputes them (kernels_pallas split_output).
    gdn_split_output: str = "auto"  # "auto" | "off": keep the per-chunk states (see above)
    conv_impl: str = "auto"  # the GDN short convs: one of gdn_jax.impls.CONV_IMPLS
    # Decay init, g = -A * dt per token at init (FLA's recipe by default).
    gdn_A_init_max: float = 16.0  # A ~ U(0, gdn_A_init_max) per value head
    gdn_dt_init_min: float = 1e-3  # dt ~ logU(gdn_dt_init_min, gdn_dt_init_max), floored at 1e-4
    gdn_dt_init_max: float = 0.1  # upper end of that range
    # Attention mixers ("S", "A").
    attn_num_heads: int = 4  # query heads
    attn_num_kv_heads: int | None = None  # key/value heads (GQA when fewer); None means attn_num_heads
    attn_head_dim: int = 16  # head dim, features
    window_size: int = 2048  # SWA window: a token sees itself and the window_size - 1 before it
    rope_theta: float = 10000.0  # RoPE base
    attn_impl: str | None = None  # dot_product_attention backend: None or "xla", or "cudnn" (GPU)
    # Mamba2 mixer ("M").
    mamba_expand: int = 2  # d_inner = mamba_expand * d_model, features
    mamba_head_dim: int = 64  # SSM head dim P, features
    mamba_d_state: int = 128  # SSM state size N per group, features
    mamba_n_groups: int = 1  # groups sharing B and C
    mamba_conv_size: int = 4  # causal depthwise conv kernel, tokens
    mamba_chunk_size: int = 64  # SSD chunk length, tokens

    def __post_init__(self):
        if not self.layer_pattern or any(c not in MIXER_KINDS for c in self.layer_pattern):
            raise ValueError(f"layer_pattern must be letters from {sorted(MIXER_KINDS)}, "
                             f"got {self.layer_pattern!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.gdn_impl not in GDN_IMPLS:
            raise ValueError(f"gdn_impl must be one of {GDN_IMPLS}, got {self.gdn_impl!r}")
        if self.gdn_split_output not in ("auto", "off"):
            raise ValueError(f"gdn_split_output must be 'auto' or 'off', got {self.gdn_split_output!r}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
        if self.attn_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attn_impl must be None, 'xla' or 'cudnn', got {self.attn_impl!r}")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.gdn_num_v_heads is not None and self.gdn_num_v_heads % self.gdn_num_heads:
            raise ValueError(f"gdn_num_v_heads = {self.gdn_num_v_heads} must be a multiple of "
                             f"gdn_num_heads = {self.gdn_num_heads}")
        if self.attn_num_heads % self.kv_heads:
            raise ValueError(f"attn_num_heads = {self.attn_num_heads} must be a multiple of "
                             f"attn_num_kv_heads = {self.kv_heads}")
        if (self.mamba_expand * self.d_model) % self.mamba_head_dim:
            raise ValueError("mamba_expand * d_model must be a multiple of mamba_head_dim")
        if (self.mamba_expand * self.d_model // self.mamba_head_dim) % self.mamba_n_groups:
            raise ValueError("the Mamba2 head count must be a multiple of mamba_n_groups")
        if not 0.0 < self.gdn_dt_init_min <= self.gdn_dt_init_max:
            raise ValueError(f"need 0 < gdn_dt_init_min <= gdn_dt_init_max, got {self.gdn_dt_init_min} "
                             f"and {self.gdn_dt_init_max}")
        if self.gdn_A_init_max <= 0.0:
            raise ValueError(f"gdn_A_init_max must be > 0, got {self.gdn_A_init_max}")
        if float(self.gdn_head_dim * self.gdn_expand_v) != int(self.gdn_head_dim * self.gdn_expand_v):
            raise ValueError("gdn_head_dim * gdn_expand_v must be an integer")

    @property
    def mixers(self) -> str:
        """The mixer letter of every layer: layer_pattern tiled to num_layers."""
        reps = -(-self.num_layers // len(self.layer_pattern))
        return (self.layer_pattern * reps)[: self.num_layers]

    @property
    def gdn_v_heads(self) -> int:
        return self.gdn_num_v_heads or self.gdn_num_heads

    @property
    def gdn_v_dim(self) -> int:
        return int(self.gdn_head_dim * self.gdn_expand_v)

    @property
    def kv_heads(self) -> int:
        return self.attn_num_kv_heads or self.attn_num_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    @property
    def mamba_num_heads(self) -> int:
        return self.mamba_d_inner // self.mamba_head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# NVlabs lit_gpt sizes: vocab 32000, tied, RMSNorm eps 1e-5, GDN 9 heads, K = 0.75 d / 9, V = 2 K.
_PAPER = dict(vocab_size=32000, tie_embeddings=True, norm_eps=1e-5, gdn_num_heads=9, gdn_expand_v=2.0,
              window_size=2048, attn_head_dim=128, mamba_expand=2, mamba_head_dim=64,
              mamba_d_state=128)
_04B = dict(_PAPER, d_model=1536, mlp_hidden=6144, gdn_head_dim=128, attn_num_heads=12)
_13B_H = dict(_PAPER, d_model=2304, mlp_hidden=6144, gdn_head_dim=192, attn_num_heads=18,
              num_layers=18)
_TINY = dict(vocab_size=256, d_model=64, num_layers=2, mlp_hidden=128, tie_embeddings=True,
             gdn_num_heads=2, gdn_head_dim=32, gdn_expand_v=2.0, gdn_chunk_size=16,
             attn_num_heads=4, attn_head_dim=16, window_size=16,
             mamba_expand=2, mamba_head_dim=16, mamba_d_state=16, mamba_chunk_size=16)

# The 1.3B GDN models' remat: as fast as none (327.9-330.9 against 330.9 ms a step at fla_gdn_1.3b,
# 4 x 4096, H200) at 56.4 instead of 64.9 GiB (docs/benchmarks.md, 2026-12-04).
_GDN_REMAT = "dots_gdn_mixer"

_PRESETS: dict[str, dict] = {
    "gdn_0.4b": dict(_04B, num_layers=11, layer_pattern="G"),
    "gdn_h1_0.4b": dict(_04B, num_layers=12, layer_pattern="GS"),
    "gdn_h2_0.4b": dict(_04B, num_layers=12, layer_pattern="MGS"),
    "gdn_1.3b": dict(_PAPER, d_model=2400, num_layers=16, layer_pattern="G", mlp_hidden=5888,
                     gdn_head_dim=200, attn_num_heads=16, attn_head_dim=150, remat=_GDN_REMAT),
    "gdn_h1_1.3b": dict(_13B_H, layer_pattern="GS"),
    "gdn_h2_1.3b": dict(_13B_H, layer_pattern="MGS"),
    "fla_gdn_1.3b": dict(vocab_size=32000, d_model=2048, num_layers=21, layer_pattern="G",
                         mlp_hidden=5632, tie_embeddings=False, norm_eps=1e-6, gdn_num_heads=6,
                         gdn_head_dim=256, gdn_expand_v=2.0, remat=_GDN_REMAT),
    "tiny": dict(_TINY, layer_pattern="G"),
    "tiny_h1": dict(_TINY, layer_pattern="GS"),
    "tiny_h2": dict(_TINY, num_layers=3, layer_pattern="MGS"),
    "tiny_deltanet": dict(_TINY, layer_pattern="D"),
    "tiny_mamba2": dict(_TINY, layer_pattern="M"),
    "tiny_transformer": dict(_TINY, layer_pattern="A"),
    "tiny_swa": dict(_TINY, layer_pattern="S"),
}


def model_config_names() -> list[str]:
    return sorted(_PRESETS)


def get_model_config(name: str, **overrides) -> ModelConfig:
    """The named preset, with optional field overrides. Raises ValueError for an unknown name."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(model_config_names())}")
    return ModelConfig(**{**_PRESETS[name], "name": name, **overrides})
