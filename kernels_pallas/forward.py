"""Forward kernels: chunk-local preparation (W, U), then the pass across chunks fused with the output.

  prepare   grid (N, B*HV), all chunks at once:
            A = strict_lower(diag(beta) K K^T * Gamma), T = (I + A)^-1,
            W = T (beta * d_in * K)  [C, K],   U = T (beta * V)  [C, V]
  sweep     grid (B*HV, V / BV), each program walks the N chunks in order with its [K, BV] state tile:
            Vnew = U - W S,   O = scale * (d_in * Q) S + A_qk Vnew,   A_qk = scale * Q K^T * Gamma,
            S <- d_chunk S + (d_out * K)^T Vnew
            Instead of O it can write each chunk's entering state and Vnew (the backward's residuals),
            or only the final state.
Value tiles are independent (every product above is column-wise in V), which is what lets the
sequential sweep run B*HV*V/BV programs side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas.backend import mm
from kernels_pallas.chunk_math import chunk_decays, chunk_output, decayed_qk, unit_lower_inverse
from kernels_pallas.layout import Tiling, traced_zero


def load_docs(doc_refs, *index):
    """(doc, reach_in, reach_out) vectors of one chunk, or Nones when there are no segments."""
    if not doc_refs:
        return None, None, None
    return tuple(r[index] if index else r[...] for r in doc_refs)


def prepare(k, v, g, beta, docs, tiling: Tiling, mm_dtype, *, T=None, t_only=False):
    """W [B,N,C,HV,K] and U [B,N,C,HV,V] in mm_dtype, plus T [B,N,C,HV,C] in mm_dtype (every use of T
    is a matmul operand in that dtype).

    Given T (the forward's, in the backward) the inverse is not formed again: W and U are two matmuls.
    t_only: return T alone (the Mosaic sweeps form the W and U products themselves).
    """
    t = tiling
    C, K, V = t.C, t.K, t.V
    given_T = T is not None

    def kernel(*refs):
        k_ref, v_ref, g_ref, beta_ref = refs[:4]
        doc_refs = refs[4:4 + len(docs)]
        rest = refs[4 + len(docs):]
        if given_T:
            T_in_ref, w_ref, u_ref = rest
        elif t_only:
            (T_ref,) = rest
        else:
            w_ref, u_ref, T_ref = rest
        whole = (slice(None),)
        k_c = t.load_keys(k_ref, whole)  # stays in its own dtype: scalings go on the [C, C] side
        beta_c = beta_ref[...]
        dec = chunk_decays(g_ref[...], *load_docs(doc_refs))
        if given_T:
            T = T_in_ref[...].astype(jnp.float32)
        else:
            kk = mm(k_c, k_c, tb=True, dtype=mm_dtype)
            A = jnp.where(dec.strict, beta_c[:, None] * kk * dec.gamma, 0.0)
            T = unit_lower_inverse(A, mm_precise=mm_dtype == jnp.float32)
            T_ref[...] = T.astype(T_ref.dtype)
            if t_only:
                return
        T_beta = T * beta_c[None, :]  # T diag(beta)
        w_ref[...] = mm(T_beta * dec.d_in[None, :], k_c, dtype=mm_dtype).astype(w_ref.dtype)
        for j in range(V // t.BVI):  # value tiles bound the live registers for wide V
            vs = pl.ds(j * t.BVI, t.BVI)
            v_c = t.load_values(v_ref, whole, j * t.BVI, t.BVI)
            u_ref[:, vs] = mm(T_beta, v_c, dtype=mm_dtype).astype(u_ref.dtype)

    head = lambda width: jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, width), mm_dtype)
    out_specs = [t.head_spec(K), t.head_spec(V), t.head_spec(C)]
    out_shape = [head(K), head(V), head(C)]
    picked = slice(0, 2) if given_T else slice(2, 3) if t_only else slice(0, 3)
    out_specs, out_shape = out_specs[picked], out_shape[picked]
    outs = backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.value_spec(), t.gate_spec(), t.gate_spec(),
                  *[t.doc_spec()] * len(docs), *[t.head_spec(C)] * given_T],
        out_specs=out_specs, out_shape=out_shape,
        **t.chunk_launch, name="gdn_prepare",
    )(k, v, g, beta, *docs, *([T] if given_T else []))
    if t_only:
        return outs[0]
    return (*outs, T) if given_T else tuple(outs)


def sweep(q, k, w, u, g, docs, initial_state, tiling: Tiling, mm_dtype, *, mode: str, out_dtype=None):
    """The pass across chunks (W/U form), grid (B*HV, V/BV).

    mode "output":    returns (o [B,N,C,HV,V] in out_dtype, final state [B,HV,K,V] f32)
    mode "residuals": returns (final state, states entering each chunk [B,N,HV,K,V], Vnew [B,N,C,HV,V]),
                      those two in mm_dtype (the backward uses them only as matmul operands)
    mode "output_residuals": returns (o, final state, states entering each chunk, Vnew): the forward
                      of a differentiated call keeping the backward's residuals (keep_residuals)
    mode "final":     returns the final state only (context parallelism's first pass)
    """
    t = tiling
    C, K, V, BV = t.C, t.K, t.V, t.BV
    if mode not in ("output", "residuals", "final", "output_residuals"):
        raise ValueError(f"unknown sweep mode {mode!r}")
    with_o, with_res = mode in ("output", "output_residuals"), mode in ("residuals", "output_residuals")

    def kernel(*refs):
        q_ref, k_ref, w_ref, u_ref, g_ref = refs[:5]
        doc_refs = refs[5:5 + len(docs)]
        s0_ref = refs[5 + len(docs)]
        outs = list(refs[6 + len(docs):])
        o_ref = outs.pop(0) if with_o else None
        sT_ref = outs.pop(0)
        s_in_ref, vn_ref = outs if with_res else (None, None)
        b, hv, h = t.heads(pl.program_id(0))
        v0 = pl.program_id(1) * BV
        vs = pl.ds(v0, BV)
        k0 = traced_zero()

        # q, k and w stay in their own dtype: every per-position scaling is applied to the narrower
        # [C, BV] or [C, C] side of a product, so no float32 copy of a [C, K] tile is ever live.
        def chunk(n, S):
            k_c = t.load_keys(k_ref, (b, n, slice(None), h), k0)
            dec = chunk_decays(g_ref[b, n, :, hv], *load_docs(doc_refs, b, n))
            vnew = u_ref[b, n, :, hv, vs].astype(jnp.float32) - mm(w_ref[b, n, :, hv, :], S, dtype=mm_dtype)
            if with_res:
                s_in_ref[b, n, hv, :, vs] = S.astype(s_in_ref.dtype)
                vn_ref[b, n, :, hv, vs] = vnew.astype(vn_ref.dtype)
            if with_o:
                # A_qk is formed per value tile: at K = 256 neither a [C, C] tile from prepare
                # (shared memory) nor folding it into prepare (time) paid (docs/benchmarks.md, run L)
                q_c = t.load_keys(q_ref, (b, n, slice(None), h), k0)
                a_qk = decayed_qk(q_c, k_c, dec, t.scale, mm_dtype)
                o = chunk_output(q_c, a_qk, S, vnew, dec, t.scale, mm_dtype)
                t.store_values(o_ref, (b, n, slice(None), hv), v0, BV, o)
            return dec.d_chunk * S + mm(k_c, vnew * dec.d_out[:, None], ta=True, dtype=mm_dtype)

        S = jax.lax.fori_loop(0, t.N, chunk, s0_ref[b, hv, :, vs])
        sT_ref[b, hv, :, vs] = S

    out_shape = [jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)]
    if with_o:
        out_shape.insert(0, jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, t.value_width), out_dtype))
    if with_res:
        out_shape += [jax.ShapeDtypeStruct((t.B, t.N, t.HV, K, V), mm_dtype),
                      jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, V), mm_dtype)]
    whole = backend.WHOLE
    outs = backend.call(
        kernel, grid=t.sequential_grid,
        in_specs=[whole] * (6 + len(docs)), out_specs=[whole] * len(out_shape),
        out_shape=out_shape, **t.sweep_launch, name=f"gdn_sweep_{mode}",
    )(q, k, w, u, g, *docs, initial_state)
    return tuple(outs) if len(outs) > 1 else outs[0]


def output_from_states(q, k, g, docs, states_in, vnew, tiling: Tiling, mm_dtype, *, out_dtype):
    """O = (scale d_in * Q) S_n + (scale Q K^T * Gamma) Vnew for all chunks at once, grid (N, B*HV),
    value tiles in an inner loop: the output a "residuals" sweep leaves to form, from the states
    entering each chunk S_n [B,N,HV,K,V] and Vnew [B,N,C,HV,V] it wrote (both mm_dtype, as the
    fused sweep rounds them for these products). Returns o [B,N,C,HV,V] (true width) in out_dtype."""
    t = tiling
    BV = t.BVI

    def kernel(*refs):
        q_ref, k_ref, g_ref = refs[:3]
        doc_refs = refs[3:3 + len(docs)]
        s_ref, vn_ref, o_ref = refs[3 + len(docs):]
        whole = (slice(None),)
        dec = chunk_decays(g_ref[...], *load_docs(doc_refs))
        q_c = t.load_keys(q_ref, whole)
        a_qk = decayed_qk(q_c, t.load_keys(k_ref, whole), dec, t.scale, mm_dtype)
        for j in range(t.V // BV):
            vs = pl.ds(j * BV, BV)
            o = chunk_output(q_c, a_qk, s_ref[:, vs], vn_ref[:, vs], dec, t.scale, mm_dtype)
            t.store_values(o_ref, whole, j * BV, BV, o)

    return backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.qk_spec(), t.gate_spec(), *[t.doc_spec()] * len(docs),
                  t.state_spec(), t.head_spec(t.V)],
        out_specs=t.value_spec(),
        out_shape=jax.ShapeDtypeStruct((t.B, t.N, t.C, t.HV, t.value_width), out_dtype),
        **t.chunk_launch, name="gdn_output_from_states",
    )(q, k, g, *docs, states_in, vnew)
