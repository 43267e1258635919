"""The Pallas gated delta rule: forward and backward kernels joined by `jax.custom_vjp`.

Residuals: the inputs and T = (I + A)^-1 ([B, T, HV, C] float32, like a C-wide head). The backward
recomputes W and U from T (two matmuls per chunk; the inverse is the costly part of `prepare`), and
the per-chunk states and Vnew (one sequential sweep) instead of keeping them: the states are
[B, HV, T/C, K, V], K/C (= 2 at K = 128) times the size of v per layer, which would dominate a
training step's activation memory, while recomputing them costs about one forward sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import backward, forward
from kernels_pallas.layout import Tiling


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _pad_last(x, size):
    pad = size - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _mm_dtype(dtype):
    # bf16/f16 operands use the tensor cores; f32 inputs keep IEEE float32 products.
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


def document_masks(reset_BxT, N, C):
    """(doc, reach_in, reach_out), each [B, N, C]: document index, and whether the state entering the
    chunk survives to each position / whether each position's write survives to the chunk's end."""
    doc = jnp.cumsum(reset_BxT.astype(jnp.int32), axis=1).reshape(-1, N, C)
    before = jnp.concatenate([jnp.zeros_like(doc[:, :1, 0]), doc[:, :-1, -1]], axis=1)
    reach_in = (doc == before[..., None]).astype(jnp.float32)
    reach_out = (doc == doc[..., -1:]).astype(jnp.float32)
    return doc, reach_in, reach_out


def _forward(q, k, v, g, beta, initial_state, docs, t: Tiling):
    mm_dtype = _mm_dtype(q.dtype)
    w, u, T = forward.prepare(k, v, g, beta, docs, t, mm_dtype)
    if t.split_output:
        _, S_final, states_in, vnew = forward.sweep(q, k, w, u, g, docs, initial_state, t, mm_dtype,
                                                    out_dtype=v.dtype, residuals=True)
        o = forward.output(q, k, g, docs, states_in, vnew, t, mm_dtype, out_dtype=v.dtype)
    else:
        o, S_final, _, _ = forward.sweep(q, k, w, u, g, docs, initial_state, t, mm_dtype,
                                         out_dtype=v.dtype, residuals=False)
    return (o, S_final), T


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(q, k, v, g, beta, initial_state, docs, t: Tiling):
    return _forward(q, k, v, g, beta, initial_state, docs, t)[0]


def _chunked_fwd(q, k, v, g, beta, initial_state, docs, t):
    out, T = _forward(q, k, v, g, beta, initial_state, docs, t)
    return out, (q, k, v, g, beta, initial_state, docs, T)


def _chunked_bwd(t, res, cotangents):
    q, k, v, g, beta, initial_state, docs, T = res
    do, dS_final = cotangents
    mm_dtype = _mm_dtype(q.dtype)
    w, u, _ = forward.prepare(k, v, g, beta, docs, t, mm_dtype, T=T)
    _, _, states_in, vnew = forward.sweep(q, k, w, u, g, docs, initial_state, t, mm_dtype,
                                          out_dtype=v.dtype, residuals=True)
    dvn_local = backward.local_dvnew(q, k, g, docs, do, t, mm_dtype)
    dstates_out, dvnew, d_initial = backward.reverse_sweep(q, k, w, g, docs, do, dvn_local, dS_final, t,
                                                           mm_dtype)
    t_dvn, d_qk, Y, dG, dbeta = backward.pair_grads(q, k, v, g, beta, docs, T, do, vnew, dvnew, t, mm_dtype)
    dq, dk, dG_keys, dbeta_keys = backward.key_grads(q, k, g, beta, docs, d_qk, Y, states_in,
                                                     dstates_out, do, vnew, t_dvn, t, mm_dtype)
    dv = t_dvn.astype(jnp.float32) * beta[..., None]  # d(beta V) = T^T dVnew
    dG = dG + dG_keys.sum(-1)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, 2), 2), 2)  # g -> G is a cumsum within each chunk
    dbeta = dbeta + dbeta_keys.sum(-1)
    if t.group > 1:  # value heads that share a q/k head add their gradients
        dq = dq.reshape(*dq.shape[:3], t.H, t.group, t.K).sum(4)
        dk = dk.reshape(*dk.shape[:3], t.H, t.group, t.K).sum(4)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, d_initial, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def make_tiling(*, B, T, H, HV, K, V, chunk_size, scale, has_docs, block_v=32, inner_block_v=None,
                block_k=64, num_warps=4, num_stages=1, sweep_warps=4, sweep_stages=None,
                split_output=False) -> Tiling:
    """The launch spec for head dims K, V (padded here to powers of two), with the defaults below
    filled in. The keyword launch parameters are those `pallas_gated_delta_rule` passes on."""
    Kp, Vp = _pow2_at_least_16(K), _pow2_at_least_16(V)
    # Defaults measured on an H100 (docs/benchmarks.md, "Where the time goes").
    block_v = min(block_v, Vp)
    if inner_block_v is None:
        inner_block_v = 128 if Kp <= 128 else 64
    if sweep_stages is None:  # two [K, BV] stages of the sweep's loads must fit in shared memory
        sweep_stages = 2 if Kp * block_v <= 256 * 32 else 1
    return Tiling(B=B, N=T // chunk_size, C=chunk_size, H=H, HV=HV, K=Kp, V=Vp, BV=block_v,
                  BK=min(block_k, Kp), scale=float(scale), has_docs=has_docs, BVI=min(inner_block_v, Vp),
                  num_warps=num_warps, num_stages=num_stages, sweep_warps=sweep_warps,
                  sweep_stages=sweep_stages, split_output=split_output)


def pallas_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, reset, chunk_size, **launch):
    """Same contract as `gdn_jax.chunked.chunk_gated_delta_rule` (T a multiple of chunk_size).

    Head dims are zero-padded to powers of two (Triton's block shapes), which changes nothing: zero
    key/query columns add nothing to any product and zero value columns give zero outputs.
    `launch` holds launch parameters only (see `make_tiling` for their defaults); every choice computes
    the same function:
      block_v, sweep_warps, sweep_stages: the sequential sweeps' value tile, warps and software-
        pipelining depth (default sweep_stages: 2, or 1 where 2 would not fit shared memory);
      inner_block_v, block_k, num_warps, num_stages: the chunk-parallel kernels' value-tile loop
        (default 128 at K <= 128, 64 above), key tile (of the key-tiled gradient kernel), warps and
        stages;
      split_output: the forward sweep writes the per-chunk states and a chunk-parallel kernel forms O,
        instead of forming O inside the sweep.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    tiling = make_tiling(B=B, T=T, H=H, HV=HV, K=K, V=V, chunk_size=chunk_size, scale=scale,
                         has_docs=reset is not None, **launch)
    N, C, Kp, Vp = tiling.N, tiling.C, tiling.K, tiling.V
    chunked = lambda x: x.reshape(B, N, C, *x.shape[2:])
    q_, k_ = (chunked(_pad_last(x, Kp)) for x in (q, k))
    v_ = chunked(_pad_last(v, Vp))
    g_, beta_ = (chunked(x.astype(jnp.float32)) for x in (g, beta))
    S0 = _pad_last(jnp.pad(initial_state, [(0, 0), (0, 0), (0, Kp - K), (0, 0)]), Vp)
    docs = () if reset is None else document_masks(reset, N, C)
    o, S = _chunked(q_, k_, v_, g_, beta_, S0, docs, tiling)
    return o.reshape(B, T, HV, Vp)[..., :V], S[:, :, :K, :V]
