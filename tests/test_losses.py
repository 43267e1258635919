"""The fused, chunked LM-head cross-entropy against the plain one: values and gradients in h and W
under a random cotangent, with ragged chunks and masked tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.losses import fused_cross_entropy_sum, reference_cross_entropy_sum


def _inputs(seed, N=77, D=24, V=50):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    W = jnp.asarray(rng.standard_normal((D, V)) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    w = jnp.asarray(rng.random(N) < 0.8, jnp.float32)  # a loss mask
    return h, W, y, w


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("chunk", [1, 16, 77, 200])
def test_value_and_gradients_match_the_plain_loss(chunk):
    h, W, y, w = _inputs(0)
    cot = 1.7  # a cotangent other than 1
    f_ref = lambda h, W: cot * reference_cross_entropy_sum(h, W, y, w)
    f = lambda h, W: cot * fused_cross_entropy_sum(h, W, y, w, chunk_tokens=chunk)
    with jax.default_matmul_precision("highest"):
        v_ref, g_ref = jax.value_and_grad(f_ref, (0, 1))(h, W)
        v, g = jax.jit(jax.value_and_grad(f, (0, 1)))(h, W)
    assert abs(float(v) - float(v_ref)) < 1e-5 * abs(float(v_ref))
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-5


def test_bf16_operands_stay_close_to_float32():
    h, W, y, w = _inputs(1, N=64, D=32, V=40)
    with jax.default_matmul_precision("highest"):
        g_ref = jax.grad(lambda h, W: reference_cross_entropy_sum(h, W, y, w), (0, 1))(h, W)
    g = jax.grad(lambda h, W: fused_cross_entropy_sum(h, W, y, w, chunk_tokens=16,
                                                      compute_dtype=jnp.bfloat16), (0, 1))(h, W)
    for a, b in zip(g, g_ref):
        assert 0 < _rel(a, b) < 2e-2


def test_rejects_a_bad_chunk():
    h, W, y, w = _inputs(2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_cross_entropy_sum(h, W, y, w, chunk_tokens=0)


@pytest.mark.parametrize("tie", [True, False])
def test_lm_losses_agree_on_a_model_in_value_and_parameter_gradients(tie):
    # The train step's two losses on the tiny LM (tied and untied head), masked tokens, ragged
    # chunks: the same sum and the same gradient for every parameter.
    import dataclasses

    from flax import nnx

    from configs.model import get_model_config
    from gdn_jax.losses import LM_LOSSES
    from gdn_jax.model import LM

    cfg = dataclasses.replace(get_model_config("tiny"), tie_embeddings=tie, dtype="float32")
    model = LM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 24)) < 0.7, jnp.float32)
    np.testing.assert_allclose(
        model.features(tokens) @ model.head_weight(), model(tokens), rtol=1e-5, atol=1e-5)
    graphdef, params = nnx.split(model)

    def total(params, name):
        m = nnx.merge(graphdef, params)
        return LM_LOSSES[name](m, tokens, targets, mask, {}, chunk_tokens=10)

    (v_plain, g_plain), (v_fused, g_fused) = (
        jax.value_and_grad(total)(params, name) for name in ("plain", "fused"))
    np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5)
    flat_p, flat_f = jax.tree.leaves(g_plain), jax.tree.leaves(g_fused)
    assert len(flat_p) == len(flat_f) > 4
    for a, b in zip(flat_f, flat_p):
        assert _rel(a, b) < 1e-4, _rel(a, b)


def test_fused_lm_loss_names_the_option_for_a_model_without_features():
    from gdn_jax.losses import check_model_supports

    class Bare:
        pass

    with pytest.raises(ValueError, match="train.loss='fused'.*Bare"):
        check_model_supports("fused", Bare())
    check_model_supports("plain", Bare())
    from configs import experiment

    with pytest.raises(ValueError, match="train.loss must be"):
        experiment.apply_overrides(experiment.get_config("tiny"), ["train.loss=chunked"])
