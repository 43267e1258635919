"""The implementations of the gated delta rule, and which one a name means: the one table.

  "scan"           `lax.scan` over tokens: the definition (gdn_jax/reference.py).
  "chunk"          chunkwise WY/UT algorithm in plain JAX (gdn_jax/chunked.py).
  "pallas_triton"  Pallas kernels, all lowered through Triton (any CUDA GPU; interpret mode on a CPU).
  "pallas_mosaic"  the same, with the two sequential sweeps on Mosaic GPU (Hopper wgmma and TMA;
                   bf16/f16 inputs, chunk size 64; interpret mode on a CPU needs jax >= 0.12).
  "pallas"         the fastest Pallas path the call can run on this device (`PALLAS_PREFERENCE`, from
                   measurements in docs/benchmarks.md).
  "auto"           "pallas" on a GPU for 16-bit inputs; "chunk" for float32 inputs and off the GPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Implementation(NamedTuple):
    run: Callable      # (q, k, v, g, beta, *, scale, initial_state, reset, chunk_size) -> (o, S)
    chunked: bool      # needs T padded to a multiple of chunk_size
    supports: Callable  # (dtype, K, V, chunk_size) -> None, or why the call cannot run here


def _scan(q, k, v, g, beta, *, scale, initial_state, reset, chunk_size):
    del chunk_size
    from gdn_jax import reference
    return reference.scan_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                           reset=reset)


def _chunk(q, k, v, g, beta, **kw):
    from gdn_jax import chunked
    return chunked.chunk_gated_delta_rule(q, k, v, g, beta, **kw)


def _pallas(sweeps: str) -> Callable:
    def run(q, k, v, g, beta, **kw):
        from kernels_pallas import pallas_gated_delta_rule
        return pallas_gated_delta_rule(q, k, v, g, beta, sweeps=sweeps, **kw)
    return run


def _always(*_):
    return None


def _mosaic_support(dtype, K, V, chunk_size):
    from kernels_pallas import mosaic_common
    from kernels_pallas.gated_delta_rule import padded_head_dims
    Kp, Vp = padded_head_dims(K, V)
    reason = mosaic_common.unsupported_reason(C=chunk_size, K=Kp, V=Vp, BV=64, dtype=dtype)
    if reason is None and jax.default_backend() == "gpu" and not on_hopper():
        reason = "the Mosaic GPU sweeps need a Hopper GPU (wgmma, TMA)"
    if reason is None and jax.default_backend() != "gpu" and not mosaic_common.interpret_supported():
        reason = "running the Mosaic GPU sweeps without a GPU (interpret mode) needs jax >= 0.12"
    return reason


IMPLEMENTATIONS = {
    "scan": Implementation(_scan, chunked=False, supports=_always),
    "chunk": Implementation(_chunk, chunked=True, supports=_always),
    "pallas_triton": Implementation(_pallas("triton"), chunked=True, supports=_always),
    "pallas_mosaic": Implementation(_pallas("mosaic"), chunked=True, supports=_mosaic_support),
}
ALIASES = ("pallas", "auto")
IMPLS = (*IMPLEMENTATIONS, *ALIASES)


def _mosaic_measured_faster(K: int, V: int) -> bool:
    # H200, jax 0.11.2, 2026-12-02 (docs/benchmarks.md, "Kernels v2"): the Mosaic sweeps beat the
    # Triton ones at K = 128 (forward+backward 1.19x to 1.35x) and lose at K = 256 (0.88x to 0.91x),
    # where their one warpgroup holds a [256, 64] float32 state and the q, k tiles allow one stage.
    from kernels_pallas.gated_delta_rule import padded_head_dims
    return padded_head_dims(K, V)[0] <= 128


# What "pallas" tries on a Hopper GPU, in order: (implementation, when it is the faster choice).
PALLAS_PREFERENCE = (("pallas_mosaic", _mosaic_measured_faster), ("pallas_triton", lambda K, V: True))


def on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return float(capability) >= 9.0


def _exact_float32(dtype) -> bool:
    # Float32 inputs ask the Pallas kernels for IEEE float32 products, which Triton has no tensor-core
    # instruction for: it unrolls them into FMA loops. At K = 256 the 1.3B model's float32 forward
    # had not compiled after 5 minutes (H200, 2026-12-03, docs/benchmarks.md), where the chunk path
    # compiles in 16-46 s; float32 runs are parity checks, not training, so "auto" takes the chunk path.
    return jnp.dtype(dtype) == jnp.float32


def resolve(impl: str, *, dtype, K: int, V: int, chunk_size: int) -> str:
    """The concrete implementation an impl name (one of IMPLS) means for this call on this machine.
    An explicit name that cannot run raises ValueError with the reason."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" and not _exact_float32(dtype) else "chunk"
    if impl == "pallas":
        # Without a Hopper GPU "pallas" means the portable kernels (in interpret mode on a CPU).
        if not on_hopper():
            return "pallas_triton"
        return next(name for name, faster in PALLAS_PREFERENCE
                    if faster(K, V) and IMPLEMENTATIONS[name].supports(dtype, K, V, chunk_size) is None)
    reason = IMPLEMENTATIONS[impl].supports(dtype, K, V, chunk_size)
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run this call: {reason}")
    return impl


# ---- one decoding token (`gdn_jax.ops.decode_recurrence`'s contract) -------------------------------
#   "xla"     the arithmetic in jax.numpy: XLA runs it as a reduction over the state, then an
#             elementwise update (two passes, separate kernels).
#   "pallas"  kernels_pallas/decode.py: one Triton kernel that reads each state tile once and writes
#             it in place (interpret mode on a CPU).
#   "auto"    "xla" until the kernel is measured against it on a GPU (docs/benchmarks.md).

def _decode_xla(*args, scale):
    from gdn_jax.ops import xla_decode_recurrence
    return xla_decode_recurrence(*args, scale=scale)


def _decode_pallas(*args, scale):
    from kernels_pallas.decode import pallas_decode_recurrence
    return pallas_decode_recurrence(*args, scale=scale)


DECODE_STEPS = {"xla": _decode_xla, "pallas": _decode_pallas}
DECODE_IMPLS = (*DECODE_STEPS, "auto")


def resolve_decode(impl: str, *, name: str = "decode_impl") -> str:
    """The decode step an impl name (one of DECODE_IMPLS) means; ValueError naming `name` if unknown."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"{name} must be one of {DECODE_IMPLS}, got {impl!r}")
    return "xla" if impl == "auto" else impl


# ---- the short causal conv with SiLU of the GDN mixers (`gdn_jax.layers.conv.ShortConv`) -----------
#   "xla"     the shifted multiply-sums in jax.numpy, autodiff for the backward.
#   "pallas"  kernels_pallas/short_conv.py: one Triton kernel forward, one backward that writes
#             per-tile weight-gradient partials (interpret mode on a CPU). It covers the forward
#             without a decode cache and without a bias; other calls and shapes it cannot tile
#             (kernels_pallas.short_conv.unsupported_reason) take the "xla" path.
#   "auto"    "xla" until the kernels are measured against it on a GPU (docs/benchmarks.md).
CONV_IMPLS = ("xla", "pallas", "auto")


def resolve_conv(impl: str, *, name: str = "conv_impl") -> str:
    """The short conv an impl name (one of CONV_IMPLS) means; ValueError naming `name` if unknown."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"{name} must be one of {CONV_IMPLS}, got {impl!r}")
    return "xla" if impl == "auto" else impl
