"""The public gated delta rule op: validate, pad T, dispatch on `impl`.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T (scale * q_t)

with q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; S: [B, HV, K, V] float32; value head j
reading query/key head j // (HV // H). `segment_ids` [B, T] restart the state from zero wherever the id
changes; `initial_state` is the state before each row's first token. Outputs: o [B, T, HV, V] in v's
dtype, and the final state (or None).

Implementations (all compute the same function): the table in gdn_jax/impls.py, with "scan" the
definition, "chunk" the plain-JAX chunkwise path, "pallas_triton" and "pallas_mosaic" the Pallas
kernels, "pallas" the fastest of those on this device, "auto" "pallas" on a GPU for 16-bit inputs and
"chunk" for float32 inputs and elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from gdn_jax import impls, reference
from gdn_jax.impls import IMPLS
from gdn_jax.reference import repeat_heads

CHUNK_SIZES = (16, 32, 64)
_HIGHEST = jax.lax.Precision.HIGHEST
_INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _check_float(name: str, x: Any, allowed=_INPUT_DTYPES) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not any(x.dtype == d for d in allowed):
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_shape(name: str, x, expected: tuple, meaning: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(x.shape)}")


def _resolve_scale(scale, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, output_final_state):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    for name, x in (("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1), got T = 0")
    _check_shape("k", k, q.shape, "[B, T, H, K] like q")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B, T, HV, V] with B, T = {B}, {T}, got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if HV % H != 0:
        raise ValueError(f"v's head count HV = {HV} must be a multiple of q/k's H = {H} (GVA)")
    _check_shape("g", g, (B, T, HV), "[B, T, HV]")
    _check_shape("beta", beta, (B, T, HV), "[B, T, HV]")
    if initial_state is not None:
        _check_float("initial_state", initial_state, (jnp.float32,))
        _check_shape("initial_state", initial_state, (B, HV, K, V), "[B, HV, K, V]")
    if segment_ids is not None:
        if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be an integer array, got "
                            f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
        _check_shape("segment_ids", segment_ids, (B, T), "[B, T]")
    if isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")


def resets_from_segment_ids(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T] bool: True where the id differs from the previous token's (never at t = 0)."""
    changed = segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def _pad_time(x, pad: int):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, chunk_size=64, impl="auto"):
    """Runs the gated delta rule over a sequence; see the module docstring for the math and shapes.

    Args:
      q, k: [B, T, H, K] (bf16, f16 or f32; same dtype).
      v: [B, T, HV, V]; HV a multiple of H.
      g: [B, T, HV] log-decay, g <= 0 (a_t = exp(g_t)).
      beta: [B, T, HV] write strength, usually in (0, 1) (or (0, 2) for negative eigenvalues).
      scale: multiplier on q; default K ** -0.5.
      initial_state: [B, HV, K, V] float32, or None for zeros.
      output_final_state: also return the state after each row's last token.
      segment_ids: [B, T] int; the state restarts from zero where the id changes.
      chunk_size: 16, 32 or 64 (chunked paths; "pallas_mosaic" needs 64).
      impl: one of IMPLS (gdn_jax/impls.py).
    Returns:
      (o [B, T, HV, V] in v's dtype, final_state [B, HV, K, V] float32 or None).
    Raises:
      ValueError / TypeError naming the bad argument, before anything is computed.
    """
    _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, output_final_state)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = _resolve_scale(scale, K)
    impl = impls.IMPLEMENTATIONS[impls.resolve(impl, dtype=q.dtype, K=K, V=V, chunk_size=chunk_size)]
    if initial_state is None:
        initial_state = jnp.zeros((B, HV, K, V), jnp.float32)
    reset = None if segment_ids is None else resets_from_segment_ids(segment_ids)
    if impl.chunked:
        # Padding with g = 0 and beta = 0 leaves the state unchanged: S_t = 1 * (I - 0) S + 0.
        pad = -T % chunk_size
        if pad:
            q, k, v, g, beta = (_pad_time(x, pad) for x in (q, k, v, g, beta))
            if reset is not None:
                reset = _pad_time(reset, pad)
    o, S = impl.run(q, k, v, g, beta, scale=scale, initial_state=initial_state, reset=reset,
                    chunk_size=chunk_size)
    return o[:, :T].astype(v.dtype), (S if output_final_state else None)


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None, impl="auto"):
    """One token of the recurrence, for decoding.

    Args:
      q_t, k_t: [B, H, K]; v_t: [B, HV, V]; g_t, beta_t: [B, HV]; state: [B, HV, K, V] float32
      (None means zeros).
      impl: one of gdn_jax.impls.DECODE_IMPLS ("xla", "pallas", "auto").
    Returns:
      (o_t [B, HV, V] in v_t's dtype, new_state [B, HV, K, V] float32).
    """
    impls.resolve_decode(impl, name="impl")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("g_t", g_t), ("beta_t", beta_t)):
        _check_float(name, x)
    if q_t.ndim != 3:
        raise ValueError(f"q_t must have shape [B, H, K], got {tuple(q_t.shape)}")
    B, H, K = q_t.shape
    _check_shape("k_t", k_t, q_t.shape, "[B, H, K] like q_t")
    if v_t.ndim != 3 or v_t.shape[0] != B:
        raise ValueError(f"v_t must have shape [B, HV, V] with B = {B}, got {tuple(v_t.shape)}")
    HV, V = v_t.shape[1:]
    if HV % H != 0:
        raise ValueError(f"v_t's head count HV = {HV} must be a multiple of q_t's H = {H} (GVA)")
    _check_shape("g_t", g_t, (B, HV), "[B, HV]")
    _check_shape("beta_t", beta_t, (B, HV), "[B, HV]")
    if state is None:
        state = jnp.zeros((B, HV, K, V), jnp.float32)
    _check_float("state", state, (jnp.float32,))
    _check_shape("state", state, (B, HV, K, V), "[B, HV, K, V]")
    return decode_recurrence(q_t, k_t, v_t, g_t, beta_t, state, scale=_resolve_scale(scale, K),
                             impl=impl)


