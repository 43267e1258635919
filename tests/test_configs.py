"""Model presets: parameter counts from formulas written here, independently of the model code."""

import inspect

import pytest

import configs.model as model_configs
from configs.model import ModelConfig, get_model_config, model_config_names
from gdn_jax.model import count_params


def gdn_params(c: ModelConfig, decay: bool) -> int:
    d, H, K, HV, V, W = (c.d_model, c.gdn_num_heads, c.gdn_head_dim, c.gdn_v_heads, c.gdn_v_dim,
                         c.gdn_conv_size)
    n = 2 * d * H * K          # q_proj, k_proj
    n += 2 * d * HV * V        # v_proj, g_proj (output gate)
    n += HV * V * d            # o_proj
    n += d * HV                # b_proj (beta)
    n += W * (2 * H * K + HV * V)  # q/k/v short convs, no bias
    n += V                     # per-head gated RMSNorm scale
    if decay:
        n += d * HV + 2 * HV   # a_proj, A_log, dt_bias
    return n


def attn_params(c: ModelConfig) -> int:
    return 2 * c.d_model * c.attn_num_heads * c.attn_head_dim + 2 * c.d_model * c.kv_heads * c.attn_head_dim


def mamba_params(c: ModelConfig) -> int:
    d, E, G, N, W = c.d_model, c.mamba_expand * c.d_model, c.mamba_n_groups, c.mamba_d_state, c.mamba_conv_size
    H = E // c.mamba_head_dim
    return d * (2 * E + 2 * G * N + H) + (E + 2 * G * N) * (W + 1) + 3 * H + E + E * d


def expected_params(c: ModelConfig) -> int:
    mixer = {"G": lambda: gdn_params(c, True), "D": lambda: gdn_params(c, False),
             "M": lambda: mamba_params(c), "S": lambda: attn_params(c), "A": lambda: attn_params(c)}
    n = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model  # + final norm
    for kind in c.mixers:
        n += mixer[kind]() + 3 * c.d_model * c.mlp_hidden + 2 * c.d_model
    return n


# Totals as counted on 2026-11-22 (the formula above and count_params both give these).
PAPER_COUNTS = {
    "gdn_0.4b": 516_837_830,
    "gdn_h1_0.4b": 530_764_908,
    "gdn_h2_0.4b": 542_056_584,
    "gdn_1.3b": 1_309_295_488,
    "gdn_h1_1.3b": 1_316_608_290,
    "gdn_h2_1.3b": 1_352_959_356,
    "fla_gdn_1.3b": 1_387_348_732,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_config_param_counts(name):
    cfg = get_model_config(name)
    assert expected_params(cfg) == PAPER_COUNTS[name]
    assert count_params(cfg) == PAPER_COUNTS[name]


@pytest.mark.parametrize("name", [n for n in model_config_names() if n.startswith("tiny")])
def test_tiny_param_counts(name):
    cfg = get_model_config(name)
    assert count_params(cfg) == expected_params(cfg)
    assert 50_000 < count_params(cfg) < 500_000


def test_fla_default_matches_fla_reported_size():
    """FLA reports 1387M parameters for its default GatedDeltaNetConfig (untied embeddings)."""
    n = count_params(get_model_config("fla_gdn_1.3b"))
    assert abs(n - 1387e6) / 1387e6 < 1e-3


def test_nvlabs_sizes():
    """The 1.3B GDN of NVlabs lit_gpt: d 2400, 16 layers, 9 heads of K = 200, V = 400, MLP 5888."""
    c = get_model_config("gdn_1.3b")
    assert (c.d_model, c.num_layers, c.gdn_num_heads, c.gdn_head_dim, c.gdn_v_dim, c.mlp_hidden) == \
        (2400, 16, 9, 200, 400, 5888)
    assert c.gdn_num_heads * c.gdn_head_dim == int(0.75 * c.d_model)  # lit_gpt expand_k = 0.75
    assert get_model_config("gdn_h1_1.3b").mixers == "GS" * 9
    assert get_model_config("gdn_h2_0.4b").mixers == "MGS" * 4


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model config 'nope'.*tiny_h2"):
        get_model_config("nope")


def test_bad_fields_raise():
    with pytest.raises(ValueError, match="layer_pattern"):
        ModelConfig(layer_pattern="GX")
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="some")
    with pytest.raises(ValueError, match="gdn_impl"):
        ModelConfig(gdn_impl="cuda")


def test_config_is_frozen_and_every_field_is_documented():
    cfg = get_model_config("tiny")
    with pytest.raises(Exception):
        cfg.d_model = 3
    src = inspect.getsource(model_configs.ModelConfig).splitlines()
    for field in ("vocab_size", "d_model", "num_layers", "layer_pattern", "dtype", "remat", "gdn_impl"):
        assert field in cfg.__dataclass_fields__
    for name in cfg.__dataclass_fields__:
        line = next(l for l in src if l.strip().startswith(f"{name}:"))
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 5, name


def test_pattern_tiles_over_layers():
    assert ModelConfig(num_layers=7, layer_pattern="MGS").mixers == "MGSMGSM"
