"""The two sequential sweeps on Mosaic GPU (Hopper: wgmma on shared-memory tiles, TMA-pipelined loads).

T-form: the sweeps read T = (I + A)^-1 [C, C] (from `forward.prepare(..., t_only=True)`) and form the
chunk's W and U products on the fly instead of reading precomputed W [C, K] and U [C, V]:

  forward, per chunk (S = state entering it, [K, BV] value tile):
      X    = beta * (V - d_in * (K S))          [C, BV]
      Vnew = T X                                (= U - W S)
      O    = scale d_in * (Q S) + (scale Q K^T * Gamma) Vnew
      S   <- d_chunk S + K^T (d_out * Vnew)
  reverse, chunks from last to first (dS = dL/dS leaving the chunk):
      dVnew = (scale K Q^T * Gamma^T) dO + d_out * (K dS)
      dS   <- d_chunk dS + Q^T (scale d_in * dO) - K^T (beta d_in * (T^T dVnew))     (W^T dVnew)

One program (one warpgroup) per (batch * value head, value tile of BV columns). Its state tile lives
in registers as a wgmma accumulator and is copied to shared memory in the matmul dtype once per chunk;
every product is a wgmma on shared-memory operands (mosaic_common.py says why, and what the kernels
share).

Shapes follow the Triton kernels' chunked layouts (kernels_pallas/layout.py); the gates go in as
[B, HV, T] rows, since a TMA copy needs a contiguous minor dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.layout import Tiling
from kernels_pallas.mosaic_common import (ChunkDecays, chunk_ring, flat, gate_rows, gate_specs, gate_srcs,
                                          launch, load_state, mms, plgpu, program_ids, ring_barriers,
                                          ring_program, spec, store_state, tile)


def sweep(q, k, v, T, g, beta, docs, initial_state, t: Tiling, *, mode: str, out_dtype=None):
    """The forward pass across chunks (T-form), grid (B*HV, V/BV).

    mode "output":    returns (o [B,N,C,HV,V] in out_dtype, final state [B,HV,K,V] f32)
    mode "residuals": returns (final state, states entering each chunk [B,N,HV,K,V], Vnew [B,N,C,HV,V]),
                      those two in the matmul dtype (the backward's operands)
    mode "final":     returns the final state only (context parallelism's first pass)
    mode "output_residuals": returns (o, final state, states entering each chunk, Vnew): the forward
                      of a differentiated call, which keeps the backward's residuals instead of
                      sweeping again for them
    """
    if mode not in ("output", "residuals", "final", "output_residuals"):
        raise ValueError(f"unknown sweep mode {mode!r}")
    if mode in ("output", "output_residuals") and t.mosaic_warpgroups == 2:
        return _output_sweep_specialised(q, k, v, T, g, beta, docs, initial_state, t, out_dtype,
                                         residuals=mode == "output_residuals")
    C, K, V, BV, N = t.C, t.K, t.V, t.BV, t.N
    dt = k.dtype
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    with_o = mode in ("output", "output_residuals")
    with_res = mode in ("residuals", "output_residuals")
    stages = t.mosaic_stages

    def body(*refs):
        it = iter(refs)
        q_ref = next(it) if with_o else None
        k_ref, v_ref, T_ref, G_ref, beta_ref = (next(it) for _ in range(5))
        rel_ref = next(it) if has_docs else None
        s0_ref = next(it)
        o_ref = next(it) if with_o else None
        sT_ref = next(it)
        sin_ref, vn_out_ref = (next(it), next(it)) if with_res else (None, None)
        s_smem, x_smem = next(it), next(it)
        vn_smem, p_smem, o_smem = (next(it), next(it), next(it)) if with_o else (None, None, None)
        vno_smem = next(it) if with_res else None

        b, hv, h, vs = program_ids(t)
        S0 = load_state(s0_ref.at[b, hv, :, vs])

        def step(idx, *stage_refs):
            n = idx[0]
            stage_refs, S = stage_refs[:-1], stage_refs[-1]
            it_s = iter(stage_refs)
            q_s = next(it_s) if with_o else None
            k_s, v_s, T_s = next(it_s), next(it_s), next(it_s)
            ch = ChunkDecays(list(it_s))
            slot = n % 2
            if with_res or with_o:
                # The copies out of the slot written two chunks ago must have read it.
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            s_buf = s_smem.at[slot] if with_res else s_smem
            s_buf[...] = S.astype(dt)
            plgpu.commit_smem()
            # Three waits per chunk: [K S, Q S, Q K^T] -> [T X] -> [P Vnew, K^T (d_out Vnew)], with
            # the register work that does not feed the next product overlapping the tensor cores.
            if with_o:
                (KS, QS, QK), gamma = mms(((C, BV), [(k_s, s_buf)]), ((C, BV), [(q_s, s_buf)]),
                                           ((C, C), [(q_s, k_s.T)]), overlap=ch.gamma)
            else:
                (KS,) = mms(((C, BV), [(k_s, s_buf)]))
            if with_res:  # the state entering chunk n
                plgpu.copy_smem_to_gmem(s_buf, sin_ref.at[b, n, hv, :, vs], commit_group=False)
            v_c = plgpu.load(v_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            x_smem[...] = (ch.beta(BV) * (v_c - ch.row(ch.d_in, BV) * KS)).astype(dt)
            if with_o:
                p_smem[...] = (QK * gamma * t.scale).astype(dt)
            plgpu.commit_smem()
            if with_o:
                (vnew,), o_inter = mms(((C, BV), [(T_s, x_smem)]),
                                        overlap=lambda: ch.row(ch.d_in * t.scale, BV) * QS)
            else:
                (vnew,) = mms(((C, BV), [(T_s, x_smem)]))
            if with_res:
                vno_smem.at[slot][...] = vnew.astype(dt)
            if with_o:
                vn_smem[...] = vnew.astype(dt)
            x_smem[...] = (ch.row(ch.d_out, BV) * vnew).astype(dt)  # T X has been read
            plgpu.commit_smem()
            if with_res:
                plgpu.copy_smem_to_gmem(vno_smem.at[slot], vn_out_ref.at[b, pl.ds(n * C, C), hv, vs],
                                        commit_group=False)
                plgpu.commit_smem_to_gmem_group()
            # S <- d_chunk S + K^T (d_out Vnew). Above K = 128 it accumulates onto d_chunk S in
            # place, since S and a separate K^T X accumulator do not fit the registers together
            # (docs/benchmarks.md, "Written after runs I/J"); at K <= 128, the form measured so far.
            in_place = K > 128
            S_next = ((K, BV), [(k_s.T, x_smem)]) + ((ch.d_chunk * S,) if in_place else ())
            if with_o:
                PV, KX = mms(((C, BV), [(p_smem, vn_smem)]), S_next, interpret=t.interpret)
                o_smem.at[slot][...] = (o_inter + PV).astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[slot], o_ref.at[b, pl.ds(n * C, C), hv, vs])
            else:
                (KX,) = mms(S_next, interpret=t.interpret)
            return KX if in_place else ch.d_chunk * S + KX  # in place, KX is d_chunk S + K^T X

        fwd = lambda n: (n, 0)
        in_specs = ([spec((C, K), fwd)] * (1 + with_o) + [spec((C, BV), fwd), spec((C, C), fwd)]
                    + gate_specs(lambda n: (n,), has_docs))
        srcs = ([q_ref.at[b, :, h, :]] if with_o else []) + [
            k_ref.at[b, :, h, :], v_ref.at[b, :, hv, vs], T_ref.at[b, :, hv, :],
            *gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]
        S = plgpu.emit_pipeline(step, grid=(N,), in_specs=in_specs, max_concurrent_steps=stages,
                                init_carry=S0)(*srcs)
        plgpu.wait_smem_to_gmem(0)
        store_state(S, sT_ref.at[b, hv, :, vs])

    state = jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)
    out_type = ([jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), out_dtype)] if with_o else []) + [state]
    if with_res:
        out_type += [jax.ShapeDtypeStruct((t.B, N, t.HV, K, V), dt),
                     jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), dt)]
    scratch = [tile((2, K, BV) if with_res else (K, BV), dt), tile((C, BV), dt)]
    if with_o:
        scratch += [tile((C, BV), dt), tile((C, C), dt), tile((2, C, BV), out_dtype)]
    if with_res:
        scratch += [tile((2, C, BV), dt)]
    args = ([flat(q)] if with_o else []) + [flat(k), flat(v), flat(T), G, beta_rows]
    args += ([rel] if has_docs else []) + [initial_state]
    outs = plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                        grid=(t.B * t.HV, V // BV), grid_names=("bh", "vt"),
                        kernel_name=f"gdn_mosaic_sweep_{mode}", **launch(t))(*args)
    chunked = lambda x: x.reshape(t.B, N, C, *x.shape[2:])
    if with_o and with_res:
        return chunked(outs[0]), outs[1], outs[2], chunked(outs[3])
    if with_o:
        return chunked(outs[0]), outs[1]
    if with_res:
        return outs[0], outs[1], chunked(outs[2])
    return outs[0]


def _output_sweep_specialised(q, k, v, T, g, beta, docs, initial_state, t: Tiling, out_dtype, *,
                              residuals=False):
    """modes "output" and "output_residuals" of `sweep` with warp specialisation: three warpgroups
    per program.
      state   walks the chunks carrying S: K S -> X -> Vnew = T X -> S <- d_chunk S + K^T (d_out Vnew),
              handing each chunk's entering S and its Vnew (bf16, double-buffered) to the output group;
      output  Q K^T * Gamma (needs no S, so it runs ahead), then Q S and (Q K^T * Gamma) Vnew as the
              state group publishes them, and the TMA store of O;
      memory  TMA loads of the chunks' tiles, `mosaic_stages` chunks ahead.
    So the output products leave the state group's dependent chain, which is what bounds the sweep.
    With residuals the state group also stores each chunk's entering S and its Vnew (the bf16 tiles
    it hands over) to global memory, for the backward."""
    C, K, V, BV, N = t.C, t.K, t.V, t.BV, t.N
    dt = k.dtype
    stages = t.mosaic_stages
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    n_in = 6 + has_docs  # q, k, v, T, G, beta (, rel)

    def body(*refs):
        q_ref, k_ref, v_ref, T_ref, G_ref, beta_ref = refs[:6]
        rel_ref = refs[6] if has_docs else None
        s0_ref, o_ref, sT_ref = refs[n_in:n_in + 3]
        sin_ref, vn_out_ref = refs[n_in + 3:n_in + 5] if residuals else (None, None)
        scratch = refs[n_in + 3 + 2 * residuals:]
        (bufs, s_buf, vn_buf, x_smem, p_smem, o_buf, st_smem,
         loaded, consumed, s_ready, s_free, vn_ready, vn_free, st_bar) = scratch
        b, hv, h, vs, wg, stage = ring_program(t, q_ref, k_ref, v_ref, T_ref, G_ref, beta_ref, rel_ref,
                                               bufs, loaded, consumed)

        @pl.when(wg == 0)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(s0_ref.at[b, hv, :, vs], st_smem, st_bar)
            plgpu.barrier_wait(st_bar)

            def chunk(n, S):
                slot, (_, k_s, v_s, T_s, *gates) = stage(n)
                half = n % 2
                plgpu.barrier_wait(loaded.at[slot])
                ch = ChunkDecays(gates)

                @pl.when(n >= 2)
                def _():
                    plgpu.barrier_wait(s_free.at[half])
                if residuals:  # this group's stores out of these buffers two chunks ago are done
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                s_buf.at[half][...] = S.astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(s_ready.at[half])
                if residuals:
                    plgpu.copy_smem_to_gmem(s_buf.at[half], sin_ref.at[b, n, hv, :, vs],
                                            commit_group=False)
                (KS,) = mms(((C, BV), [(k_s, s_buf.at[half])]))
                v_c = plgpu.load(v_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                x_smem[...] = (ch.beta(BV) * (v_c - ch.row(ch.d_in, BV) * KS)).astype(dt)
                plgpu.commit_smem()
                (vnew,) = mms(((C, BV), [(T_s, x_smem)]))

                @pl.when(n >= 2)
                def _():
                    plgpu.barrier_wait(vn_free.at[half])
                vn_buf.at[half][...] = vnew.astype(dt)
                x_smem[...] = (ch.row(ch.d_out, BV) * vnew).astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(vn_ready.at[half])
                if residuals:
                    plgpu.copy_smem_to_gmem(vn_buf.at[half], vn_out_ref.at[b, pl.ds(n * C, C), hv, vs],
                                            commit_group=False)
                    plgpu.commit_smem_to_gmem_group()
                (KV,) = mms(((K, BV), [(k_s.T, x_smem)]))
                plgpu.barrier_arrive(consumed.at[slot])
                return ch.d_chunk * S + KV

            S = jax.lax.fori_loop(0, N, chunk, plgpu.load(st_smem, layout=plgpu.Layout.WGMMA))
            st_smem[...] = S
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_smem, sT_ref.at[b, hv, :, vs])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _output():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, N)
            def _(n):
                slot, (q_s, k_s, _, _, *gates) = stage(n)
                half = n % 2
                plgpu.barrier_wait(loaded.at[slot])
                ch = ChunkDecays(gates)
                (QK,), gamma = mms(((C, C), [(q_s, k_s.T)]), overlap=ch.gamma)
                p_smem[...] = (QK * gamma * t.scale).astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_wait(s_ready.at[half])
                (QS,) = mms(((C, BV), [(q_s, s_buf.at[half])]))
                plgpu.barrier_arrive(s_free.at[half])
                plgpu.barrier_wait(vn_ready.at[half])
                (PV,), o_inter = mms(((C, BV), [(p_smem, vn_buf.at[half])]),
                                      overlap=lambda: ch.row(ch.d_in * t.scale, BV) * QS)
                plgpu.barrier_arrive(vn_free.at[half])
                plgpu.barrier_arrive(consumed.at[slot])
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy from this buffer 2 ago
                o_buf.at[half][...] = (o_inter + PV).astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_buf.at[half], o_ref.at[b, pl.ds(n * C, C), hv, vs])
            plgpu.wait_smem_to_gmem(0)

    bufs = chunk_ring(t, dt, has_docs, stages)
    handover = plgpu.Barrier(num_arrivals=1, num_barriers=2)
    scratch = [bufs, tile((2, K, BV), dt), tile((2, C, BV), dt), tile((C, BV), dt), tile((C, C), dt),
               tile((2, C, BV), out_dtype), tile((K, BV), jnp.float32),
               *ring_barriers(bufs, stages),
               handover, handover, handover, handover,  # S and Vnew handed over, and freed
               plgpu.Barrier()]
    args = [flat(q), flat(k), flat(v), flat(T), G, beta_rows] + ([rel] if has_docs else [])
    out_type = [jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), out_dtype),
                jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)]
    if residuals:
        out_type += [jax.ShapeDtypeStruct((t.B, N, t.HV, K, V), dt),
                     jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), dt)]
    outs = plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=(t.B * t.HV, V // BV),
        grid_names=("bh", "vt"), num_threads=3, thread_name="wg",
        kernel_name="gdn_mosaic_sweep_output_residuals_ws" if residuals else "gdn_mosaic_sweep_output_ws",
        **launch(t),
    )(*args, initial_state)
    chunked = lambda x: x.reshape(t.B, N, C, *x.shape[2:])
    if residuals:
        return chunked(outs[0]), outs[1], outs[2], chunked(outs[3])
    return chunked(outs[0]), outs[1]


def reverse_sweep(q, k, T, g, beta, docs, do, dS_final, t: Tiling, *, mode: str):
    """The backward pass across chunks (T-form), chunks from last to first, grid (B*HV, V/BV). It also
    forms dVnew's chunk-local part (scale K Q^T * Gamma^T) dO, which the Triton path does apart.

    mode "full":  returns (dS leaving each chunk [B,N,HV,K,V], dVnew [B,N,C,HV,V], both in the matmul
                  dtype, and the float32 gradient of the initial state)
    mode "final": returns the gradient of the initial state only (context parallelism's first pass)
    With t.reverse_warpgroups == 2 the warp-specialised version (mosaic_reverse_ws.py) runs instead.
    """
    if t.reverse_warpgroups == 2:
        from kernels_pallas.mosaic_reverse_ws import reverse_sweep_specialised
        return reverse_sweep_specialised(q, k, T, g, beta, docs, do, dS_final, t, mode=mode)
    C, K, V, BV, N = t.C, t.K, t.V, t.BV, t.N
    dt = k.dtype
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    full = mode == "full"

    def body(*refs):
        it = iter(refs)
        q_ref, k_ref, do_ref, T_ref, G_ref, beta_ref = (next(it) for _ in range(6))
        rel_ref = next(it) if has_docs else None
        dsT_ref = next(it)
        ds_out_ref, dvn_out_ref = (next(it), next(it)) if full else (None, None)
        ds0_ref = next(it)
        ds_smem, pt_smem, dvn_smem, z_smem, dos_smem = (next(it) for _ in range(5))

        b, hv, h, vs = program_ids(t)
        dS0 = load_state(dsT_ref.at[b, hv, :, vs])

        def step(idx, *stage_refs):
            n = N - 1 - idx[0]
            stage_refs, dS = stage_refs[:-1], stage_refs[-1]
            q_s, k_s, do_s, T_s = stage_refs[:4]
            gates = stage_refs[4:]
            slot = idx[0] % 2
            ch = ChunkDecays(gates)
            if full:
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            ds_buf = ds_smem.at[slot] if full else ds_smem
            ds_buf[...] = dS.astype(dt)
            do_c = plgpu.load(do_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            dos_smem[...] = (ch.row(ch.d_in * t.scale, BV) * do_c).astype(dt)
            plgpu.commit_smem()
            if full:  # dL/dS leaving chunk n
                plgpu.copy_smem_to_gmem(ds_buf, ds_out_ref.at[b, n, hv, :, vs], commit_group=False)
            (KdS, KQ, QtdO), gamma_t = mms(((C, BV), [(k_s, ds_buf)]), ((C, C), [(k_s, q_s.T)]),
                                            ((K, BV), [(q_s.T, dos_smem)]), overlap=ch.gamma_t)
            pt_smem[...] = (KQ * gamma_t * t.scale).astype(dt)
            plgpu.commit_smem()
            (loc,), dvn_inter = mms(((C, BV), [(pt_smem, do_s)]),
                                     overlap=lambda: ch.row(ch.d_out, BV) * KdS)
            dvn_buf = dvn_smem.at[slot] if full else dvn_smem
            dvn_dst = dvn_out_ref.at[b, pl.ds(n * C, C), hv, vs] if full else None
            return reverse_chunk_tail(ch, dvn_inter + loc, dvn_buf, dvn_dst, z_smem, k_s, T_s, dS, QtdO)

        rev = lambda i: (N - 1 - i, 0)
        in_specs = [spec((C, K), rev)] * 2 + [spec((C, BV), rev), spec((C, C), rev),
            *gate_specs(lambda i: (N - 1 - i,), has_docs)]
        srcs = [q_ref.at[b, :, h, :], k_ref.at[b, :, h, :], do_ref.at[b, :, hv, vs], T_ref.at[b, :, hv, :],
                *gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]
        dS = plgpu.emit_pipeline(step, grid=(N,), in_specs=in_specs, max_concurrent_steps=t.mosaic_stages,
                                 init_carry=dS0)(*srcs)
        plgpu.wait_smem_to_gmem(0)
        store_state(dS, ds0_ref.at[b, hv, :, vs])

    state = jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)
    out_type = ([jax.ShapeDtypeStruct((t.B, N, t.HV, K, V), dt),
                 jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), dt)] if full else []) + [state]
    double = (2,) if full else ()  # tiles copied out asynchronously alternate between two buffers
    scratch = [tile((*double, K, BV), dt),     # dS
               tile((C, C), dt),               # scale K Q^T * Gamma^T
               tile((*double, C, BV), dt),     # dVnew
               tile((C, BV), dt),              # beta d_in T^T dVnew
               tile((C, BV), dt)]              # scale d_in dO
    args = [flat(q), flat(k), flat(do.astype(dt)), flat(T), G, beta_rows]
    args += ([rel] if has_docs else []) + [dS_final]
    outs = plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                        grid=(t.B * t.HV, V // BV), grid_names=("bh", "vt"),
                        kernel_name=f"gdn_mosaic_reverse_{mode}", **launch(t))(*args)
    if full:
        return outs[0], outs[1].reshape(t.B, N, C, *outs[1].shape[2:]), outs[2]
    return outs[0]


def reverse_chunk_tail(ch, dvn, dvn_buf, dvn_dst, z_smem, k_s, T_s, dS, QtdO):
    """The end of one reverse-sweep chunk, shared by both reverse sweeps: dVnew [C, BV] (float32
    registers) into dvn_buf, and from there to dvn_dst when given (one TMA commit group); then
    dS <- d_chunk dS + Q^T (scale d_in dO) - K^T (beta d_in (T^T dVnew)). Returns the new dS."""
    C, BV = dvn.shape
    K = dS.shape[0]
    dt = dvn_buf.dtype
    dvn_buf[...] = dvn.astype(dt)
    plgpu.commit_smem()
    if dvn_dst is not None:
        plgpu.copy_smem_to_gmem(dvn_buf, dvn_dst, commit_group=False)
        plgpu.commit_smem_to_gmem_group()
    (Y,), beta_d_in = mms(((C, BV), [(T_s.T, dvn_buf)]),    # T^T dVnew
                           overlap=lambda: ch.beta(BV) * ch.row(ch.d_in, BV))
    z_smem[...] = (-beta_d_in * Y).astype(dt)
    plgpu.commit_smem()
    (KZ,), dS_inter = mms(((K, BV), [(k_s.T, z_smem)]), overlap=lambda: ch.d_chunk * dS + QtdO)
    return dS_inter + KZ
