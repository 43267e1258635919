"""The decoding copy of an LM: matmul weights stored once in the compute dtype, optionally fused.

A trained LM keeps float32 parameters and casts each matmul weight to cfg.dtype inside every call.
A decode step reads every weight once per token, so from float32 parameters it would read 4 bytes
per weight (and convert) where a bf16 weight needs 2. `for_inference(model)` returns a copy whose
projection kernels (every nnx.Linear) and LM head are cast once, at load, to the compute dtype:

  - The matmuls see exactly the values they saw before (the cast is deterministic), so logits and
    greedy tokens do not change.
  - Small parameters (norm scales, conv taps, A_log, dt_bias, D) stay float32: every path reads them
    as float32, and they weigh little.
  - The embedding table stays float32 for the lookup (B rows a step). A tied model gets a copy of
    it in the compute dtype for the head (`LM.tied_head`).
  - Recurrent and SSM states are float32 whatever the dtype (the layers make them so).

Options:
  dtype=None       the model's compute dtype, cfg.dtype (bf16 for every preset);
  dtype="float32"  keeps float32 weights and computes in float32 (a bf16 model is rebuilt with
                   cfg.dtype = float32; any dtype other than cfg.dtype rebuilds the same way);
  fuse=True        (default) projections that read the same input become one matmul (GDN: q, k, v, beta,
                   decay and output gate; attention: q, k, v; MLP: gate and up; Mamba2 already has
                   one). Same math; float rounding may differ in the last bits. On an H200
                   (fla_gdn_1.3b, bf16, B = 1) fusing, together with the one-read recurrence
                   (gdn_jax.ops.decode_recurrence, which every decode step now uses), took a decode
                   step from 39.4 ms to 2.33 ms (docs/benchmarks.md); fuse=False keeps the trained
                   module's layout;
  decode_impl      the recurrence of each GDN decode step (gdn_jax.impls.DECODE_IMPLS): "xla" (the
                   arithmetic in jax.numpy), "pallas" (one Triton kernel reading the state once and
                   updating it in place, kernels_pallas/decode.py), "auto" (default: "xla" until the
                   kernel is measured against it on a GPU).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gdn_jax import impls


def is_inference_copy(model) -> bool:
    """True when no matmul weight of `model` needs a cast at run time: every nnx.Linear kernel is
    in its compute dtype, and the LM head is too (a float32 model qualifies as built)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear) and module.kernel[...].dtype != jnp.dtype(module.dtype):
            return False
    if model.lm_head is not None:
        return model.lm_head[...].dtype == model.dtype
    head = model.embedding if model.tied_head is None else model.tied_head
    return head[...].dtype == model.dtype


def for_inference(model, *, dtype=None, fuse: bool = True, decode_impl: str = "auto"):
    """A copy of the LM `model` for prefill and decoding (see the module docstring); `model` is
    left unchanged, and the caller may drop it to free its float32 weights."""
    impls.resolve_decode(decode_impl)
    cfg = model.cfg
    try:  # "bfloat16" and jnp.bfloat16 alike; the config names dtypes by string
        dtype = cfg.dtype if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}") from None
    if dtype == cfg.dtype:
        copy = nnx.merge(*nnx.split(model))
    else:  # the compute dtype is fixed in each layer when it is built
        abstract = nnx.eval_shape(lambda: type(model)(cfg.replace(dtype=dtype), rngs=nnx.Rngs(0)))
        copy = nnx.merge(nnx.split(abstract)[0], nnx.state(model))
    compute = jnp.dtype(dtype)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, nnx.Linear):
            module.kernel = nnx.Param(module.kernel[...].astype(compute))
    if copy.lm_head is not None:
        copy.lm_head = nnx.Param(copy.lm_head[...].astype(compute))
    elif compute != jnp.float32:
        copy.tied_head = nnx.Variable(copy.embedding[...].astype(compute))
    if fuse:
        copy.fuse_for_inference()
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "decode_impl"):
            module.decode_impl = decode_impl
    return copy
