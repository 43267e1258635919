"""What the Triton-lowered kernels (forward.py, backward.py) share: the matmul and the launch.

The Mosaic GPU sweeps (mosaic_sweeps.py) have their own; gated_delta_rule.SWEEPS picks between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def mm(a, b, *, ta: bool = False, tb: bool = False, dtype=None, precise: bool = True):
    """2-D matmul with float32 accumulation: (a or aᵀ) @ (b or bᵀ).

    Operands are cast to `dtype` first (the inputs' dtype: bf16 operands run on the tensor cores).
    Float32 operands use IEEE float32 products when `precise`, TF32 tensor-core products otherwise
    (on the CPU interpreter both are exact float32).
    """
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    # The Triton lowering maps DEFAULT to TF32 for float32 operands, HIGHEST to IEEE float32.
    precision = None
    if a.dtype == jnp.float32:
        precision = jax.lax.Precision.HIGHEST if precise else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def call(kernel, *, out_shape, grid, in_specs, out_specs, num_warps: int, num_stages: int, name: str,
         interpret: bool):
    """pallas_call with the Triton compiler parameters, or in Pallas's interpret mode."""
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=name)


# The whole array as the kernel's ref: kernels that walk the chunks themselves index it directly.
WHOLE = pl.no_block_spec
