"""(I + A)^-1 for strictly lower-triangular A, from matmuls and masks only.

Shared by the plain-JAX chunk path and the Pallas kernels: Triton lowers no triangular solve, and on
XLA:CPU (jax 0.10) the batched LAPACK triangular solve was seen to hang training steps intermittently,
so neither path calls one.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def unit_lower_inverse(A: jax.Array, matmul: Callable) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two, by doubling.

    Let X_s invert every s x s diagonal block of I + A. A 2s x 2s diagonal block is [[P, 0], [Q, R]]
    with P^-1, R^-1 the corresponding blocks of X_s, and its inverse is
    [[P^-1, 0], [-R^-1 Q P^-1, R^-1]]. So X_2s = X_s - X_s L_s X_s, where L_s keeps the entries of A
    in the lower-left s x s quarter of each 2s x 2s diagonal block (the Q's). X_1 = I, X_2 = I - L_1,
    and log2(C) - 1 further steps of two matmuls give X_C. Every X_s is the exact inverse of a
    sub-matrix, never a power series (with repeated keys the powers of A grow like binomial
    coefficients), and the matmuls run on the tensor cores.
    matmul(a, b): a @ b in float32 over the leading batch dims (the caller picks its precision).
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"unit_lower_inverse needs a power-of-two size, got {C}")
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    eye = (rows == cols).astype(jnp.float32)

    def lower_left_quarters(s):
        return ((rows // (2 * s)) == (cols // (2 * s))) & ((rows // s) > (cols // s))

    X = eye - jnp.where(lower_left_quarters(1), A, 0.0)
    s = 2
    while s < C:
        X = X - matmul(X, matmul(jnp.where(lower_left_quarters(s), A, 0.0), X))
        s *= 2
    return X
