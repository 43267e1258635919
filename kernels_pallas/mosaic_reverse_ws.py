"""The reverse sweep (`mosaic_sweeps.reverse_sweep`) warp-specialised: three warpgroups per program.

Per chunk, last to first, with dS the cotangent of the state leaving the chunk ([K, BV] value tile):

    loc   = (scale K Q^T * Gamma^T) dO                      needs no dS
    dVnew = loc + d_out * (K dS)
    dS   <- d_chunk dS + Q^T (scale d_in * dO) - K^T (beta d_in * (T^T dVnew))

  state    the dependent chain: [K dS, Q^T (scale d_in dO)] -> [T^T dVnew] -> [K^T (...)], three
           tensor-core waits a chunk, taking loc from the helper;
  helper   K Q^T * Gamma^T and its product with dO, a chunk ahead of the state group, handing loc
           over in float32 (one buffer, a ready and a free barrier);
  memory   TMA loads of the chunks' tiles, `mosaic_stages` chunks ahead.
The one-warpgroup sweep issues the two loc products in its own chain (four waits a chunk).

Shared memory at K = 128, BV = 64, two stages: 96 KB of loaded tiles, dS and dVnew double-buffered
for their stores (48 KB), loc in float32 (16 KB), the initial/final state (32 KB) and three [C, *]
work tiles (24 KB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.layout import Tiling
from kernels_pallas.mosaic_common import (ChunkDecays, chunk_ring, flat, gate_rows, launch, mms,
                                          plgpu, ring_barriers, ring_program, tile)
from kernels_pallas.mosaic_sweeps import reverse_chunk_tail


def reverse_sweep_specialised(q, k, T, g, beta, docs, do, dS_final, t: Tiling, *, mode: str):
    """Same contract as `mosaic_sweeps.reverse_sweep`."""
    C, K, V, BV, N = t.C, t.K, t.V, t.BV, t.N
    dt = k.dtype
    stages = t.mosaic_stages
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    full = mode == "full"
    n_in = 4 + 2 + has_docs  # q, k, dO, T, G, beta (, rel)
    WGMMA = plgpu.Layout.WGMMA

    def body(*refs):
        q_ref, k_ref, do_ref, T_ref, G_ref, beta_ref = refs[:6]
        rel_ref = refs[6] if has_docs else None
        ds0_in_ref = refs[n_in]
        outs = refs[n_in + 1:n_in + 2 + 2 * full]
        ds_out_ref, dvn_out_ref = (outs[0], outs[1]) if full else (None, None)
        ds0_ref = outs[-1]
        (bufs, ds_smem, dvn_smem, z_smem, dos_smem, p_smem, loc_smem, st_smem,
         loaded, consumed, loc_ready, loc_free, st_bar) = refs[n_in + 2 + 2 * full:]
        b, hv, h, vs, wg, stage = ring_program(t, q_ref, k_ref, do_ref, T_ref, G_ref, beta_ref, rel_ref,
                                               bufs, loaded, consumed, reverse=True)

        @pl.when(wg == 1)
        def _helper():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, N)
            def _(i):
                slot, (q_s, k_s, do_s, _, *gates) = stage(i)
                plgpu.barrier_wait(loaded.at[slot])
                ch = ChunkDecays(gates)
                (KQ,), gamma_t = mms(((C, C), [(k_s, q_s.T)]), overlap=ch.gamma_t)
                p_smem[...] = (KQ * gamma_t * t.scale).astype(dt)
                plgpu.commit_smem()
                (loc,) = mms(((C, BV), [(p_smem, do_s)]))
                plgpu.barrier_arrive(consumed.at[slot])

                @pl.when(i >= 1)
                def _():
                    plgpu.barrier_wait(loc_free)
                loc_smem[...] = loc
                plgpu.commit_smem()
                plgpu.barrier_arrive(loc_ready)

        @pl.when(wg == 0)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(ds0_in_ref.at[b, hv, :, vs], st_smem, st_bar)
            plgpu.barrier_wait(st_bar)

            def chunk(i, dS):
                n = N - 1 - i
                slot, (q_s, k_s, do_s, T_s, *gates) = stage(i)
                half = i % 2
                plgpu.barrier_wait(loaded.at[slot])
                ch = ChunkDecays(gates)
                if full:  # the stores out of these buffers two chunks ago have read them
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                ds_buf = ds_smem.at[half]
                ds_buf[...] = dS.astype(dt)
                do_c = plgpu.load(do_s, layout=WGMMA).astype(jnp.float32)
                dos_smem[...] = (ch.row(ch.d_in * t.scale, BV) * do_c).astype(dt)
                plgpu.commit_smem()
                if full:  # dL/dS leaving chunk n
                    plgpu.copy_smem_to_gmem(ds_buf, ds_out_ref.at[b, n, hv, :, vs], commit_group=False)
                KdS, QtdO = mms(((C, BV), [(k_s, ds_buf)]), ((K, BV), [(q_s.T, dos_smem)]))
                plgpu.barrier_wait(loc_ready)
                loc = plgpu.load(loc_smem, layout=WGMMA)
                plgpu.barrier_arrive(loc_free)
                dvn_dst = dvn_out_ref.at[b, pl.ds(n * C, C), hv, vs] if full else None
                dS = reverse_chunk_tail(ch, ch.row(ch.d_out, BV) * KdS + loc, dvn_smem.at[half], dvn_dst,
                                        z_smem, k_s, T_s, dS, QtdO)
                plgpu.barrier_arrive(consumed.at[slot])
                return dS

            dS = jax.lax.fori_loop(0, N, chunk, plgpu.load(st_smem, layout=WGMMA))
            plgpu.wait_smem_to_gmem(0)
            st_smem[...] = dS
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_smem, ds0_ref.at[b, hv, :, vs])
            plgpu.wait_smem_to_gmem(0)

    bufs = chunk_ring(t, dt, has_docs, stages)
    scratch = [bufs, tile((2, K, BV), dt), tile((2, C, BV), dt), tile((C, BV), dt), tile((C, BV), dt),
               tile((C, C), dt), tile((C, BV), jnp.float32), tile((K, BV), jnp.float32),
               *ring_barriers(bufs, stages),
               plgpu.Barrier(), plgpu.Barrier(),  # loc handed over, and its buffer free again
               plgpu.Barrier()]                   # the initial dS loaded
    state = jax.ShapeDtypeStruct((t.B, t.HV, K, V), jnp.float32)
    out_type = ([jax.ShapeDtypeStruct((t.B, N, t.HV, K, V), dt),
                 jax.ShapeDtypeStruct((t.B, N * C, t.HV, V), dt)] if full else []) + [state]
    args = [flat(q), flat(k), flat(do.astype(dt)), flat(T), G, beta_rows] + ([rel] if has_docs else [])
    outs = plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=(t.B * t.HV, V // BV),
        grid_names=("bh", "vt"), num_threads=3, thread_name="wg",
        kernel_name=f"gdn_mosaic_reverse_{mode}_ws", **launch(t),
    )(*args, dS_final)
    if full:
        return outs[0], outs[1].reshape(t.B, N, C, *outs[1].shape[2:]), outs[2]
    return outs[0]
