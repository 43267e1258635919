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


def unit_lower_inverse(A, *, mm_precise: bool, block: int = 16):
    """(I + A)^-1 for strictly lower-triangular A [C, C].

    Split A = D + L into its diagonal blocks D (block x block) and the part L below them.
      1. (I + D)^-1 by forward substitution, all diagonal blocks at once: step i forms row i of
         every block, X_r = e_r - sum_{j<r} D_rj X_j, with rows picked out by masked reductions. The
         blocks' rows live in disjoint columns, so one [C] vector carries all of them per step.
      2. (I + A) = (I + D)(I + E) with E = (I + D)^-1 L strictly block-lower, so E^(C/block) = 0 and
         (I + A)^-1 = (I - E)(I + E^2)(I + E^4)... (I + D)^-1: a few matmuls on the tensor cores.
    The substitution is exact in the sense of forward substitution; no power series of A itself is
    formed (that would overflow when keys repeat, since A^n then grows like binomial coefficients).
    mm_precise: float32 (IEEE) products in step 2; otherwise TF32, which matches bf16 inputs.
    """
    C = A.shape[0]
    block = min(block, C)
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    eye = (rows == cols).astype(jnp.float32)
    same_block = (rows // block) == (cols // block)
    D = jnp.where(same_block, A, 0.0)

    def substitute(i, X):
        picked = (rows % block) == i
        d = jnp.sum(jnp.where(picked, D, 0.0), axis=0)      # row i of each block, in its own columns
        y = jnp.sum(d[:, None] * X, axis=0)                  # sum_j D_rj X_j for each of those rows
        return jnp.where(picked & same_block, eye - y[None, :], X)

    D_inv = jax.lax.fori_loop(1, block, substitute, eye)
    if block == C:
        return D_inv
    mm32 = lambda a, b: mm(a, b, dtype=jnp.float32, precise=mm_precise)
    P = -mm32(D_inv, A - D)                                   # -E
    F = eye + P
    span = 2
    while span < C // block:                                  # F = sum_{p < span} (-E)^p
        P = mm32(P, P)
        F = mm32(F, eye + P)
        span *= 2
    return mm32(F, D_inv)


def reverse_cumsum(x):
    """y_i = sum_{r >= i} x_r along axis 0, from a forward cumsum (Triton has no reverse scan)."""
    return jnp.sum(x, axis=0, keepdims=True) - jnp.cumsum(x, axis=0) + x


def gate_grad_from_pairs(Z):
    """For Z_rj = dL/dGamma_rj * Gamma_rj with Gamma_rj = exp(G_r - G_j): dL/dG = rowsum(Z) - colsum(Z)."""
    return jnp.sum(Z, axis=1) - jnp.sum(Z, axis=0)
