"""Forward kernels: chunk-local preparation (W, U), then the pass across chunks fused with the output.

  prepare   grid (N, B*HV), all chunks at once:
            A = strict_lower(diag(beta) K K^T * Gamma), T = (I + A)^-1,
            W = T (beta * d_in * K)  [C, K],   U = T (beta * V)  [C, V],
            and for the output sweep A_qk = scale * Q K^T * Gamma  [C, C] (Tiling.output_qk "prepare"),
            or A_qk folded into Q' = scale * d_in * Q - A_qk W  [C, K] and O_loc = A_qk U  [C, V]
            (output_qk "folded")
  sweep     grid (B*HV, V / BV), each program walks the N chunks in order with its [K, BV] state tile:
            Vnew = U - W S,   O = scale * (d_in * Q) S + A_qk Vnew  (A_qk formed here when
            output_qk is "sweep"), or O = Q' S + O_loc (the same sum, one [C, C] product fewer),
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
from kernels_pallas.chunk_math import chunk_decays, unit_lower_inverse
from kernels_pallas.layout import Tiling, traced_zero


def load_docs(doc_refs, *index):
    """(doc, reach_in, reach_out) vectors of one chunk, or Nones when there are no segments."""
    if not doc_refs:
        return None, None, None
    return tuple(r[index] if index else r[...] for r in doc_refs)


def prepare(k, v, g, beta, docs, tiling: Tiling, mm_dtype, *, T=None, t_only=False, q=None, fold=False):
    """W [B,N,C,HV,K] and U [B,N,C,HV,V] in mm_dtype, plus T [B,N,C,HV,C] in mm_dtype (every use of T
    is a matmul operand in that dtype).

    Given T (the forward's, in the backward) the inverse is not formed again: W and U are two matmuls.
    t_only: return T alone (the Mosaic sweeps form the W and U products themselves).
    q: also return A_qk = scale * Q K^T * Gamma [B,N,C,HV,C] in mm_dtype (the output sweep's
    in-chunk matrix; a matmul operand there, so rounding it here changes nothing). Formed once per
    chunk here instead of once per value tile in the sequential sweep: at K = 256 and BV = 32 the
    C x C x K product was over a third of that loop's multiply-adds.
    q with fold: return Q' = scale * d_in * Q - A_qk W [B,N,C,HV,K] and O_loc = A_qk U [B,N,C,HV,V]
    (both mm_dtype) instead of A_qk, so that O = Q' S + O_loc in the sweep.
    """
    t = tiling
    C, K, V = t.C, t.K, t.V
    given_T = T is not None
    with_qk = q is not None
    if fold and not with_qk:
        raise ValueError("prepare folds A_qk only given q")
    if with_qk and (given_T or t_only):
        raise ValueError("prepare forms A_qk only with W, U and T (the forward's call)")

    def kernel(*refs):
        k_ref, v_ref, g_ref, beta_ref = refs[:4]
        doc_refs = refs[4:4 + len(docs)]
        rest = list(refs[4 + len(docs):])
        q_ref = rest.pop(0) if with_qk else None
        if given_T:
            T_in_ref, w_ref, u_ref = rest
        elif t_only:
            (T_ref,) = rest
        else:
            w_ref, u_ref, T_ref, *qk_out = rest
        whole = (slice(None),)
        k_c = t.load_keys(k_ref, whole)  # stays in its own dtype: scalings go on the [C, C] side
        beta_c = beta_ref[...]
        dec = chunk_decays(g_ref[...], *load_docs(doc_refs))
        if with_qk:
            q_c = t.load_keys(q_ref, whole)
            qk = mm(q_c, k_c, tb=True, dtype=mm_dtype) * (dec.gamma * t.scale)
            if not fold:
                qk_out[0][...] = qk.astype(qk_out[0].dtype)
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
        w = mm(T_beta * dec.d_in[None, :], k_c, dtype=mm_dtype).astype(w_ref.dtype)
        w_ref[...] = w
        if fold:  # Q' = scale d_in Q - A_qk W, with W as the sweep reads it (rounded)
            qf_ref, oloc_ref = qk_out
            qf_ref[...] = ((dec.d_in * t.scale)[:, None] * q_c.astype(jnp.float32)
                           - mm(qk, w, dtype=mm_dtype)).astype(qf_ref.dtype)
        for j in range(V // t.BVI):  # value tiles bound the live registers for wide V
            vs = pl.ds(j * t.BVI, t.BVI)
            v_c = t.load_values(v_ref, whole, j * t.BVI, t.BVI)
            u = mm(T_beta, v_c, dtype=mm_dtype).astype(u_ref.dtype)
            u_ref[:, vs] = u
            if fold:
                oloc_ref[:, vs] = mm(qk, u, dtype=mm_dtype).astype(oloc_ref.dtype)

    head = lambda width: jax.ShapeDtypeStruct((t.B, t.N, C, t.HV, width), mm_dtype)
    out_specs = [t.head_spec(K), t.head_spec(V), t.head_spec(C)]
    out_shape = [head(K), head(V), head(C)]
    picked = slice(0, 2) if given_T else slice(2, 3) if t_only else slice(0, 3)
    out_specs, out_shape = out_specs[picked], out_shape[picked]
    if with_qk:  # A_qk [C, C], or Q' [C, K] and O_loc [C, V]
        widths = (K, V) if fold else (C,)
        out_specs += [t.head_spec(w) for w in widths]
        out_shape += [head(w) for w in widths]
    outs = backend.call(
        kernel, grid=t.chunk_grid,
        in_specs=[t.qk_spec(), t.value_spec(), t.gate_spec(), t.gate_spec(),
                  *[t.doc_spec()] * len(docs), *[t.qk_spec()] * with_qk, *[t.head_spec(C)] * given_T],
        out_specs=out_specs, out_shape=out_shape,
        **t.chunk_launch, name="gdn_prepare",
    )(k, v, g, beta, *docs, *([q] if with_qk else []), *([T] if given_T else []))
    if t_only:
        return outs[0]
    return (*outs, T) if given_T else tuple(outs)


def sweep(q, k, w, u, g, docs, initial_state, tiling: Tiling, mm_dtype, *, mode: str, out_dtype=None,
          a_qk=None, folded=None):
    """The pass across chunks (W/U form), grid (B*HV, V/BV).

    mode "output":    returns (o [B,N,C,HV,V] in out_dtype, final state [B,HV,K,V] f32); A_qk is
                      a_qk (from `prepare`), or formed per chunk here when a_qk is None; given
                      folded = (Q', O_loc) from prepare(fold=True), O = Q' S + O_loc instead
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
    if a_qk is not None and folded is not None:
        raise ValueError("the sweep takes a_qk or folded, not both")
    extra = [] if not with_o else [a_qk] if a_qk is not None else list(folded) if folded else []

    def kernel(*refs):
        q_ref, k_ref, w_ref, u_ref, g_ref = refs[:5]
        doc_refs = refs[5:5 + len(docs)]
        s0_ref = refs[5 + len(docs)]
        qk_refs = refs[6 + len(docs):6 + len(docs) + len(extra)]
        outs = list(refs[6 + len(docs) + len(extra):])
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
                if len(qk_refs) == 2:  # folded: O = Q' S + O_loc
                    qf_ref, oloc_ref = qk_refs
                    o = mm(qf_ref[b, n, :, hv, :], S, dtype=mm_dtype) + oloc_ref[b, n, :, hv, vs].astype(jnp.float32)
                else:
                    q_c = t.load_keys(q_ref, (b, n, slice(None), h), k0)
                    if qk_refs:
                        a_qk_c = qk_refs[0][b, n, :, hv, :]
                    else:  # a [C, C] tile of prepare's would not fit beside two stages of [C, K] loads
                        a_qk_c = mm(q_c, k_c, tb=True, dtype=mm_dtype) * (dec.gamma * t.scale)
                    o = ((dec.d_in * t.scale)[:, None] * mm(q_c, S, dtype=mm_dtype)
                         + mm(a_qk_c, vnew, dtype=mm_dtype))
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
        in_specs=[whole] * (6 + len(docs) + len(extra)), out_specs=[whole] * len(out_shape),
        out_shape=out_shape, **t.sweep_launch, name=f"gdn_sweep_{mode}",
    )(q, k, w, u, g, *docs, initial_state, *extra)
    return tuple(outs) if len(outs) > 1 else outs[0]
