"""The key-level gradients (`backward.key_grads`) as one Mosaic GPU program per chunk and value head.

With S the state entering the chunk and dS its cotangent leaving it ([K, V], the sweeps' residuals),
d_qk and Y the [C, C] gradients from `pair_grads`, and t_dvn = T^T dVnew:

  dq     = scale ((d_in * dO) S^T + d_qk K)
  dk     = scale d_qk^T Q + (d_out * Vnew) dS^T - (beta d_in * t_dvn) S^T + Y K + Y^T K
  dbeta  = -d_in * rowsum(t_dvn * (K S))
  dG     = scale d_in * rowsum(dO * (Q S)) + beta dbeta - x_out + [last row](sum(x_out) + d_chunk <S, dS>)
           with x_out = d_out * rowsum(Vnew * (K dS))

Every row scaling is folded into an operand before its product, so each of dq and dk is one
accumulator fed by several wgmmas; the row sums use rowsum(A B^T * C) = rowsum(A * (C B)), which
turns the [C, K] partial products the Triton kernel keeps apart into [C, V] products of the same
tiles. The whole chunk fits shared memory for K, V <= 128 (the shapes where the Mosaic sweeps run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.layout import Tiling
from kernels_pallas.mosaic_common import (ChunkDecays, chunk_program_ids, flat, gate_rows, gate_srcs,
                                          launch, mms, plgpu, tile,
                                          unsupported_reason as _sweeps_unsupported)


def unsupported_reason(*, C, K, V, dtype) -> str | None:
    reason = _sweeps_unsupported(C=C, K=K, V=V, BV=64, dtype=dtype)
    if reason is None and (K > 128 or V > 128):
        reason = f"the Mosaic key gradients hold a whole chunk in shared memory: K, V <= 128 (got {K}, {V})"
    return reason


def key_grads(q, k, g, beta, docs, d_qk, Y, states_in, dstates_out, do, vnew, t_dvnew, t: Tiling,
              mm_dtype):
    """Same arguments and results as `backward.key_grads` (one key tile: the partial-sum axis is 1)."""
    C, K, V, N = t.C, t.K, t.V, t.N
    dt = jnp.dtype(mm_dtype)
    out_dt = dt if t.group == 1 else jnp.dtype(jnp.float32)
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None

    def body(*refs):
        (q_ref, k_ref, dqk_ref, y_ref, s_ref, ds_ref, do_ref, vn_ref, tdvn_ref, G_ref, beta_ref) = refs[:11]
        rel_ref = refs[11] if has_docs else None
        dq_ref, dk_ref, dG_ref, dbeta_ref = refs[11 + has_docs:15 + has_docs]
        (q_s, k_s, dqk_s, y_s, s_s, ds_s, do_s, vn_s, tdvn_s, *gates), (out_s, dG_s, dbeta_s, bar) = \
            refs[15 + has_docs:-4], refs[-4:]
        n, b, hv, h, rows = chunk_program_ids(t)
        srcs = [q_ref.at[b, rows, h, :], k_ref.at[b, rows, h, :], dqk_ref.at[b, rows, hv, :],
                y_ref.at[b, rows, hv, :], s_ref.at[b, n, hv], ds_ref.at[b, n, hv],
                do_ref.at[b, rows, hv, :], vn_ref.at[b, rows, hv, :], tdvn_ref.at[b, rows, hv, :],
                *[src.at[rows] for src in gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]]
        dsts = [q_s, k_s, dqk_s, y_s, s_s, ds_s, do_s, vn_s, tdvn_s, *gates]
        for src, dst in zip(srcs, dsts):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        plgpu.barrier_wait(bar)
        ch = ChunkDecays(gates)
        dG, dbeta = key_part(t, ch, gates, q_s, k_s, dqk_s, y_s, s_s, ds_s, do_s, vn_s, tdvn_s, out_s,
                             dq_ref.at[b, rows, hv, :], dk_ref.at[b, rows, hv, :], dt, out_dt)
        dG_s[...] = dG
        dbeta_s[...] = dbeta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dG_s, dG_ref.at[b, hv, rows])
        plgpu.copy_smem_to_gmem(dbeta_s, dbeta_ref.at[b, hv, rows])
        plgpu.wait_smem_to_gmem(0)

    tiles = [tile((C, K), dt), tile((C, K), dt), tile((C, C), dt), tile((C, C), dt),
             tile((K, V), dt), tile((K, V), dt), tile((C, V), dt), tile((C, V), dt), tile((C, V), dt)]
    tiles += [plgpu.SMEM((C,), jnp.float32)] * (3 + 2 * has_docs)
    n_copies = len(tiles)
    scratch = tiles + [tile((C, K), out_dt), plgpu.SMEM((C,), jnp.float32), plgpu.SMEM((C,), jnp.float32),
                       plgpu.Barrier(num_arrivals=n_copies)]
    gates_out = jax.ShapeDtypeStruct((t.B, t.HV, N * C), jnp.float32)
    per_key = jax.ShapeDtypeStruct((t.B, N * C, t.HV, K), out_dt)
    args = [flat(q), flat(k), flat(d_qk), flat(Y), states_in, dstates_out, flat(do.astype(dt)),
            flat(vnew), flat(t_dvnew), G, beta_rows] + ([rel] if has_docs else [])
    dq, dk, dG, dbeta = plgpu.kernel(
        body, out_type=[per_key, per_key, gates_out, gates_out], scratch_types=scratch,
        grid=(N, t.B * t.HV), grid_names=("n", "bh"), kernel_name="gdn_mosaic_key_grads", **launch(t),
    )(*args)
    chunked = lambda x: x.reshape(t.B, N, C, *x.shape[2:])
    rows_back = lambda x: jnp.moveaxis(x, 1, 2).reshape(t.B, N, C, t.HV, 1)
    return chunked(dq), chunked(dk), rows_back(dG), rows_back(dbeta)


def key_part(t: Tiling, ch, gates, q_s, k_s, dqk_s, y_s, s_s, ds_s, do_s, vn_s, tdvn_s, out_s, dq_dst,
             dk_dst, dt, out_dt):
    """The key gradients of one chunk from its tiles in shared memory (do_s, vn_s and tdvn_s are
    rewritten in place): dq and dk stored to dq_dst, dk_dst through out_s; returns this part's dG
    and dbeta per row. Shared by `key_grads` and the fused mosaic_chunk_grads."""
    C, K, V = t.C, t.K, t.V
    WGMMA = plgpu.Layout.WGMMA
    ROW = WGMMA.reduce(1)
    row = ch.row

    # dq, and the row sum of dO * (Q S) for dG
    do_c = plgpu.load(do_s, layout=WGMMA).astype(jnp.float32)
    (QS,) = mms(((C, V), [(q_s, s_s)]))
    r_q = jnp.sum(do_c * QS, axis=1)
    do_s[...] = (row(ch.d_in, V) * do_c).astype(dt)
    plgpu.commit_smem()
    (acc_dq,) = mms(((C, K), [(do_s, s_s.T), (dqk_s, k_s)]))
    out_s[...] = (acc_dq * t.scale).astype(out_dt)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, dq_dst)

    # the row sums through K S and K dS
    tdvn_c = plgpu.load(tdvn_s, layout=WGMMA).astype(jnp.float32)
    vn_c = plgpu.load(vn_s, layout=WGMMA).astype(jnp.float32)
    (KS,) = mms(((C, V), [(k_s, s_s)]))
    kbg_dot = -ch.d_in * jnp.sum(tdvn_c * KS, axis=1)
    (KdS,) = mms(((C, V), [(k_s, ds_s)]))
    x_out = ch.d_out * jnp.sum(vn_c * KdS, axis=1)

    # dk: the row scalings go on the [C, V] operands, so one accumulator takes four products
    vn_s[...] = (row(ch.d_out, V) * vn_c).astype(dt)
    tdvn_s[...] = (-(ch.beta(V) * row(ch.d_in, V)) * tdvn_c).astype(dt)
    plgpu.commit_smem()
    acc_dk, acc_qt = mms(((C, K), [(vn_s, ds_s.T), (tdvn_s, s_s.T), (y_s, k_s), (y_s.T, k_s)]),
                          ((C, K), [(dqk_s.T, q_s)]))
    plgpu.wait_smem_to_gmem(0)  # dq has left out_s
    out_s[...] = (acc_dk + t.scale * acc_qt).astype(out_dt)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, dk_dst)

    # dG and dbeta (this kernel's terms; pair_grads adds the rest)
    S_c = plgpu.load(s_s, layout=WGMMA).astype(jnp.float32)
    dS_c = plgpu.load(ds_s, layout=WGMMA).astype(jnp.float32)
    # Summed by rows, then over them: reshaping [K, V] to one axis defeats Mosaic's layout inference.
    s_ds = jnp.sum(jnp.sum(S_c * dS_c, axis=1))
    beta_row = plgpu.load(gates[2], layout=ROW)
    last = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROW) == C - 1
    dG = (t.scale * ch.d_in * r_q + beta_row * kbg_dot - x_out
          + jnp.where(last, jnp.sum(x_out) + ch.d_chunk * s_ds, 0.0))
    plgpu.wait_smem_to_gmem(0)  # dk has left out_s
    return dG, kbg_dot
