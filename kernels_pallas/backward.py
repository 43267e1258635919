"""Backward kernels: the reverse pass across chunks, then all input gradients chunk by chunk.

  local_dvnew    grid (N, B*HV): the chunk-local part (Q K^T * Gamma)^T dO of dVnew.
  reverse_sweep  grid (B*HV, V / BV), chunks walked from last to first with the state cotangent
                 dS (= dL/dS leaving the chunk), per value tile:
                 dVnew = (Q K^T * Gamma)^T dO + (d_out * K) dS
                 dS   <- d_chunk dS + (d_in * Q)^T dO - W^T dVnew
                 writes dS per chunk [B,N,HV,K,V], dVnew, and finally d(initial_state).
  pair_grads     grid (N, B*HV): with the chunk's Vnew and dVnew, the [C, C]-level gradients. The WY
                 chain rule, with R = beta*V - (beta*d_in*K) S = (I + A) Vnew so that Vnew = T R:
                   dT = dVnew R^T,   dA = -T^T dT T^T (strict lower part),   dv = beta T^T dVnew.
  key_grads      grid (N, B*HV, K/BK): with the chunk's entering state S and its dS, dq and dk for one
                 key tile, plus partial sums of the gate terms that contract over K.
  Each chunk's dG (gradient of its cumulative log-decay) is the sum of both halves' terms; dg is its
  reverse cumsum within the chunk. T comes from the backward's run of `prepare`; the decays are
  recomputed in every kernel (a few exps per element, cheaper than storing them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas.backend import mm
from kernels_pallas.chunk_math import chunk_decays, decayed_qk, gate_grad_from_pairs
from kernels_pallas.forward import load_docs
from kernels_pallas.layout import Tiling, traced_zero


def local_dvnew(q, k, g, docs, do, tiling: Tiling, mm_dtype):
    """The part of dVnew that does not depend on later chunks, all chunks at once, grid (N, B*HV):
    (scale * Q K^T * Gamma)^T dO  [B,N,C,HV,V] in mm_dtype. Taking it out of `reverse_sweep` forms
    Q K^T once per chunk instead of once per value tile, and shortens the sequential loop."""
    t = tiling
    V, BV = t.V, t.BVI

    def kernel(*refs):
        q_ref, k_ref, g_ref = refs[:3]
        doc_refs = refs[3:3 + len(docs)]
        do_ref, out_ref = refs[3 + len(docs):]
        dec = chunk_decays(g_ref[...], *load_docs(doc_refs))
        whole = (slice(None),)
        qk = decayed_qk(t.load_keys(q_ref, whole), t.load_keys(k_ref, whole), dec, t.scale, mm_dtype)
        for j in range(V // BV):
            do_c = t.load_values(do_ref, whole, j * BV, BV)
            out_ref[:, pl.ds(j * BV, BV)] = mm(qk, do_c, ta=True, dtype=mm_dtype).astype(out_ref.dtype)

    return backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.qk_spec(), t.gate_spec(), *[t.doc_spec()] * len(docs), t.value_spec()],
        out_specs=t.head_spec(V),
        out_shape=jax.ShapeDtypeStruct((t.B, t.N, t.C, t.HV, V), mm_dtype),
        **t.chunk_launch, name="gdn_local_dvnew",
    )(q, k, g, *docs, do)


def reverse_sweep(q, k, w, g, docs, do, dvn_local, dS_final, tiling: Tiling, mm_dtype, *, mode="full"):
    """mode "full": returns (dS leaving each chunk [B,N,HV,K,V], dVnew [B,N,C,HV,V], both in mm_dtype,
    and the float32 gradient of the initial state); mode "final": that gradient only (context
    parallelism's first pass). dvn_local comes from `local_dvnew`."""
    t = tiling
    C, K, V, BV = t.C, t.K, t.V, t.BV
    full = mode == "full"

    def kernel(*refs):
        q_ref, k_ref, w_ref, g_ref = refs[:4]
        doc_refs = refs[4:4 + len(docs)]
        do_ref, loc_ref, dsT_ref = refs[4 + len(docs):7 + len(docs)]
        ds_out_ref, dvn_ref, ds0_ref = refs[7 + len(docs):] if full else (None, None, refs[-1])
        b, hv, h = t.heads(pl.program_id(0))
        v0 = pl.program_id(1) * BV
        vs = pl.ds(v0, BV)
        k0 = traced_zero()

        # As in the forward sweep, q, k and w stay in their own dtype and the per-position scalings
        # go on the [C, BV] side of each product.
        def chunk(i, dS):
            n = t.N - 1 - i  # Triton lowers only forward loops, so walk backwards by index
            dec = chunk_decays(g_ref[b, n, :, hv], *load_docs(doc_refs, b, n))
            rows = (b, n, slice(None), h)
            do_c = t.load_values(do_ref, (b, n, slice(None), hv), v0, BV).astype(jnp.float32)
            dvn = (loc_ref[b, n, :, hv, vs].astype(jnp.float32)
                   + dec.d_out[:, None] * mm(t.load_keys(k_ref, rows, k0), dS, dtype=mm_dtype))
            if full:
                ds_out_ref[b, n, hv, :, vs] = dS.astype(ds_out_ref.dtype)
                dvn_ref[b, n, :, hv, vs] = dvn.astype(dvn_ref.dtype)
            return (dec.d_chunk * dS
                    + mm(t.load_keys(q_ref, rows, k0), do_c * (dec.d_in * t.scale)[:, None], ta=True,
                         dtype=mm_dtype)
                    - mm(w_ref[b, n, :, hv, :], dvn, ta=True, dtype=mm_dtype))

        ds0_ref[b, hv, :, vs] = jax.lax.fori_loop(0, t.N, chunk, dsT_ref[b, hv, :, vs])

    out_shape = [jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)]
    if full:
        out_shape = [jax.ShapeDtypeStruct((t.B, t.N, t.HV, K, V), mm_dtype),
                     jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, V), mm_dtype), *out_shape]
    whole = backend.WHOLE
    outs = backend.call(
        kernel, grid=t.sequential_grid,
        in_specs=[whole] * (7 + len(docs)), out_specs=[whole] * len(out_shape), out_shape=out_shape,
        **t.sweep_launch, name=f"gdn_reverse_sweep_{mode}",
    )(q, k, w, g, *docs, do, dvn_local, dS_final)
    return tuple(outs) if full else outs[0]


