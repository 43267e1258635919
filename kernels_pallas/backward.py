"""Backward kernels: the reverse pass across chunks, then all input gradients chunk by chunk.

  reverse_sweep  grid (B*HV, V / BV), chunks walked from last to first with the state cotangent
                 dS (= dL/dS leaving the chunk), per value tile:
                 dVnew = (Q K^T * Gamma)^T dO + (d_out * K) dS
                 dS   <- d_chunk dS + (d_in * Q)^T dO - W^T dVnew
                 writes dS per chunk, dVnew, and finally d(initial_state).
  chunk_grads    grid (N, B*HV): with the chunk's entering state S, its dS, Vnew and dVnew, every
                 gradient is chunk-local. T = (I + A)^-1 and the decays are recomputed (cheaper than
                 storing them). The WY chain rule, with R = beta*V - (beta*d_in*K) S so that Vnew = T R:
                   dT = dVnew R^T,   dA = -T^T dT T^T (strict lower part),
                 then dA, dGamma and the decays give dK, dbeta and dG, and dg is the reverse cumsum of dG.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas.backend import mm
from kernels_pallas.chunk_math import (chunk_decays, gate_grad_from_pairs, reverse_cumsum,
                                       unit_lower_inverse)
from kernels_pallas.forward import load_docs
from kernels_pallas.layout import Tiling


def reverse_sweep(q, k, w, g, docs, do, dS_final, tiling: Tiling, mm_dtype):
    """Returns (dS leaving each chunk [B,HV,N,K,V] f32, dVnew [B,N,C,HV,V] f32, d initial state)."""
    t = tiling
    C, K, V, BV = t.C, t.K, t.V, t.BV

    def kernel(*refs):
        q_ref, k_ref, w_ref, g_ref = refs[:4]
        doc_refs = refs[4:4 + len(docs)]
        do_ref, dsT_ref, ds_out_ref, dvn_ref, ds0_ref = refs[4 + len(docs):]
        b, hv, h = t.heads(pl.program_id(0))
        vs = pl.ds(pl.program_id(1) * BV, BV)

        def chunk(i, dS):
            n = t.N - 1 - i  # Triton lowers only forward loops, so walk backwards by index
            q_c = q_ref[b, n, :, h, :].astype(jnp.float32) * t.scale
            k_c = k_ref[b, n, :, h, :].astype(jnp.float32)
            dec = chunk_decays(g_ref[b, n, :, hv], *load_docs(doc_refs, b, n))
            do_c = do_ref[b, n, :, hv, vs].astype(jnp.float32)
            qk = mm(q_c, k_c, tb=True, dtype=mm_dtype) * dec.gamma
            dvn = mm(qk, do_c, ta=True, dtype=mm_dtype) + mm(k_c * dec.d_out[:, None], dS, dtype=mm_dtype)
            ds_out_ref[b, hv, n, :, vs] = dS
            dvn_ref[b, n, :, hv, vs] = dvn
            return (dec.d_chunk * dS + mm(q_c * dec.d_in[:, None], do_c, ta=True, dtype=mm_dtype)
                    - mm(w_ref[b, n, :, hv, :], dvn, ta=True, dtype=mm_dtype))

        ds0_ref[b, hv, :, vs] = jax.lax.fori_loop(0, t.N, chunk, dsT_ref[b, hv, :, vs])

    whole = backend.WHOLE
    return backend.call(
        kernel, grid=t.sequential_grid,
        in_specs=[whole] * (6 + len(docs)), out_specs=[whole] * 3,
        out_shape=[jax.ShapeDtypeStruct((t.B, t.HV, t.N, K, V), jnp.float32),
                   jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, V), jnp.float32),
                   jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)],
        num_warps=t.num_warps, num_stages=t.num_stages, name="gdn_reverse_sweep",
    )(q, k, w, g, *docs, do, dS_final)


def chunk_grads(q, k, v, g, beta, docs, states_in, dstates_out, do, vnew, dvnew, tiling: Tiling, mm_dtype):
    """Returns dq, dk per value head [B,N,C,HV,K] f32, dv [B,N,C,HV,V] f32, dg and dbeta [B,N,C,HV] f32."""
    t = tiling
    C, K, V, BV = t.C, t.K, t.V, t.BV

    def kernel(*refs):
        q_ref, k_ref, v_ref, g_ref, beta_ref = refs[:5]
        doc_refs = refs[5:5 + len(docs)]
        (s_ref, dso_ref, do_ref, vn_ref, dvn_ref,
         dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref) = refs[5 + len(docs):]
        f32 = jnp.float32
        q_c = q_ref[...].astype(f32) * t.scale
        k_c = k_ref[...].astype(f32)
        beta_c = beta_ref[...]
        dec = chunk_decays(g_ref[...], *load_docs(doc_refs))
        kk = mm(k_c, k_c, tb=True, dtype=mm_dtype)
        T = unit_lower_inverse(jnp.where(dec.strict, beta_c[:, None] * kk * dec.gamma, 0.0))
        kbg = k_c * (beta_c * dec.d_in)[:, None]

        dq_raw = jnp.zeros((C, K), f32)   # dO S^T
        dk_out = jnp.zeros((C, K), f32)   # Vnew dS^T: gradient of (d_out * K)
        dW = jnp.zeros((C, K), f32)       # -dVnew S^T
        do_vn = jnp.zeros((C, C), f32)    # dO Vnew^T
        dT = jnp.zeros((C, C), f32)
        dbeta = jnp.zeros((C,), f32)
        s_ds = jnp.zeros((), f32)         # <S, dS>, for the chunk decay
        for j in range(V // BV):
            vs = pl.ds(j * BV, BV)
            S, dS = s_ref[:, vs], dso_ref[:, vs]
            do_c, vn, dvn = do_ref[:, vs].astype(f32), vn_ref[:, vs], dvn_ref[:, vs]
            v_c = v_ref[:, vs].astype(f32)
            dq_raw += mm(do_c, S, tb=True, dtype=mm_dtype)
            dk_out += mm(vn, dS, tb=True, dtype=mm_dtype)
            dW -= mm(dvn, S, tb=True, dtype=mm_dtype)
            do_vn += mm(do_c, vn, tb=True, dtype=mm_dtype)
            dT += mm(dvn, v_c * beta_c[:, None], tb=True, dtype=mm_dtype)
            t_dvn = mm(T, dvn, ta=True, dtype=mm_dtype)              # T^T dVnew = d(beta V)
            dv_ref[:, vs] = t_dvn * beta_c[:, None]
            dbeta += jnp.sum(t_dvn * v_c, axis=1)
            s_ds += jnp.sum(S * dS)

        dT += mm(dW, kbg, tb=True, dtype=mm_dtype)
        dkbg = mm(T, dW, ta=True, dtype=mm_dtype)                    # T^T dW = d(beta d_in K)
        dA = -mm(mm(T, dT, ta=True, dtype=mm_dtype), T, tb=True, dtype=mm_dtype)
        dA = jnp.where(dec.strict, dA, 0.0)
        qk = mm(q_c, k_c, tb=True, dtype=mm_dtype)
        d_qk = do_vn * dec.gamma                                     # gradient of Q K^T, masked
        z_a = dA * kk * dec.gamma                                    # dA * dA/dbeta_r
        kbg_dot = jnp.sum(dkbg * k_c, axis=1)
        dbeta += jnp.sum(z_a, axis=1) + dec.d_in * kbg_dot

        x_out = dec.d_out * jnp.sum(k_c * dk_out, axis=1)
        dG = (gate_grad_from_pairs(qk * d_qk) + gate_grad_from_pairs(z_a * beta_c[:, None])
              + dec.d_in * jnp.sum(q_c * dq_raw, axis=1)
              + beta_c * dec.d_in * kbg_dot - x_out
              + jnp.where(dec.is_last, jnp.sum(x_out) + dec.d_chunk * s_ds, 0.0))
        dg_ref[...] = reverse_cumsum(dG)
        dbeta_ref[...] = dbeta

        dq_ref[...] = (dq_raw * dec.d_in[:, None] + mm(d_qk, k_c, dtype=mm_dtype)) * t.scale
        Y = dA * dec.gamma * beta_c[:, None]                         # gradient of K K^T through A
        dk_ref[...] = (mm(d_qk, q_c, ta=True, dtype=mm_dtype) + dk_out * dec.d_out[:, None]
                       + dkbg * (beta_c * dec.d_in)[:, None]
                       + mm(Y, k_c, dtype=mm_dtype) + mm(Y, k_c, ta=True, dtype=mm_dtype))

    f32 = jnp.float32
    gate = jax.ShapeDtypeStruct((t.B, t.N, C, t.HV), f32)
    return backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.qk_spec(), t.head_spec(V), t.gate_spec(), t.gate_spec(),
                  *[t.doc_spec()] * len(docs), t.state_spec(), t.state_spec(),
                  t.head_spec(V), t.head_spec(V), t.head_spec(V)],
        out_specs=[t.head_spec(K), t.head_spec(K), t.head_spec(V), t.gate_spec(), t.gate_spec()],
        out_shape=[jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, K), f32),
                   jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, K), f32),
                   jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, V), f32), gate, gate],
        num_warps=t.num_warps, num_stages=t.num_stages, name="gdn_chunk_grads",
    )(q, k, v, g, beta, *docs, states_in, dstates_out, do, vnew, dvnew)
