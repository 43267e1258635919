"""(I + A)^-1 for strictly lower-triangular A, from matmuls and masked reductions only.

Shared by the plain-JAX chunk path and the Pallas kernels: Triton lowers no triangular solve, and on
XLA:CPU (jax 0.10) the batched LAPACK triangular solve was seen to hang training steps intermittently,
so neither path calls one.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def unit_lower_inverse(A: jax.Array, matmul: Callable, *, block: int = 16) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C] (C a multiple of block, or C <= block).

    Split A = D + L into its diagonal blocks D (block x block) and the part L below them.
      1. (I + D)^-1 by forward substitution, all diagonal blocks at once: step i forms row i of every
         block, X_r = e_r - sum_{j<r} D_rj X_j. The blocks' rows live in disjoint columns, so one
         [C] vector per matrix carries all of them, picked out by masked reductions.
      2. (I + A) = (I + D)(I + E) with E = (I + D)^-1 L strictly block-lower, so E^(C/block) = 0 and
         (I + A)^-1 = (I - E)(I + E^2)(I + E^4)... (I + D)^-1: a few matmuls.
    No power series of A itself is formed: with repeated keys A^n grows like binomial coefficients.
    matmul(a, b): a @ b in float32 over the leading batch dims (the caller picks its precision).
    """
    C = A.shape[-1]
    block = min(block, C)
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    eye = (rows == cols).astype(jnp.float32)
    same_block = (rows // block) == (cols // block)
    D = jnp.where(same_block, A, 0.0)

    def substitute(i, X):
        picked = (rows % block) == i
        d = jnp.sum(jnp.where(picked, D, 0.0), axis=-2)        # row i of each block, in its columns
        y = jnp.sum(d[..., :, None] * X, axis=-2)              # sum_j D_rj X_j for each of those rows
        return jnp.where(picked & same_block, eye - y[..., None, :], X)

    D_inv = jax.lax.fori_loop(1, block, substitute, jnp.broadcast_to(eye, A.shape))
    if block == C:
        return D_inv
    P = -matmul(D_inv, A - D)                                   # -E
    F = eye + P
    span = 2
    while span < C // block:                                    # F = sum_{p < span} (-E)^p
        P = matmul(P, P)
        F = matmul(F, eye + P)
        span *= 2
    return matmul(F, D_inv)
