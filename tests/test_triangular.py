"""gdn_jax.triangular.unit_lower_inverse against a float64 inverse, including the hard case of
repeated keys (A's entries near 1, where power series of A blow up)."""

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.triangular import unit_lower_inverse


def _A(rng, C, repeated):
    K = 32
    if repeated:  # a few distinct keys, beta near 1: the delta rule's worst conditioning
        base = rng.standard_normal((3, K))
        k = base[rng.integers(0, 3, C)] + 0.01 * rng.standard_normal((C, K))
        beta = np.full(C, 0.99)
    else:
        k = rng.standard_normal((C, K))
        beta = rng.uniform(0, 1, C)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    G = np.cumsum(-rng.uniform(0, 0.1, C))
    return np.tril(beta[:, None] * (k @ k.T) * np.exp(np.tril(G[:, None] - G[None, :])), -1)


@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("repeated", [False, True])
def test_inverse_matches_float64(C, repeated):
    A = np.stack([_A(np.random.default_rng(s), C, repeated) for s in range(3)])
    X = unit_lower_inverse(jnp.asarray(A, jnp.float32), lambda a, b: jnp.matmul(a, b, precision="highest"))
    ref = np.linalg.inv(np.eye(C) + A)
    assert np.linalg.norm(np.asarray(X) - ref) / np.linalg.norm(ref) < 1e-6


def test_rejects_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        unit_lower_inverse(jnp.zeros((48, 48)), jnp.matmul)
