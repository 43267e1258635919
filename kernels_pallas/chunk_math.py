"""In-kernel building blocks of one chunk, on values already loaded (shared by forward and backward).

Notation for a chunk of C positions (r, j index positions; G = in-chunk cumsum of g):
  Gamma_rj  = exp(G_r - G_j) if j <= r and r, j are in the same document, else 0 (masked before exp)
  d_in_r    = exp(G_r)        if the state entering the chunk survives to r, else 0
  d_out_j   = exp(G_C - G_j)  if token j's write survives to the chunk's end, else 0
  d_chunk   = exp(G_C)        if the entering state survives the whole chunk, else 0
  A         = strict_lower(diag(beta) K K^T * Gamma),   T = (I + A)^-1
Only the triangle that is used is ever exponentiated, so no masked entry can overflow.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gdn_jax import triangular
from kernels_pallas.backend import mm


class Decays(NamedTuple):
    G: jax.Array        # [C] in-chunk cumulative log-decay
    gamma: jax.Array    # [C, C] Gamma, causal incl. diagonal
    strict: jax.Array   # [C, C] bool, j < r and same document
    d_in: jax.Array     # [C]
    d_out: jax.Array    # [C]
    d_chunk: jax.Array  # [] scalar
    is_last: jax.Array  # [C] bool, r == C - 1


def _masked_exp(x, mask):
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def chunk_decays(g, doc=None, reach_in=None, reach_out=None) -> Decays:
    """g: [C] float32; doc: [C] int document index, reach_in / reach_out: [C] float 0/1 masks (or None)."""
    C = g.shape[0]
    G = jnp.cumsum(g, axis=0)
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
    is_last = idx == C - 1
    G_last = jnp.sum(jnp.where(is_last, G, 0.0))
    causal = cols <= rows
    strict = cols < rows
    if doc is not None:
        same = doc[:, None] == doc[None, :]
        causal, strict = causal & same, strict & same
        keep_in, keep_out = reach_in > 0, reach_out > 0
        keep_chunk = jnp.sum(jnp.where(is_last, reach_in, 0.0)) > 0
    else:
        keep_in = keep_out = idx >= 0
        keep_chunk = True
    gamma = _masked_exp(G[:, None] - G[None, :], causal)
    d_in = _masked_exp(G, keep_in)
    d_out = _masked_exp(G_last - G, keep_out)
    d_chunk = jnp.where(keep_chunk, jnp.exp(G_last), 0.0)
    return Decays(G, gamma, strict, d_in, d_out, d_chunk, is_last)


def decayed_qk(q_c, k_c, dec: "Decays", scale, mm_dtype):
    """A_qk = scale Q K^T * Gamma [C, C] (float32) of one chunk: its in-chunk attention."""
    return mm(q_c, k_c, tb=True, dtype=mm_dtype) * (dec.gamma * scale)


def chunk_output(q_c, a_qk, S, vnew, dec: "Decays", scale, mm_dtype):
    """O = scale d_in Q S + A_qk Vnew [C, BV] of one chunk and value tile, from the state entering
    it S [K, BV] and Vnew [C, BV] (both rounded to mm_dtype as matmul operands)."""
    return (dec.d_in * scale)[:, None] * mm(q_c, S, dtype=mm_dtype) + mm(a_qk, vnew, dtype=mm_dtype)


def unit_lower_inverse(A, *, mm_precise: bool):
    """(I + A)^-1 of one chunk (see gdn_jax.triangular); mm_precise: IEEE float32 products in its
    matmul steps, otherwise TF32, which matches bf16 inputs."""
    return triangular.unit_lower_inverse(
        A, lambda a, b: mm(a, b, dtype=jnp.float32, precise=mm_precise))


def reverse_cumsum(x):
    """y_i = sum_{r >= i} x_r along axis 0, from a forward cumsum (Triton has no reverse scan)."""
    return jnp.sum(x, axis=0, keepdims=True) - jnp.cumsum(x, axis=0) + x


def gate_grad_from_pairs(Z):
    """For Z_rj = dL/dGamma_rj * Gamma_rj with Gamma_rj = exp(G_r - G_j): dL/dG = rowsum(Z) - colsum(Z)."""
    return jnp.sum(Z, axis=1) - jnp.sum(Z, axis=0)
