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
