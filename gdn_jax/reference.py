"""The gated delta rule as a `lax.scan` over time: the definition every faster path is checked against.

For each batch row and value head, with state S in R^{K x V} (float32) and a_t = exp(g_t):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

Where `reset_t` is true (a new packed document starts at t) the state is zeroed first: S_{t-1} := 0.
Value head j reads query/key head j // (HV // H) (grouped value attention, GVA).

Inputs here are already validated by `gdn_jax.ops`; callers use `gdn_jax.ops.gated_delta_rule`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def repeat_heads(x_BxTxHxD: jax.Array, num_v_heads: int) -> jax.Array:
    """Expands q/k heads [..., H, D] to value heads [..., HV, D]: value head j reads head j // (HV // H)."""
    groups = num_v_heads // x_BxTxHxD.shape[-2]
    return x_BxTxHxD if groups == 1 else jnp.repeat(x_BxTxHxD, groups, axis=-2)


def recurrent_step(S_BxHxKxV, q_BxHxK, k_BxHxK, v_BxHxV, g_BxH, beta_BxH):
    """One token of the recurrence, all in float32; q is already scaled. Returns (o_BxHxV, S_BxHxKxV)."""
    a = jnp.exp(g_BxH)[..., None, None]
    beta = beta_BxH[..., None, None]
    k_col = k_BxHxK[..., :, None]
    # (I - beta k k^T) S computed as S - beta k (k^T S): same matrix, without forming the K x K product.
    kS_Bx_H_1xV = jnp.einsum("bhk,bhkv->bhv", k_BxHxK, S_BxHxKxV, precision=_HIGHEST)[..., None, :]
    S_BxHxKxV = a * (S_BxHxKxV - beta * k_col * kS_Bx_H_1xV) + beta * k_col * v_BxHxV[..., None, :]
    o_BxHxV = jnp.einsum("bhk,bhkv->bhv", q_BxHxK, S_BxHxKxV, precision=_HIGHEST)
    return o_BxHxV, S_BxHxKxV


def scan_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, reset):
    """Sequential reference.

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV].
      scale: multiplier applied to q.
      initial_state: [B, HV, K, V] float32 (zeros if there is none).
      reset: [B, T] bool or None; True where the state restarts from zero before the token.
    Returns:
      o: [B, T, HV, V] float32 and the final state [B, HV, K, V] float32.
    """
    HV = v.shape[2]
    f32 = jnp.float32
    q_TxBxHxK = jnp.moveaxis(repeat_heads(q, HV).astype(f32) * scale, 1, 0)
    k_TxBxHxK = jnp.moveaxis(repeat_heads(k, HV).astype(f32), 1, 0)
    v_TxBxHxV = jnp.moveaxis(v.astype(f32), 1, 0)
    g_TxBxH = jnp.moveaxis(g.astype(f32), 1, 0)
    beta_TxBxH = jnp.moveaxis(beta.astype(f32), 1, 0)
    if reset is None:
        reset = jnp.zeros(g.shape[:2], bool)
    keep_TxB = jnp.moveaxis(~reset, 1, 0).astype(f32)

    def step(S, xs):
        q_t, k_t, v_t, g_t, beta_t, keep_t = xs
        S = S * keep_t[:, None, None, None]
        o_t, S = recurrent_step(S, q_t, k_t, v_t, g_t, beta_t)
        return S, o_t

    S_final, o_TxBxHxV = jax.lax.scan(
        step, initial_state.astype(f32),
        (q_TxBxHxK, k_TxBxHxK, v_TxBxHxV, g_TxBxH, beta_TxBxH, keep_TxB))
    return jnp.moveaxis(o_TxBxHxV, 0, 1), S_final
