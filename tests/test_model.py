"""LM-level tests: packed documents, causality, bf16 vs fp32, remat, sharding names, training steps."""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax.model import LM, count_params, flops_per_token, positions_from_segments

AXIS_NAMES = {"embed", "vocab", "heads", "mlp", None}


def tiny(name, **kw):
    kw = {"dtype": "float32", "gdn_impl": "chunk", **kw}
    return LM(get_model_config(name, **kw), rngs=nnx.Rngs(0))


def forward(model, tokens, segment_ids=None):
    return np.asarray(nnx.jit(lambda m, t, s: m(t, s))(model, tokens, segment_ids))


def test_positions_restart_per_document():
    seg = jnp.array([[4, 4, 4, 9, 9, 2], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(seg, 2, 6),
                                  [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("name", ["tiny_h2", "tiny_deltanet", "tiny_transformer"])
def test_lm_packed_documents_equal_separate_runs(name):
    """tiny_h2 covers M, G and S layers (window 16 < the 21-token document)."""
    model = tiny(name)
    lengths = [6, 21, 5]
    T = sum(lengths)
    tokens = jax.random.randint(jax.random.key(0), (1, T), 0, 256)
    seg = jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(lengths)])[None]
    starts = np.cumsum([0] + lengths[:-1])
    # Row 0 packed; rows 1.. each document alone, right-padded (causality keeps pads out), with a
    # constant segment id. One call, one compile.
    alone = jnp.stack([jnp.pad(tokens[0, s:s + n], (0, T - n)) for s, n in zip(starts, lengths)])
    logits = forward(model, jnp.concatenate([tokens, alone]),
                     jnp.concatenate([seg, jnp.zeros((len(lengths), T), jnp.int32)]))
    for i, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(logits[0, s:s + n], logits[1 + i, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_h2", "tiny_transformer"])
def test_lm_is_causal(name):
    model = tiny(name)
    tokens = jax.random.randint(jax.random.key(1), (2, 30), 0, 256)
    changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 256)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(a[:, :20], b[:, :20], rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3


def test_logits_float32_and_tied_head():
    model = tiny("tiny")
    tokens = jnp.array([[1, 2, 3]], jnp.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.dtype == jnp.float32
    # With a tied head, logits are the final hidden state against the embedding table.
    untied = LM(get_model_config("tiny", dtype="float32", gdn_impl="chunk", tie_embeddings=False),
                rngs=nnx.Rngs(0))
    nnx.update(untied.blocks, nnx.state(model.blocks))
    untied.embedding[...] = model.embedding[...]
    untied.lm_head[...] = model.embedding[...].T
    np.testing.assert_allclose(forward(untied, tokens), np.asarray(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_h2", "tiny_transformer"])  # M, G, S and A layers
def test_bf16_forward_close_to_fp32(name):
    f32 = tiny(name, dtype="float32")
    bf16 = tiny(name, dtype="bfloat16")  # same seed, so the same float32 parameters
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 256)
    a, b = forward(f32, tokens), forward(bf16, tokens)
    scale = np.abs(a).max()
    err = np.abs(a - b).max()
    assert 0 < err < 0.03 * scale, (err, scale)  # bf16 keeps ~3 significant digits per op


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_remat_gives_same_gradients():
    """Rematerialisation changes what is stored, never the gradient. Remat wraps whole blocks
    whatever their mixer, so the cheapest-to-compile model (attention only) checks it."""
    tokens = jax.random.randint(jax.random.key(3), (2, 20), 0, 256)
    grads = {}
    for r in ("none", "full", "dots"):
        model = tiny("tiny_transformer", remat=r)
        grads[r] = nnx.jit(nnx.grad(_loss))(model, tokens)
    for r in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("split, expected", [("auto", True), ("off", False)])
def test_gdn_split_output_reaches_the_kernels(split, expected):
    """model.gdn_split_output: "auto" leaves the kernels' default (at K = 256 with bf16 inputs the
    forward keeps the states for the backward: the output is formed from them), "off" makes the
    backward recompute them; a bad value is refused naming the field."""
    from jaxpr_eqns import all_eqns
    model = tiny("tiny", num_layers=1, dtype="bfloat16", gdn_impl="pallas_triton", gdn_head_dim=256,
                 gdn_split_output=split)
    graphdef, state = nnx.split(model)
    hash(graphdef)  # the model's static attributes stay hashable: nnx.jit keys on the graphdef
    tokens = jnp.zeros((1, 64), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: _loss(nnx.merge(graphdef, s), tokens)))(state).jaxpr
    names = [e.params["name"] for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call"]
    assert ("gdn_output_from_states" in names) is expected, names
    assert ("gdn_sweep_residuals" in names) and (("gdn_sweep_output" in names) is not expected)
    with pytest.raises(ValueError, match="gdn_split_output"):
        get_model_config("tiny", gdn_split_output="on")


def test_remat_dots_gdn_keeps_the_kernels_work_and_the_gradients():
    """remat "dots_gdn" saves matmul outputs plus the GDN recurrence's output and its kernels'
    residuals: the same gradients as no remat, and the compiled backward reruns no forward kernel
    (in interpret mode each Pallas kernel compiles to a while loop: "dots" adds the forward's,
    "dots_gdn" adds none). "dots_gdn_acts", "dots_gdn_mixer" and "dots_gdn_all" save more of
    the same block, so the same holds for them."""
    tokens = jax.random.randint(jax.random.key(5), (1, 33), 0, 256)
    grads, loops = {}, {}
    policies = ("none", "dots", "dots_gdn", "dots_gdn_acts", "dots_gdn_mixer", "dots_gdn_all")
    for r in policies:
        model = tiny("tiny", remat=r, num_layers=1, dtype="bfloat16", gdn_impl="pallas_triton")
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda st, t: jax.grad(lambda s: _loss(nnx.merge(graphdef, s), t))(st))
        loops[r] = fn.lower(state, tokens).compile().as_text().count(" while(")
        grads[r] = fn(state, tokens)
    assert loops["none"] < loops["dots"], loops
    for r in policies[2:]:
        assert loops[r] == loops["none"], loops
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-2, atol=1e-5)


def _saved_bytes(model, tokens):
    """Bytes the backward keeps from the forward (jax's saved residuals), parameters excluded."""
    from jax._src.ad_checkpoint import saved_residuals  # the public name is print-only
    graphdef, state = nnx.split(model)
    res = saved_residuals(lambda s: _loss(nnx.merge(graphdef, s), tokens), state)
    return sum(np.prod(a.shape) * a.dtype.itemsize for a, src in res if "argument" not in src)


def test_remat_policies_keep_exactly_their_named_activations():
    """Each "dots_gdn*" policy keeps what "dots_gdn" keeps plus its named values, and nothing
    else; bf16 activations per token and layer: the two block norms 2 d, SwiGLU's product (its
    hidden width F), the gated output norm HV V, the recurrence's q, k, v 2 H K + HV V."""
    T, L = 32, 2
    cfg = dict(num_layers=L, dtype="bfloat16", gdn_impl="pallas_triton")
    tokens = jax.random.randint(jax.random.key(6), (1, T + 1), 0, 256)
    size = {r: _saved_bytes(tiny("tiny", remat=r, **cfg), tokens)
            for r in ("dots_gdn", "dots_gdn_acts", "dots_gdn_mixer", "dots_gdn_all")}
    c = get_model_config("tiny", **cfg)
    norms, product, gated = 2 * c.d_model, c.mlp_hidden, c.gdn_v_heads * c.gdn_v_dim
    qkv = 2 * c.gdn_num_heads * c.gdn_head_dim + c.gdn_v_heads * c.gdn_v_dim
    extra = {r: (size[r] - size["dots_gdn"]) // (2 * T * L) for r in size}
    assert extra == {"dots_gdn": 0, "dots_gdn_acts": norms + product + gated,
                     "dots_gdn_mixer": norms + gated + qkv,
                     "dots_gdn_all": norms + product + gated + qkv}, extra


@pytest.mark.parametrize("name", ["tiny", "tiny_deltanet", "tiny_mamba2", "tiny_transformer",
                                  "tiny_h1", "tiny_h2"])  # tiny_h1 covers SWA
def test_training_steps_reduce_loss(name):
    model = tiny(name, dtype="bfloat16")
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, 256)

    @nnx.jit
    def train_step(model, opt, tokens):
        loss, grads = nnx.value_and_grad(_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt, tokens)) for _ in range(6)]
    assert np.isfinite(losses).all()
    assert abs(losses[0] - np.log(256)) < 0.1  # small init: near-uniform predictions
    assert losses[-1] < losses[0] - 0.1, losses


def test_every_param_has_logical_axis_names():
    model = tiny("tiny_h2", tie_embeddings=False, layer_pattern="MGSDA", num_layers=5)
    params = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    for path, var in nnx.to_flat_state(params):
        names = tuple(specs[path].get_value())
        value = var[...]
        assert len(names) == value.ndim, path
        assert set(names) <= AXIS_NAMES, (path, names)
        if value.ndim == 2 and min(value.shape) >= 64 and "conv" not in str(path):
            assert any(n is not None for n in names), path  # big matrices are shardable
    assert tuple(specs[("embedding",)].get_value()) == ("vocab", "embed")
    assert tuple(specs[("lm_head",)].get_value()) == ("embed", "vocab")
    assert tuple(specs[("blocks", 0, "mlp", "down_proj", "kernel")].get_value()) == ("mlp", "embed")
    assert tuple(specs[("blocks", 1, "mixer", "q_proj", "kernel")].get_value()) == ("embed", "heads")


def test_count_params_and_flops():
    cfg = get_model_config("tiny_h1")
    model = LM(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(cfg) == n
    T = 100  # window 16: SWA mean context = (16*17/2 + 84*16) / 100
    attn = 4 * cfg.attn_num_heads * cfg.attn_head_dim * (16 * 17 / 2 + 84 * 16) / T
    gdn = 6 * cfg.gdn_head_dim * cfg.gdn_v_dim * cfg.gdn_v_heads
    assert flops_per_token(cfg, T) == pytest.approx(6 * n + 3 * (attn + gdn))