def over_value_tiles(t: Tiling, body, carry):
    """carry = body(start, carry) for the value tiles start = 0, BVI, 2 BVI, ... of V: unrolled
    (t.loop_stages == 1), or as a loop that Triton software-pipelines loop_stages deep, so the next
    tiles' loads are in flight while this one's products run."""
    if t.loop_stages == 1:
        for j in range(t.V // t.BVI):
            carry = body(j * t.BVI, carry)
        return carry
    return jax.lax.fori_loop(0, t.V // t.BVI, lambda j, c: body(j * t.BVI, c), carry)


def load_chunk(t: Tiling, q_ref, k_ref, beta_ref, g_ref, doc_refs, start=0, size=None):
    """What both gradient kernels read of one chunk: scaled q, k (float32; key columns start..
    start + size, default all), beta and the decays."""
    f32 = jnp.float32
    q_c, k_c = (t.load_keys(r, (slice(None),), start, size).astype(f32) for r in (q_ref, k_ref))
    return q_c * t.scale, k_c, beta_ref[...], chunk_decays(g_ref[...], *load_docs(doc_refs))


def pair_grads(q, k, v, g, beta, docs, T, do, vnew, dvnew, tiling: Tiling, mm_dtype):
    """The [C, C]-level half of the chunk gradients, grid (N, B*HV), value tiles in an inner loop.

    With R = (I + A) Vnew (so that Vnew = T R): dT = dVnew R^T = (dVnew Vnew^T)(I + A)^T and
    dA = -T^T dT T^T on the strict lower triangle. Writes T^T dVnew (= d(beta V), in mm_dtype; dv is it times beta), the masked gradients of
    Q K^T (d_qk) and of K K^T through A (Y), and this half's terms of dG and dbeta.
    """
    t = tiling
    C, V, BV = t.C, t.V, t.BVI

    def kernel(*refs):
        q_ref, k_ref, v_ref, g_ref, beta_ref = refs[:5]
        doc_refs = refs[5:5 + len(docs)]
        T_ref, do_ref, vn_ref, dvn_ref, tdvn_ref, dqk_ref, y_ref, dG_ref, dbeta_ref = refs[5 + len(docs):]
        f32 = jnp.float32
        q_c, k_c, beta_c, dec = load_chunk(t, q_ref, k_ref, beta_ref, g_ref, doc_refs)
        T = T_ref[...]
        def tile(v0, acc):
            do_vn, dvn_vn, dbeta = acc  # dO Vnew^T, dVnew Vnew^T, the dbeta terms through V
            vs = pl.ds(v0, BV)
            vn, dvn = vn_ref[:, vs], dvn_ref[:, vs]  # matmul operands only
            do_c = t.load_values(do_ref, (slice(None),), v0, BV)
            t_dvn = mm(T, dvn, ta=True, dtype=mm_dtype)              # T^T dVnew = d(beta V)
            tdvn_ref[:, vs] = t_dvn.astype(tdvn_ref.dtype)
            return (do_vn + mm(do_c, vn, tb=True, dtype=mm_dtype),
                    dvn_vn + mm(dvn, vn, tb=True, dtype=mm_dtype),
                    dbeta + jnp.sum(t_dvn * t.load_values(v_ref, (slice(None),), v0, BV).astype(f32), axis=1))

        do_vn, dvn_vn, dbeta = over_value_tiles(
            t, tile, (jnp.zeros((C, C), f32), jnp.zeros((C, C), f32), jnp.zeros((C,), f32)))

        kk = mm(k_c, k_c, tb=True, dtype=mm_dtype)
        A = jnp.where(dec.strict, beta_c[:, None] * kk * dec.gamma, 0.0)
        eye = (jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
               == jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)).astype(f32)
        dT = mm(dvn_vn, eye + A, tb=True, dtype=mm_dtype)
        dA = -mm(mm(T, dT, ta=True, dtype=mm_dtype), T, tb=True, dtype=mm_dtype)
        z_a = jnp.where(dec.strict, dA * kk * dec.gamma, 0.0)       # dA * dA/dbeta_r
        d_qk = do_vn * dec.gamma                                     # gradient of Q K^T, masked
        qk = mm(q_c, k_c, tb=True, dtype=mm_dtype)
        dqk_ref[...] = d_qk.astype(dqk_ref.dtype)
        y_ref[...] = (jnp.where(dec.strict, dA * dec.gamma, 0.0) * beta_c[:, None]).astype(y_ref.dtype)
        dG_ref[...] = gate_grad_from_pairs(qk * d_qk) + gate_grad_from_pairs(z_a * beta_c[:, None])
        dbeta_ref[...] = dbeta + jnp.sum(z_a, axis=1)

    f32 = jnp.float32
    gate = jax.ShapeDtypeStruct((t.B, t.N, C, t.HV), f32)
    # d_qk and Y are only matmul operands downstream, so they are stored in the matmul dtype.
    pair = jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, C), mm_dtype)
    return backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.qk_spec(), t.value_spec(), t.gate_spec(), t.gate_spec(),
                  *[t.doc_spec()] * len(docs), t.head_spec(C),
                  t.value_spec(), t.head_spec(V), t.head_spec(V)],
        out_specs=[t.head_spec(V), t.head_spec(C), t.head_spec(C), t.gate_spec(), t.gate_spec()],
        out_shape=[jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, V), mm_dtype), pair, pair, gate, gate],
        **t.loop_launch, name="gdn_pair_grads",
    )(q, k, v, g, beta, *docs, T, do, vnew, dvnew)


