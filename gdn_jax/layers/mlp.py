"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx


def linear(d_in: int, d_out: int, axes: tuple, *, std: float, dtype, rngs: nnx.Rngs,
           use_bias: bool = False) -> nnx.Linear:
    """A float32-param linear layer computing in `dtype`, its kernel annotated with logical `axes`."""
    init = nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],), eager_sharding=False)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=init, bias_init=bias_init,
                      dtype=dtype, param_dtype="float32", rngs=rngs)


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up_proj = linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down_proj = linear(hidden, d_model, ("mlp", "embed"), std=std, dtype=dtype, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))
