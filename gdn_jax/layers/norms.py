"""RMSNorm and the gated RMSNorm of the GDN / Mamba2 outputs, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def small_param(value: jax.Array) -> nnx.Param:
    """A parameter too small to shard: every axis maps to None."""
    return nnx.Param(value, out_sharding=(None,) * value.ndim, eager_sharding=False)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * w over the last axis; w starts at ones. Output in `dtype` (input's if None)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None):
        self.scale = small_param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * self.scale[...]
        return y.astype(self.dtype or x.dtype)


class GatedRMSNorm(nnx.Module):
    """Per-group RMSNorm with a SiLU gate, in float32.

    norm_before_gate=True (GDN):   y = rmsnorm(x) * w * silu(z)
    norm_before_gate=False (Mamba2): y = rmsnorm(x * silu(z)) * w
    The norm runs over the last axis; callers reshape so that axis is one head / group.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, norm_before_gate: bool = True):
        self.scale = small_param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        gate = jax.nn.silu(z.astype(jnp.float32))
        if self.norm_before_gate:
            return rms_normalize(x, self.eps) * self.scale[...] * gate
        return rms_normalize(x.astype(jnp.float32) * gate, self.eps) * self.scale[...]