def key_grads(q, k, g, beta, docs, d_qk, Y, states_in, dstates_out, do, vnew, t_dvnew,
              tiling: Tiling, mm_dtype):
    """The [C, K]-level half, grid (K/BK, N, B*HV): dq and dk per value head for one key tile, and this
    tile's partial sums of the dG and dbeta terms that contract over K (summed outside).
    t_dvnew = T^T dVnew comes from `pair_grads`."""
    t = tiling
    C, V, BV, BK = t.C, t.V, t.BVI, t.BK

    def kernel(*refs):
        q_ref, k_ref, g_ref, beta_ref = refs[:4]
        doc_refs = refs[4:4 + len(docs)]
        (dqk_ref, y_ref, s_ref, dso_ref, do_ref, vn_ref, tdvn_ref,
         dq_ref, dk_ref, dG_ref, dbeta_ref) = refs[4 + len(docs):]
        f32 = jnp.float32
        k0 = pl.program_id(0) * BK
        q_c, k_c, beta_c, dec = load_chunk(t, q_ref, k_ref, beta_ref, g_ref, doc_refs, k0, BK)
        # dq_raw = dO S^T; dk_out = Vnew dS^T, the gradient of (d_out * K); dkbg = -(T^T dVnew) S^T,
        # the gradient of (beta * d_in * K); s_ds = <S, dS> over this key tile.
        def tile(v0, acc):
            dq_raw, dk_out, dkbg, s_ds = acc
            vs = pl.ds(v0, BV)
            S, dS = s_ref[:, vs], dso_ref[:, vs]  # stored in mm_dtype: operands, not converted
            return (dq_raw + mm(t.load_values(do_ref, (slice(None),), v0, BV), S, tb=True, dtype=mm_dtype),
                    dk_out + mm(vn_ref[:, vs], dS, tb=True, dtype=mm_dtype),
                    dkbg - mm(tdvn_ref[:, vs], S, tb=True, dtype=mm_dtype),
                    s_ds + jnp.sum(S.astype(f32) * dS.astype(f32)))

        zeros = jnp.zeros((C, BK), f32)
        dq_raw, dk_out, dkbg, s_ds = over_value_tiles(t, tile, (zeros, zeros, zeros, jnp.zeros((), f32)))

        d_qk, Y = dqk_ref[...], y_ref[...]
        whole = (slice(None),)
        dq = (dq_raw * dec.d_in[:, None] + mm(d_qk, k_c, dtype=mm_dtype)) * t.scale
        dk = (mm(d_qk, q_c, ta=True, dtype=mm_dtype) + dk_out * dec.d_out[:, None]
              + dkbg * (beta_c * dec.d_in)[:, None]
              + mm(Y, k_c, dtype=mm_dtype) + mm(Y, k_c, ta=True, dtype=mm_dtype))
        t.store_keys(dq_ref, whole, k0, BK, dq)
        t.store_keys(dk_ref, whole, k0, BK, dk)
        kbg_dot = dec.d_in * jnp.sum(dkbg * k_c, axis=1)
        x_out = dec.d_out * jnp.sum(k_c * dk_out, axis=1)
        dG_ref[...] = (dec.d_in * jnp.sum(q_c * dq_raw, axis=1) + beta_c * kbg_dot - x_out
                       + jnp.where(dec.is_last, jnp.sum(x_out) + dec.d_chunk * s_ds, 0.0))
        dbeta_ref[...] = kbg_dot

    f32 = jnp.float32
    # Without GVA dq and dk are final here, so they are written in the matmul dtype (the inputs' for
    # bf16/f16); value heads that share a q/k head are summed outside, in float32.
    per_key = jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, t.key_width), mm_dtype if t.group == 1 else f32)
    partial = jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, t.K // BK), f32)
    kt = t.key_tiled
    return backend.call(
        kernel, grid=t.key_tiled_grid,
        in_specs=[kt(t.qk_spec()), kt(t.qk_spec()), kt(t.gate_spec()),
                  kt(t.gate_spec()), *[kt(t.doc_spec())] * len(docs), kt(t.head_spec(C)), kt(t.head_spec(C)),
                  kt(t.state_spec(key_tiled=True)), kt(t.state_spec(key_tiled=True)),
                  kt(t.value_spec()), kt(t.head_spec(V)), kt(t.head_spec(V))],
        out_specs=[kt(t.key_out_spec()), kt(t.key_out_spec()),
                   kt(t.partial_spec()), kt(t.partial_spec())],
        out_shape=[per_key, per_key, partial, partial],
        **t.loop_launch, name="gdn_key_grads",
    )(q, k, g, beta, *docs, d_qk, Y, states_in, dstates_out, do, vnew, t_dvnew)
