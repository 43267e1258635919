"""T = (I + A)^-1 of every chunk on Mosaic GPU: one program per chunk and value head.

    A = strict_lower(diag(beta) K K^T * Gamma)          [C, C]
    X_2s = X_s - X_s (L_s X_s),   X_2 = I - L_1,   T = X_C          (gdn_jax/triangular.py)

where L_s keeps A's entries in the lower-left s x s quarter of each 2s x 2s diagonal block. Each
product runs on wgmma in float32 accuracy from bf16 tiles: a float32 matrix M enters as
hi = bf16(M) and lo = bf16(M - hi), and a b is hi_a hi_b + hi_a lo_b + lo_a hi_b in one float32
accumulator (about 16 significant bits per operand, above the TF32 of the Triton kernel). Hopper's
tensor cores take float32 operands only as tf32 and only untransposed, hence the split.

The Triton `forward.prepare(..., t_only=True)` does the same with masked reductions on whole [C, C]
tiles; this version keeps the program's tiles in shared memory (about 64 KB at K = 128, so several
programs share an SM) and its chain is five doubling steps of two products each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.layout import Tiling
from kernels_pallas.mosaic_common import (ChunkDecays, chunk_program_ids, gate_rows, gate_srcs, launch,
                                          mms, plgpu, tile)


def prepare_T(k, g, beta, docs, t: Tiling):
    """T [B, N, C, HV, C] in k's dtype, as `forward.prepare(..., t_only=True)` returns it."""
    C, K, N = t.C, t.K, t.N
    dt = k.dtype
    G, beta_rows, rel = gate_rows(g, beta, docs, t)
    has_docs = rel is not None
    WGMMA = plgpu.Layout.WGMMA
    log2 = lambda s: s.bit_length() - 1

    def body(*refs):
        k_ref, G_ref, beta_ref = refs[:3]
        rel_ref = refs[3] if has_docs else None
        T_ref = refs[3 + has_docs]
        k_s, *rest = refs[4 + has_docs:]
        gates, (xh, xl, ph, plo, out_s, bar) = rest[:-6], rest[-6:]
        n, b, hv, h, rows = chunk_program_ids(t)
        srcs = [k_ref.at[b, rows, h, :], *[src.at[rows] for src in gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]]
        for src, dst in zip(srcs, [k_s, *gates]):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        plgpu.barrier_wait(bar)
        ch = ChunkDecays(gates)
        r_i = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=WGMMA)
        c_i = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=WGMMA)
        (kk,) = mms(((C, C), [(k_s, k_s.T)]))
        strict = ch.lower & (c_i < r_i)
        A = jnp.where(strict, ch.beta(C) * kk * ch.gamma(), 0.0)

        def quarters(s):
            """Lower-left s x s quarters of the 2s x 2s diagonal blocks."""
            same_pair = lax.shift_right_logical(r_i, log2(2 * s)) == lax.shift_right_logical(c_i, log2(2 * s))
            below = lax.shift_right_logical(r_i, log2(s)) > lax.shift_right_logical(c_i, log2(s))
            return same_pair & below

        def split_store(m, hi_ref, lo_ref):
            hi = m.astype(dt)
            hi_ref[...] = hi
            lo_ref[...] = (m - hi.astype(jnp.float32)).astype(dt)

        def product(a_hi, a_lo, b_hi, b_lo):
            (acc,) = mms(((C, C), [(a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi)]))
            return acc

        X = jnp.where(r_i == c_i, 1.0, 0.0) - jnp.where(quarters(1), A, 0.0)
        s = 2
        while s < C:
            split_store(X, xh, xl)
            split_store(jnp.where(quarters(s), A, 0.0), ph, plo)
            plgpu.commit_smem()
            LX = product(ph, plo, xh, xl)          # L_s X_s
            split_store(LX, ph, plo)
            plgpu.commit_smem()
            X = X - product(xh, xl, ph, plo)       # X_s (L_s X_s)
            s *= 2
        out_s[...] = X.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_s, T_ref.at[b, rows, hv, :])
        plgpu.wait_smem_to_gmem(0)

    gate_tiles = [plgpu.SMEM((C,), jnp.float32)] * (3 + 2 * has_docs)
    scratch = [tile((C, K), dt), *gate_tiles, *[tile((C, C), dt)] * 5,
               plgpu.Barrier(num_arrivals=1 + len(gate_tiles))]
    args = [k.reshape(t.B, N * C, *k.shape[3:]), G, beta_rows] + ([rel] if has_docs else [])
    T = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((t.B, N * C, t.HV, C), dt), scratch_types=scratch,
        grid=(N, t.B * t.HV), grid_names=("n", "bh"), kernel_name="gdn_mosaic_prepare", **launch(t),
    )(*args)
    return T.reshape(t.B, N, C, t.HV, C)
