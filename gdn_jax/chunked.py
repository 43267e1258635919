"""The gated delta rule in chunkwise (WY / UT) form, in plain JAX; autodiff gives the backward.

Split T into N chunks of C positions. Inside a chunk, with S the state entering it, G_r the cumulative
log-decay (G_r = g_1 + ... + g_r) and Gamma_rj = exp(G_r - G_j) for r >= j in the same document (0
otherwise, masked *before* the exp so that the positive exponents of r < j never overflow):

    A     = strict_lower(diag(beta) K K^T * Gamma)                  [C, C]
    T     = (I + A)^-1                                              unit lower triangular (triangular.py)
    U     = T (beta * V),   W = T (beta * exp(G) * K)               [C, V], [C, K]
    Vnew  = U - W S                                                 the delta-rule "new values"
    O     = (exp(G) * scale Q) S + (scale Q K^T * Gamma) Vnew       (Gamma with its diagonal)
    S'    = exp(G_C) S + (exp(G_C - G) * K)^T Vnew

Everything chunk-local runs in parallel over all chunks; only Vnew and S' are sequential, carried by a
`lax.scan` over chunks that keeps one [K, V] state per chunk (never a [T, K, V] tensor).
Where a document starts inside the chunk, exp(G) and exp(G_C - G) are masked to the positions that
the entering state (resp. the leaving state) really reaches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gdn_jax.reference import repeat_heads
from gdn_jax.triangular import unit_lower_inverse


def segment_index(reset_BxT: jax.Array) -> jax.Array:
    """Monotone document index per position: 0 for the first document of a row, +1 at every reset."""
    return jnp.cumsum(reset_BxT.astype(jnp.int32), axis=1)


def masked_exp(x, mask):
    """exp(x) where mask, exactly 0 elsewhere, with the mask applied before the exp (no inf, no NaN grads)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, reset, chunk_size):
    """Chunkwise path. Same arguments and results as `reference.scan_gated_delta_rule`; T % chunk_size == 0."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    C = chunk_size
    N = T // C
    f32 = jnp.float32

    def to_chunks(x):  # [B, T, HV, ...] -> [B, HV, N, C, ...]
        x = x.astype(f32).reshape(B, N, C, HV, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    q_BHNCK = to_chunks(repeat_heads(q, HV)) * scale
    k_BHNCK = to_chunks(repeat_heads(k, HV))
    v_BHNCV = to_chunks(v)
    beta_BHNC = to_chunks(beta)
    G_BHNC = jnp.cumsum(to_chunks(g), axis=-1)  # in-chunk cumulative log-decay, float32

    if reset is None:
        reset = jnp.zeros((B, T), bool)
    seg_BNC = segment_index(reset).reshape(B, N, C)
    # Document index just before each chunk (the one the entering state belongs to).
    seg_before_BN = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), seg_BNC[:, :-1, -1]], axis=1)
    reaches_from_start_B1NC = (seg_BNC == seg_before_BN[..., None])[:, None]  # entering state survives to r
    reaches_to_end_B1NC = (seg_BNC == seg_BNC[..., -1:])[:, None]             # token j survives to the end
    same_doc_B1NCC = (seg_BNC[..., :, None] == seg_BNC[..., None, :])[:, None]
    causal_CC = jnp.tril(jnp.ones((C, C), bool))
    strict_CC = jnp.tril(jnp.ones((C, C), bool), -1)

    G_rj = G_BHNC[..., :, None] - G_BHNC[..., None, :]
    gamma_BHNCC = masked_exp(G_rj, causal_CC & same_doc_B1NCC)
    decay_in_BHNC = masked_exp(G_BHNC, reaches_from_start_B1NC)                    # exp(G_r)
    decay_out_BHNC = masked_exp(G_BHNC[..., -1:] - G_BHNC, reaches_to_end_B1NC)    # exp(G_C - G_j)
    decay_chunk_BHN = masked_exp(G_BHNC[..., -1], reaches_from_start_B1NC[..., -1])  # exp(G_C)

    kk_BHNCC = jnp.einsum("...rk,...jk->...rj", k_BHNCK, k_BHNCK)
    A_BHNCC = jnp.where(strict_CC, beta_BHNC[..., :, None] * kk_BHNCC * gamma_BHNCC, 0.0)
    matmul = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    T_BHNCC = unit_lower_inverse(A_BHNCC, matmul)
    U_BHNCV = jnp.einsum("...rj,...jv->...rv", T_BHNCC, beta_BHNC[..., None] * v_BHNCV)
    W_BHNCK = jnp.einsum("...rj,...jk->...rk", T_BHNCC, (beta_BHNC * decay_in_BHNC)[..., None] * k_BHNCK)
    k_out_BHNCK = decay_out_BHNC[..., None] * k_BHNCK

    def across_chunks(S_BHKV, xs):
        U, W, k_out, decay_chunk = xs
        vnew_BHCV = U - jnp.einsum("bhck,bhkv->bhcv", W, S_BHKV)
        S_next = (decay_chunk[..., None, None] * S_BHKV
                  + jnp.einsum("bhck,bhcv->bhkv", k_out, vnew_BHCV))
        return S_next, (S_BHKV, vnew_BHCV)

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # scan over N
    S_final, (S_in_NBHKV, vnew_NBHCV) = jax.lax.scan(
        across_chunks, initial_state.astype(f32),
        (chunk_major(U_BHNCV), chunk_major(W_BHNCK), chunk_major(k_out_BHNCK),
         chunk_major(decay_chunk_BHN)))
    S_in_BHNKV = jnp.moveaxis(S_in_NBHKV, 0, 2)
    vnew_BHNCV = jnp.moveaxis(vnew_NBHCV, 0, 2)

    qk_BHNCC = jnp.einsum("...rk,...jk->...rj", q_BHNCK, k_BHNCK) * gamma_BHNCC
    o_BHNCV = (jnp.einsum("...rk,...kv->...rv", decay_in_BHNC[..., None] * q_BHNCK, S_in_BHNKV)
               + jnp.einsum("...rj,...jv->...rv", qk_BHNCC, vnew_BHNCV))
    o_BTHV = jnp.moveaxis(o_BHNCV, 1, 3).reshape(B, T, HV, V)
    return o_BTHV, S_final
