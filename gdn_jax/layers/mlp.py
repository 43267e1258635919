"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)); linear layers, alone or fused for inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

# silu(gate) * up, named so a remat policy can keep it for down_proj's weight gradient
# (gdn_jax/model.py's "dots_gdn_acts").
PRODUCT_NAME = "swiglu_product"


def linear(d_in: int, d_out: int, axes: tuple, *, std: float, dtype, rngs: nnx.Rngs,
           use_bias: bool = False) -> nnx.Linear:
    """A float32-param linear layer computing in `dtype`, its kernel annotated with logical `axes`."""
    init = nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],), eager_sharding=False)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=init, bias_init=bias_init,
                      dtype=dtype, param_dtype="float32", rngs=rngs)


class FusedLinear(nnx.Module):
    """Bias-free linear maps of one input as one matmul, for inference:
    (x W_1, ..., x W_n) = split(x [W_1 | ... | W_n]), x [..., d_in], W_i [d_in, d_i].

    One matmul reads the same weight bytes as n of them but is one kernel launch, and x is read
    once. Computes like nnx.Linear: x and the kernel promoted to `dtype`, no preferred type. The
    kernel carries no sharding names (inference copies live on one device)."""

    def __init__(self, linears: list[nnx.Linear]):
        if any(lin.bias is not None for lin in linears):
            raise ValueError("FusedLinear fuses bias-free linear layers only")
        self.kernel = nnx.Param(jnp.concatenate([lin.kernel[...] for lin in linears], axis=1))
        self.sizes = tuple(lin.out_features for lin in linears)
        self.dtype = linears[0].dtype

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x, w = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        bounds = [0]
        for size in self.sizes:
            bounds.append(bounds[-1] + size)
        return [y[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up_proj = linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down_proj = linear(hidden, d_model, ("mlp", "embed"), std=std, dtype=dtype, rngs=rngs)
        self.gate_up = nnx.data(None)  # FusedLinear of gate_proj and up_proj, inference only

    def fuse_for_inference(self):
        if self.gate_up is not None:  # fused already
            return
        self.gate_up = FusedLinear([self.gate_proj, self.up_proj])
        self.gate_proj = self.up_proj = None

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.gate_up is None:
            gate, up = self.gate_proj(x_BxTxD), self.up_proj(x_BxTxD)
        else:
            gate, up = self.gate_up(x_BxTxD)
        return self.down_proj(checkpoint_name(jax.nn.silu(gate) * up, PRODUCT_NAME))
