"""The chunk-parallel half of the backward as one Mosaic GPU program per chunk and value head:
`backward.pair_grads` and the key gradients (`mosaic_grads.key_grads`) fused, so T^T dVnew, the [C, C]
gradients d_qk and Y, and the re-reads of q, k, dO and Vnew never pass through global memory.

Per chunk, with the notation of kernels_pallas/chunk_math.py (A, T = (I + A)^-1, Gamma, decays) and
q already scaled:

  pair part   dT    = (dVnew Vnew^T)(I + A)^T            dA = -T^T dT T^T   (strict lower part used)
              t_dvn = T^T dVnew                            (= d(beta V); dv = beta t_dvn)
              d_qk  = (dO Vnew^T) * Gamma                 Y  = strict(dA * Gamma) * beta_r
              Z     = (Q K^T) * d_qk + strict(dA * K K^T * Gamma) * beta_r
              dG   += rowsum(Z) - colsum(Z)               dbeta += rowsum(t_dvn * V) + rowsum(strict(dA * K K^T * Gamma))
  key part    dq, dk and their dG, dbeta terms, as in mosaic_grads (from d_qk, Y, t_dvn held in shared memory).

colsum(Z) comes out in the per-row register layout from one more product: R = 1 Z has every row
equal to colsum(Z), so colsum_r = R_rr. Z enters it split as bf16(Z) + bf16(Z - bf16(Z)), two
products into one float32 accumulator, so the sum keeps about 16 bits of each entry (Hopper's
tensor cores take float32 operands only as tf32 and only untransposed).

Shared memory at K = V = 128 (bf16): the nine input tiles (168 KB), d_qk and Y (16 KB), and either
the pair part's three [C, C] work tiles (24 KB, scoped) or the key part's output tile (16 or 32 KB).
S and dS arrive on their own barrier, waited for only before the key part, so the pair part's
products overlap their 64 KB of loads (one program per SM: nothing else hides them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.layout import Tiling
from kernels_pallas.mosaic_common import (ChunkDecays, chunk_program_ids, flat, gate_rows, gate_srcs,
                                          launch, mms, plgpu, tile)
from kernels_pallas.mosaic_grads import key_part


def chunk_grads(q, k, v, g, beta, docs, T, do, vnew, dvnew, states_in, dstates_out, t: Tiling, mm_dtype):
    """Returns (t_dvn [B, N, C, HV, V] in mm_dtype, dq, dk [B, N, C, HV, K] per value head, dG, dbeta
    [B, N, C, HV] float32), the same as pair_grads followed by a key-gradient kernel."""
    C, K, V, N = t.C, t.K, t.V, t.N
    dt = jnp.dtype(mm_dtype)
    out_dt = dt if t.group == 1 else jnp.dtype(jnp.float32)
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    WGMMA = plgpu.Layout.WGMMA
    n_in = 11 + has_docs

    def body(*refs):
        (q_ref, k_ref, v_ref, T_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref, G_ref, beta_ref) = refs[:11]
        rel_ref = refs[11] if has_docs else None
        tdvn_ref, dq_ref, dk_ref, dG_ref, dbeta_ref = refs[n_in:n_in + 5]
        scratch = refs[n_in + 5:]
        (q_s, k_s, v_s, T_s, do_s, vn_s, dvn_s, s_s, ds_s, *gates) = scratch[:-6]
        dqk_s, y_s, dG_s, dbeta_s, bar, bar_states = scratch[-6:]
        n, b, hv, h, rows = chunk_program_ids(t)
        srcs = [q_ref.at[b, rows, h, :], k_ref.at[b, rows, h, :], v_ref.at[b, rows, hv, :],
                T_ref.at[b, rows, hv, :], do_ref.at[b, rows, hv, :], vn_ref.at[b, rows, hv, :],
                dvn_ref.at[b, rows, hv, :], *[src.at[rows] for src in gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]]
        dsts = [q_s, k_s, v_s, T_s, do_s, vn_s, dvn_s, *gates]
        for src, dst in zip(srcs, dsts):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        # S and dS (64 KB at K = V = 128) are needed only by the key part: issued last, on their own
        # barrier, so the pair part starts while they arrive.
        plgpu.copy_gmem_to_smem(s_ref.at[b, n, hv], s_s, bar_states)
        plgpu.copy_gmem_to_smem(ds_ref.at[b, n, hv], ds_s, bar_states)
        plgpu.barrier_wait(bar)
        ch = ChunkDecays(gates)

        def pair_part(w1, w2, w3):
            """The pair gradients; leaves d_qk, Y in shared memory and T^T dVnew in dvn_s, and
            returns this part's dG and dbeta (per-row vectors). w1..w3: [C, C] work tiles, each
            rewritten only after the product that read it has completed."""
            r_i = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=WGMMA)
            c_i = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=WGMMA)
            eye = r_i == c_i
            strict = ch.lower & (c_i < r_i)
            gamma = ch.gamma()
            beta_cc = ch.beta(C)
            do_vn, dvn_vn, kk, qk = mms(((C, C), [(do_s, vn_s.T)]), ((C, C), [(dvn_s, vn_s.T)]),
                                        ((C, C), [(k_s, k_s.T)]), ((C, C), [(q_s, k_s.T)]))
            (t_dvn,) = mms(((C, V), [(T_s.T, dvn_s)]))
            v_c = plgpu.load(v_s, layout=WGMMA).astype(jnp.float32)
            dbeta = jnp.sum(t_dvn * v_c, axis=1)
            # dVnew is read for the last time above: its tile now holds T^T dVnew, for the output
            # and the key part.
            dvn_s[...] = t_dvn.astype(dt)
            w1[...] = dvn_vn.astype(dt)
            w2[...] = (jnp.where(eye, 1.0, 0.0) + jnp.where(strict, beta_cc * kk * gamma, 0.0)).astype(dt)
            w3[...] = jnp.where(eye | (r_i != c_i), 1.0, 0.0).astype(dt)  # ones
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dvn_s, tdvn_ref.at[b, rows, hv, :])
            (dT,) = mms(((C, C), [(w1, w2.T)]))                  # dT = (dVnew Vnew^T)(I + A)^T
            w2[...] = dT.astype(dt)
            plgpu.commit_smem()
            (x,) = mms(((C, C), [(T_s.T, w2)]))                  # T^T dT
            w1[...] = x.astype(dt)
            plgpu.commit_smem()
            (neg_dA,) = mms(((C, C), [(w1, T_s.T)]))             # T^T dT T^T = -dA
            dA_g = jnp.where(strict, -neg_dA * gamma, 0.0)
            z_a = dA_g * kk
            d_qk = do_vn * gamma
            dqk_s[...] = d_qk.astype(dt)
            y_s[...] = (dA_g * beta_cc).astype(dt)
            # Z's diagonal adds equally to its row and column sums, so it leaves dG exactly: dropping
            # it keeps the large diagonal terms out of the split-bf16 column sum, whose rounding would
            # not cancel (a decay of e^-30 left dG at 1e-5 instead of 1e-12).
            z = jnp.where(c_i < r_i, qk * t.scale * d_qk + z_a * beta_cc, 0.0)
            z_hi = z.astype(dt)
            w1[...] = z_hi
            w2[...] = (z - z_hi.astype(jnp.float32)).astype(dt)
            plgpu.commit_smem()
            (col,) = mms(((C, C), [(w3, w1), (w3, w2)]))         # every row: colsum(z)
            colsum = jnp.sum(jnp.where(eye, col, 0.0), axis=1)
            return jnp.sum(z, axis=1) - colsum, dbeta + jnp.sum(z_a, axis=1)

        dG_pair, dbeta_pair = pl.run_scoped(pair_part, *[tile((C, C), dt)] * 3)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # T^T dVnew has left dvn_s
        plgpu.barrier_wait(bar_states)

        def key_scope(out_s):
            return key_part(t, ch, gates, q_s, k_s, dqk_s, y_s, s_s, ds_s, do_s, vn_s, dvn_s, out_s,
                            dq_ref.at[b, rows, hv, :], dk_ref.at[b, rows, hv, :], dt, out_dt)

        dG_key, dbeta_key = pl.run_scoped(key_scope, tile((C, K), out_dt))
        dG_s[...] = dG_pair + dG_key
        dbeta_s[...] = dbeta_pair + dbeta_key
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dG_s, dG_ref.at[b, hv, rows])
        plgpu.copy_smem_to_gmem(dbeta_s, dbeta_ref.at[b, hv, rows])
        plgpu.wait_smem_to_gmem(0)

    tiles = [tile((C, K), dt), tile((C, K), dt), tile((C, V), dt), tile((C, C), dt), tile((C, V), dt),
             tile((C, V), dt), tile((C, V), dt), tile((K, V), dt), tile((K, V), dt)]
    tiles += [plgpu.SMEM((C,), jnp.float32)] * (3 + 2 * has_docs)
    scratch = tiles + [tile((C, C), dt), tile((C, C), dt), plgpu.SMEM((C,), jnp.float32),
                       plgpu.SMEM((C,), jnp.float32), plgpu.Barrier(num_arrivals=len(tiles) - 2),
                       plgpu.Barrier(num_arrivals=2)]
    rows_out = jax.ShapeDtypeStruct((t.B, t.HV, N * C), jnp.float32)
    per_key = jax.ShapeDtypeStruct((t.B, N * C, t.HV, K), out_dt)
    tdvn = jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), dt)
    args = [flat(q), flat(k), flat(v.astype(dt)), flat(T), flat(do.astype(dt)), flat(vnew),
            flat(dvnew), states_in, dstates_out, G, beta_rows] + ([rel] if has_docs else [])
    t_dvn, dq, dk, dG, dbeta = plgpu.kernel(
        body, out_type=[tdvn, per_key, per_key, rows_out, rows_out], scratch_types=scratch,
        grid=(N, t.B * t.HV), grid_names=("n", "bh"), kernel_name="gdn_mosaic_chunk_grads", **launch(t),
    )(*args)
    chunked = lambda x: x.reshape(t.B, N, C, *x.shape[2:])
    rows_back = lambda x: jnp.moveaxis(x, 1, 2).reshape(t.B, N, C, t.HV)
    return chunked(t_dvn), chunked(dq), chunked(dk), rows_back(dG), rows_back(dbeta)