def decode_recurrence(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None, impl="auto"):
    """One token of the gated delta rule (`xla_decode_recurrence`'s math and shapes), on the
    implementation `impl` names (gdn_jax.impls.DECODE_STEPS: "xla", "pallas" or "auto"), without
    argument checks: the decode loop's layers call it directly."""
    K = q_t.shape[-1]
    step = impls.DECODE_STEPS[impls.resolve_decode(impl, name="impl")]
    return step(q_t, k_t, v_t, g_t, beta_t, state, scale=K ** -0.5 if scale is None else scale)


def xla_decode_recurrence(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None):
    """One token of the gated delta rule, reading the state once for both of its products.

    With a = exp(g), q' = scale q, and kS = S^T k, qS = S^T q' taken together from the old state:
        S' = a (S - beta k kS^T) + beta k v^T
        o  = S'^T q' = a (qS - beta (k.q') kS) + beta (k.q') v
    so o needs no second pass over S' (forming S' and then reading it
    again, as reference.recurrent_step does, moves a third more bytes).
    The "xla" decode step (gdn_jax.impls.DECODE_STEPS):
    q_t, k_t [B, H, K]; v_t [B, HV, V]; g_t, beta_t [B, HV]; state [B, HV, K, V] float32.
    Returns (o_t [B, HV, V] in v_t's dtype, new state [B, HV, K, V] float32).
    """
    f32 = jnp.float32
    HV, K = v_t.shape[1], q_t.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q_BxHxK = repeat_heads(q_t.astype(f32), HV) * scale
    k_BxHxK = repeat_heads(k_t.astype(f32), HV)
    v_BxHxV = v_t.astype(f32)
    a_BxH, beta_BxH = jnp.exp(g_t.astype(f32)), beta_t.astype(f32)
    kqS_2xBxHxV = jnp.einsum("bhnk,bhkv->nbhv", jnp.stack([k_BxHxK, q_BxHxK], axis=2), state,
                             precision=_HIGHEST)
    kS_BxHxV, qS_BxHxV = kqS_2xBxHxV[0], kqS_2xBxHxV[1]
    a, beta, k_col = a_BxH[..., None, None], beta_BxH[..., None, None], k_BxHxK[..., None]
    new_state = (a * (state - beta * k_col * kS_BxHxV[..., None, :])
                 + beta * k_col * v_BxHxV[..., None, :])
    bkq_BxHx1 = (beta_BxH * jnp.sum(k_BxHxK * q_BxHxK, axis=-1))[..., None]
    o = a_BxH[..., None] * (qS_BxHxV - bkq_BxHx1 * kS_BxHxV) + bkq_BxHx1 * v_BxHxV
    return o.astype(v_t.dtype), new_state
