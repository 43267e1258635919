"""The Pallas gated delta rule: forward and backward kernels joined by `jax.custom_vjp`.

Two lowerings share this driver; `SWEEPS` (one table) says what differs between them:
  "triton"  every kernel through Pallas's Triton lowering (any CUDA GPU). The sweeps read W and U,
            which `prepare` writes.
  "mosaic"  the two sequential sweeps through Mosaic GPU (Hopper: wgmma, TMA; mosaic_sweeps.py), in
            T-form: they read T and form the W and U products on the fly, so no W or U is stored.
            The chunk-parallel kernels stay on Triton.

Residuals: the inputs and T = (I + A)^-1 ([B, T, HV, C] in the matmul dtype, like a C-wide head).
By default at K <= 128 the backward recomputes the per-chunk states and Vnew (one sequential sweep)
instead of keeping them: they are [B, T/C, HV, K, V], K/C (= 2 at K = 128) times the size of v per
layer, while recomputing them costs about one forward sweep. At K > 128 on the Triton sweeps the
forward keeps them (`split_output`, bf16): measured 19-20% faster forward+backward there, for
~0.5 GB a layer more at fla_gdn_1.3b's batch (docs/benchmarks.md).
With context parallelism (`Tiling.segments` > 1, context_parallel.py) the segments' transitions and
entering states are kept too ([B, P, HV, K, K + V] float32, small).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels_pallas import (backward, forward, mosaic_chunk_grads, mosaic_common, mosaic_grads,
                            mosaic_prepare, mosaic_sweeps)
from kernels_pallas import context_parallel as cp
from kernels_pallas.layout import Tiling


class Chunks(NamedTuple):
    """The chunked inputs (kernels_pallas/layout.py) and what `prepare` made of them: T, and for the
    W/U-form sweeps W and U (else None)."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array
    docs: tuple
    T: jax.Array
    w: jax.Array | None = None
    u: jax.Array | None = None

    def split(self, P):
        return jax.tree.map(lambda x: cp.split(x, P), self)


def _mm_dtype(dtype):
    # bf16/f16 operands use the tensor cores; f32 inputs keep IEEE float32 products.
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


class _TritonSweeps:
    """W/U form: Vnew = U - W S, with W and U from `prepare`."""

    @staticmethod
    def prepare(x: Chunks, t, T=None, kept=None) -> Chunks:
        mm_dtype = _mm_dtype(x.q.dtype)
        if kept is not None:  # the backward, residuals kept: the reverse sweep needs W, no U
            return x._replace(T=T, **kept)
        w, u, T = forward.prepare(x.k, x.v, x.g, x.beta, x.docs, t, mm_dtype, T=T)
        return x._replace(T=T, w=w, u=u)

    @staticmethod
    def kept_inputs(x: Chunks) -> dict:
        """What of `prepare`'s work the backward reuses when the forward keeps its residuals: W
        (bf16 [B,N,C,HV,K]) for the reverse sweep, so the backward forms neither W nor U again."""
        return {"w": x.w}

    @staticmethod
    def with_transition_columns(x: Chunks, K) -> Chunks:
        return x._replace(u=cp.with_transition_columns(x.u, K))

    @staticmethod
    def sweep(x: Chunks, S0, t, mode, out_dtype=None):
        return forward.sweep(x.q, x.k, x.w, x.u, x.g, x.docs, S0, t, _mm_dtype(x.q.dtype), mode=mode,
                             out_dtype=out_dtype)

    @staticmethod
    def output_from_states(x: Chunks, states_in, vnew, t, out_dtype):
        return forward.output_from_states(x.q, x.k, x.g, x.docs, states_in, vnew, t,
                                          _mm_dtype(x.q.dtype), out_dtype=out_dtype)

    @staticmethod
    def reverse(x: Chunks, do, dS_final, t, mode):
        mm_dtype = _mm_dtype(x.q.dtype)
        local = backward.local_dvnew(x.q, x.k, x.g, x.docs, do, t, mm_dtype)
        return backward.reverse_sweep(x.q, x.k, x.w, x.g, x.docs, do, local, dS_final, t, mm_dtype, mode=mode)


class _MosaicSweeps:
    """T-form: Vnew = T (beta * (V - d_in * K S)), formed inside the Mosaic sweeps."""

    @staticmethod
    def prepare(x: Chunks, t, T=None, kept=None) -> Chunks:
        if T is None and t.mosaic_prepare:
            T = mosaic_prepare.prepare_T(x.k, x.g, x.beta, x.docs, t)
        elif T is None:
            T = forward.prepare(x.k, x.v, x.g, x.beta, x.docs, t, _mm_dtype(x.q.dtype), t_only=True)
        return x._replace(T=T)

    @staticmethod
    def kept_inputs(x: Chunks) -> dict:
        return {}  # T-form: the backward's sweeps read T, which is kept anyway

    @staticmethod
    def with_transition_columns(x: Chunks, K) -> Chunks:
        return x._replace(v=cp.with_transition_columns(x.v, K))

    @staticmethod
    def sweep(x: Chunks, S0, t, mode, out_dtype=None):
        return mosaic_sweeps.sweep(x.q, x.k, x.v, x.T, x.g, x.beta, x.docs, S0, t, mode=mode,
                                   out_dtype=out_dtype)

    @staticmethod
    def reverse(x: Chunks, do, dS_final, t, mode):
        return mosaic_sweeps.reverse_sweep(x.q, x.k, x.T, x.g, x.beta, x.docs, do, dS_final, t, mode=mode)


SWEEPS = {"triton": _TritonSweeps, "mosaic": _MosaicSweeps}
# The kernel that forms dq, dk and the key-level gate terms: Triton (key-tiled, any shape) or Mosaic
# (one program per chunk and value head, K, V <= 128).
KEY_GRADS = {"triton": backward.key_grads, "mosaic": mosaic_grads.key_grads}


def _pair_then_keys(key_fn):
    def run(q, k, v, g, beta, docs, T, do, vnew, dvnew, states_in, dstates_out, t, mm_dtype):
        t_dvn, d_qk, Y, dG, dbeta = backward.pair_grads(q, k, v, g, beta, docs, T, do, vnew, dvnew, t,
                                                        mm_dtype)
        dq, dk, dG_keys, dbeta_keys = key_fn(q, k, g, beta, docs, d_qk, Y, states_in, dstates_out, do,
                                             vnew, t_dvn, t, mm_dtype)
        return t_dvn, dq, dk, dG + dG_keys.sum(-1), dbeta + dbeta_keys.sum(-1)
    return run


# The backward's chunk-parallel half, by Tiling.key_grads: (T^T dVnew, dq, dk per value head, dG,
# dbeta) from the sweeps' residuals. "triton" and "mosaic" run the Triton pair kernel and then that
# key kernel; "fused" is one Mosaic program per chunk and value head for both (K, V <= 128).
CHUNK_GRADS = {"triton": _pair_then_keys(backward.key_grads),
               "mosaic": _pair_then_keys(mosaic_grads.key_grads),
               "fused": mosaic_chunk_grads.chunk_grads}


def document_masks(reset_BxT, N, C):
    """(doc, reach_in, reach_out), each [B, N, C]: document index, and whether the state entering the
    chunk survives to each position / whether each position's write survives to the chunk's end."""
    doc = jnp.cumsum(reset_BxT.astype(jnp.int32), axis=1).reshape(-1, N, C)
    before = jnp.concatenate([jnp.zeros_like(doc[:, :1, 0]), doc[:, :-1, -1]], axis=1)
    reach_in = (doc == before[..., None]).astype(jnp.float32)
    reach_out = (doc == doc[..., -1:]).astype(jnp.float32)
    return doc, reach_in, reach_out


def _forward(q, k, v, g, beta, initial_state, docs, t: Tiling, keep=False):
    """((o, final state), (T, segments' join, kept)); with keep (the forward of a differentiated
    call, one segment) kept = (states entering each chunk, Vnew, the sweeps' `kept_inputs`) from the
    output sweep itself, or with t.split_output from the residual sweep that then feeds the
    chunk-parallel output kernel, so the backward skips its residual sweep; otherwise None."""
    sweeps = SWEEPS[t.sweeps]
    x = sweeps.prepare(Chunks(q, k, v, g, beta, docs, None), t)
    if t.segments == 1 and t.split_output:  # the residuals exist anyway: kept whenever differentiated
        S_final, states_in, vnew = sweeps.sweep(x, initial_state, t.residual_tiling, "residuals")
        o = sweeps.output_from_states(x, states_in, vnew, t, v.dtype)
        return (o, S_final), (x.T, None, (states_in, vnew, sweeps.kept_inputs(x)) if keep else None)
    if t.segments == 1:
        if keep:
            o, S_final, states_in, vnew = sweeps.sweep(x, initial_state, t, "output_residuals", v.dtype)
            return (o, S_final), (x.T, None, (states_in, vnew, sweeps.kept_inputs(x)))
        o, S_final = sweeps.sweep(x, initial_state, t, "output", v.dtype)
        return (o, S_final), (x.T, None, None)
    ts, P = cp.segment_tiling(t), t.segments
    xs = x.split(P)
    S_aug = sweeps.sweep(sweeps.with_transition_columns(xs, t.K), cp.transition_start(ts),
                         ts._replace(V=t.K + t.V), "final")
    M, S_in, S_final = cp.join_forward(S_aug, initial_state, t)
    o, _ = sweeps.sweep(xs, S_in.reshape(ts.B, *S_in.shape[2:]), ts, "output", v.dtype)
    return (cp.merge(o, P), S_final), (x.T, (M, S_in), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked(q, k, v, g, beta, initial_state, docs, t: Tiling):
    return _forward(q, k, v, g, beta, initial_state, docs, t)[0]


# The name of what the forward makes for the backward (T, segments' joins, kept states), so a remat
# policy can save it (gdn_jax/model.py's "dots_gdn") instead of rerunning the forward's kernels.
RESIDUALS_NAME = "gdn_kernel_residuals"


def _chunked_fwd(q, k, v, g, beta, initial_state, docs, t):
    keep = (t.keep_residuals or t.split_output) and t.segments == 1
    out, made = _forward(q, k, v, g, beta, initial_state, docs, t, keep=keep)
    T, segments, kept = checkpoint_name(made, RESIDUALS_NAME)
    return out, (q, k, v, g, beta, initial_state, docs, T, segments, kept)


def _states_and_cotangents(x: Chunks, initial_state, segments, kept, do, dS_final, t: Tiling):
    """The backward's two sweeps: (states entering each chunk, Vnew, dS leaving each chunk, dVnew,
    d initial_state); the first only where the forward kept none."""
    sweeps = SWEEPS[t.sweeps]
    if t.segments == 1:
        if kept is not None:
            states_in, vnew, _ = kept
        else:
            _, states_in, vnew = sweeps.sweep(x, initial_state, t.residual_tiling, "residuals")
        dstates_out, dvnew, d_initial = sweeps.reverse(x, do, dS_final, t, "full")
        return states_in, vnew, dstates_out, dvnew, d_initial
    ts, P = cp.segment_tiling(t), t.segments
    M, S_in = segments
    xs, dos = x.split(P), cp.split(do, P)
    _, states_in, vnew = sweeps.sweep(xs, S_in.reshape(ts.B, *S_in.shape[2:]), ts.residual_tiling,
                                      "residuals")
    own = sweeps.reverse(xs, dos, jnp.zeros_like(S_in).reshape(ts.B, *S_in.shape[2:]), ts, "final")
    dS_out = cp.join_backward(own, M, dS_final, t)
    dstates_out, dvnew, d_in = sweeps.reverse(xs, dos, dS_out.reshape(ts.B, *S_in.shape[2:]), ts, "full")
    d_initial = d_in.reshape(t.B, P, *d_in.shape[1:])[:, 0]
    return (cp.merge(states_in, P), cp.merge(vnew, P), cp.merge(dstates_out, P), cp.merge(dvnew, P),
            d_initial)


def _chunked_bwd(t, res, cotangents):
    q, k, v, g, beta, initial_state, docs, T, segments, kept = res
    do, dS_final = cotangents
    mm_dtype = _mm_dtype(q.dtype)
    x = SWEEPS[t.sweeps].prepare(Chunks(q, k, v, g, beta, docs, None), t, T=T,
                                 kept=None if kept is None else kept[2])
    states_in, vnew, dstates_out, dvnew, d_initial = _states_and_cotangents(
        x, initial_state, segments, kept, do, dS_final, t)
    t_dvn, dq, dk, dG, dbeta = CHUNK_GRADS[t.key_grads](q, k, v, g, beta, docs, T, do, vnew, dvnew,
                                                        states_in, dstates_out, t, mm_dtype)
    dv = t_dvn[..., :v.shape[-1]].astype(jnp.float32) * beta[..., None]  # d(beta V) = T^T dVnew
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, 2), 2), 2)  # g -> G is a cumsum within each chunk
    if t.group > 1:  # value heads that share a q/k head add their gradients
        dq = dq.reshape(*dq.shape[:3], t.H, t.group, t.key_width).sum(4)
        dk = dk.reshape(*dk.shape[:3], t.H, t.group, t.key_width).sum(4)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, d_initial, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


VALUE_MULTIPLE = 64  # the widest value tile every backend's kernels step V by (block_v, inner_block_v)


def padded_head_dims(K: int, V: int) -> tuple[int, int]:
    """The head dims the kernels see. K: a power of two >= 16, since every kernel loads whole [C, K]
    tiles and Triton's tiles are powers of two. V: the same up to 64, above that a multiple of 64,
    since the kernels only ever load [., 32 / 64 / 128]-column slices of V-wide arrays: the paper's
    V = 400 runs as 448 (7 tiles of 64), not 512."""
    pow2 = lambda n: max(16, 1 << (n - 1).bit_length())
    Vp = pow2(V) if V <= VALUE_MULTIPLE else -(-V // VALUE_MULTIPLE) * VALUE_MULTIPLE
    return pow2(K), Vp


def _pad_last(x, size):
    pad = size - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _sm_count() -> int:
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or 132


def default_segments(*, B, HV, N, K, V, block_v) -> int:
    """Segments for context parallelism: enough (batch, head, value tile) programs to give every SM
    about two, keeping at least 8 chunks per segment. The sweeps of a segmented call do about three
    times the column work (the transition pass carries K extra columns), so segments pay only where
    the unsegmented grid leaves most SMs idle."""
    programs = B * HV * (V // block_v)
    P = 1
    while programs * P * 2 <= _sm_count() and N % (2 * P) == 0 and N // (2 * P) >= 8:
        P *= 2
    return P if K % block_v == 0 else 1


def _mosaic_on_gpu_up_to_128(sweeps, K, V, interpret, values=False) -> bool:
    """Where the measured Mosaic defaults apply: Mosaic sweeps on a GPU with padded K (and, for the
    fused gradient kernel, V) at most 128, what their shared-memory budgets allow."""
    Kp, Vp = padded_head_dims(K, V)
    return sweeps == "mosaic" and not interpret and Kp <= 128 and (not values or Vp <= 128)


# Shared memory per SM that a Triton kernel may ask for on Hopper (H100 / H200: 227 KiB).
HOPPER_SHARED_BYTES = 232448


def two_sweep_stages_fit(*, C, K, BV, itemsize) -> bool:
    """Whether two software-pipelining stages of a Triton sweep fit shared memory: each stage holds
    three [C, K] tiles (q, k, W) and one [C, BV] tile, and the [K, BV] state is staged once as a
    matmul operand. Calibrated on the GPUs' answers (docs/benchmarks.md): the sweeps at bf16,
    K = 256, BV = 32 fitted on an H200 (this estimate 221184 bytes) and at float32, K = 128, BV = 32 on
    an H100 (229376, commit 9d08e82's feature check); with a fourth [C, C] tile per stage Triton asked
    for 233984 bytes (estimate 237568) and failed (run L). Interpret mode and the CPU lowering
    cannot see this limit, so the rule is written down here rather than found on a GPU."""
    estimate = 2 * itemsize * C * (3 * K + BV) + itemsize * K * BV
    return estimate <= HOPPER_SHARED_BYTES


def make_tiling(*, B, T, H, HV, K, V, chunk_size, scale, has_docs, dtype, sweeps="triton",
                block_v=None, residual_block_v=None, inner_block_v=None, block_k=64, num_warps=4,
                num_stages=1, sweep_warps=4, sweep_stages=None, mosaic_stages=None,
                mosaic_warpgroups=None, reverse_warpgroups=None, key_grads=None, keep_residuals=False,
                split_output=None, mosaic_prepare=False, segments=None, loop_stages=None,
                interpret=None) -> Tiling:
    """The launch spec for head dims K, V (padded here: `padded_head_dims`), with the defaults below
    filled in. The keyword launch parameters are those `pallas_gated_delta_rule` passes on."""
    if sweeps not in SWEEPS:
        raise ValueError(f"sweeps must be one of {tuple(SWEEPS)}, got {sweeps!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if mosaic_warpgroups is None:
        # H200, 2026-12-03 (docs/benchmarks.md): the warp-specialised forward sweep took the
        # forward from 0.549 to 0.450 ms at (4, 4096, 16, 128, 128) and 0.519 to 0.421 ms at the
        # GVA shape; it fits shared memory up to K = 128. Not by default in interpret mode: jax
        # 0.12.0.1's GPU interpreter hangs in its barriers at K = 128 once the grid has two
        # programs (it keeps shared-memory state across programs, a TODO in its source), where the
        # GPU runs it correctly; tests name mosaic_warpgroups=2 explicitly at shapes it runs.
        mosaic_warpgroups = 2 if _mosaic_on_gpu_up_to_128(sweeps, K, V, interpret) else 1
    # H200, 2026-12-03 run K (docs/benchmarks.md): the warp-specialised reverse sweep and the fused
    # pair + key gradient kernel together took (4, 4096, 16, 128, 128) from 1.214 to 1.134 ms
    # forward+backward (three interleaved rounds, ranges 1.209-1.220 and 1.130-1.138) and Qwen3-Next's
    # layer from 1.355 to 1.278. GPU only, like the forward's warpgroups (the interpreter's barriers).
    if reverse_warpgroups is None:
        reverse_warpgroups = 2 if _mosaic_on_gpu_up_to_128(sweeps, K, V, interpret) else 1
    if key_grads is None:
        key_grads = "fused" if _mosaic_on_gpu_up_to_128(sweeps, K, V, interpret, values=True) else "triton"
    for name, value in (("mosaic_warpgroups", mosaic_warpgroups), ("reverse_warpgroups", reverse_warpgroups)):
        if value not in (1, 2):
            raise ValueError(f"{name} must be 1 or 2, got {value!r}")
    if key_grads not in CHUNK_GRADS:
        raise ValueError(f"key_grads must be one of {tuple(CHUNK_GRADS)}, got {key_grads!r}")
    if split_output and sweeps != "triton":
        raise ValueError(f"split_output runs on the Triton sweeps only, got sweeps={sweeps!r}")
    Kp, Vp = padded_head_dims(K, V)
    N = T // chunk_size
    # Defaults measured on an H100 (docs/benchmarks.md, "Where the time goes").
    if block_v is None:
        block_v = 64 if sweeps == "mosaic" else 32
    block_v = min(block_v, Vp)
    if inner_block_v is None:
        inner_block_v = 128 if Kp <= 128 and Vp % 128 == 0 else 64
    if residual_block_v is None:
        # H200, 2026-12-03 run K (per-kernel breakdown): at K = 256 the residual sweep took 0.584 ms
        # at block_v 64 against 0.672 at 32 (fla_gdn_1.3b's layer) and 0.627 against 0.859 (the
        # paper's), while the output and reverse sweeps were no faster or slower at 64.
        residual_block_v = 64 if sweeps == "triton" and Kp > 128 else block_v
    residual_block_v = min(residual_block_v, Vp)
    itemsize = _mm_dtype(dtype).itemsize
    if loop_stages is None:
        # H200, 2026-12-03 run M (docs/benchmarks.md): the Triton gradient kernels' value-tile loop
        # pipelined three deep took fla_gdn_1.3b's layer (K = 256) from 3.319 to 2.548 ms
        # forward+backward and the paper's (K = 200) from 4.522 to 3.476 (FLA: 3.244 and 4.431);
        # two deep gave 2.669 and 3.609. Measured with bf16 inputs only: float32 tiles are twice
        # the shared memory, so they keep the unrolled loop.
        loop_stages = 3 if sweeps == "triton" and Kp > 128 and itemsize == 2 else 1
    if not isinstance(loop_stages, int) or loop_stages < 1:
        raise ValueError(f"loop_stages must be an integer >= 1, got {loop_stages!r}")
    if split_output is None:
        # H200, 2026-12-04 (docs/benchmarks.md, "Kernels v2 re-measured"), forward+backward with the
        # forward's outputs live: fla_gdn_1.3b's layer (K = 256, V = 512) 3.291 -> 2.666 ms (FLA
        # 3.248), the paper's (K = 200, V = 400) 4.523 -> 3.610 (FLA 4.417), (2, 4096, 6, 256, 512)
        # 1.972 -> 1.561; forward alone 0.919 -> 0.980, 1.328 -> 1.156, 0.597 -> 0.632. The price is
        # memory: 2 (K V / C + V) bytes per token and value head held from forward to backward
        # (~0.5 GB a layer at fla_gdn_1.3b's B x T = 4 x 4096). Measured at 16-bit inputs only.
        split_output = sweeps == "triton" and Kp > 128 and itemsize == 2

    def stages_for(bv):  # given, or two where they fit shared memory
        if sweep_stages is not None:
            return sweep_stages
        return 2 if two_sweep_stages_fit(C=chunk_size, K=Kp, BV=bv, itemsize=itemsize) else 1

    sweep_stages, residual_stages = stages_for(block_v), stages_for(residual_block_v)
    if mosaic_stages is None:  # two stages of q, k [C, K] tiles fit shared memory up to K = 128
        mosaic_stages = 2 if Kp <= 128 else 1
    for name, value in (("block_v", block_v), ("residual_block_v", residual_block_v),
                        ("inner_block_v", min(inner_block_v, Vp))):
        if value < 16 or value & (value - 1) or Vp % value:
            raise ValueError(f"{name} must be a power of two >= 16 that divides the padded value "
                             f"dim {Vp} (V = {V}), got {value}")
    if segments is None:
        segments = default_segments(B=B, HV=HV, N=N, K=Kp, V=Vp, block_v=block_v)
    if segments != 1 and (segments < 1 or N % segments or Kp % block_v):
        raise ValueError(f"segments = {segments} must divide the {N} chunks, and block_v = {block_v} "
                         f"the key dim {Kp}")
    # The Triton kernels mask at the true head dims, so q, k, v need no padded copies; the Mosaic
    # ones (TMA tiles) read padded arrays.
    true_widths = sweeps == "triton" and key_grads == "triton"
    t = Tiling(B=B, N=N, C=chunk_size, H=H, HV=HV, K=Kp, V=Vp, BV=block_v,
               BK=min(block_k, Kp), scale=float(scale), has_docs=has_docs, BVI=min(inner_block_v, Vp),
               num_warps=num_warps, num_stages=num_stages, sweep_warps=sweep_warps,
               sweep_stages=sweep_stages, sweeps=sweeps, mosaic_stages=mosaic_stages,
               mosaic_warpgroups=mosaic_warpgroups, reverse_warpgroups=reverse_warpgroups,
               key_grads=key_grads,
               keep_residuals=bool(keep_residuals), split_output=bool(split_output),
               mosaic_prepare=bool(mosaic_prepare), segments=segments,
               interpret=bool(interpret), BVR=residual_block_v, residual_stages=residual_stages,
               loop_stages=loop_stages, Kd=K if true_widths else Kp, Vd=V if true_widths else Vp)
    if sweeps == "mosaic":
        reason = (mosaic_common.unsupported_reason(C=t.C, K=t.K, V=t.V, BV=t.BV, dtype=dtype)
                  or mosaic_common.unsupported_reason(C=t.C, K=t.K, V=t.V, BV=t.BVR, dtype=dtype))
        if reason is None and 2 in (mosaic_warpgroups, reverse_warpgroups) and t.K > 128:
            reason = f"the warp-specialised sweeps fit shared memory up to K = 128, got {t.K}"
        if reason is None and t.interpret and not mosaic_common.interpret_supported():
            reason = "Mosaic GPU's interpret mode (for running without a GPU) needs jax >= 0.12"
        if reason is not None:
            raise ValueError(f"the Mosaic GPU sweeps cannot run this call: {reason}")
    if key_grads in ("mosaic", "fused"):
        reason = mosaic_grads.unsupported_reason(C=t.C, K=t.K, V=t.V, dtype=dtype)
        if reason is None and t.interpret and not mosaic_common.interpret_supported():
            reason = "Mosaic GPU's interpret mode (for running without a GPU) needs jax >= 0.12"
        if reason is not None:
            raise ValueError(f"key_grads={key_grads!r} cannot run this call: {reason}")
    return t


_LAUNCH = contextvars.ContextVar("pallas_launch_defaults", default={})
# make_tiling's keywords that are launch parameters (the rest describe the call itself).
_LAUNCH_PARAMS = frozenset(inspect.signature(make_tiling).parameters) - {
    "B", "T", "H", "HV", "K", "V", "chunk_size", "scale", "has_docs", "dtype"}


@contextlib.contextmanager
def launch_defaults(**params):
    """Launch parameters (`make_tiling`'s keywords) for every Pallas call traced inside the block,
    e.g. `with launch_defaults(split_output=False): jax.jit(step).lower(...)`: how a model built on
    `gdn_jax.ops.gated_delta_rule` is tried with another launch without changing the op's
    signature. Parameters a call passes itself win. Only tracing sees them: a function compiled
    before the block keeps its launch. Unknown names raise ValueError here."""
    unknown = sorted(set(params) - _LAUNCH_PARAMS)
    if unknown:
        raise ValueError(f"launch_defaults: unknown launch parameter(s) {unknown}; "
                         f"known: {sorted(_LAUNCH_PARAMS)}")
    token = _LAUNCH.set({**_LAUNCH.get(), **params})
    try:
        yield
    finally:
        _LAUNCH.reset(token)


def pallas_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, reset, chunk_size, **launch):
    """Same contract as `gdn_jax.chunked.chunk_gated_delta_rule` (T a multiple of chunk_size).

    The kernels compute at head dims padded with zeros (`padded_head_dims`: K to a power of two, V to
    a multiple of the value tiles), which changes nothing: zero key/query columns add nothing to any
    product and zero value columns give zero outputs. The Triton kernels read q, k, v and write o,
    dq, dk at their true widths (masked loads and stores), so only the small state is padded; with a
    Mosaic kernel in the call, q, k, v are copied padded (TMA tiles of 64 columns).
    `launch` holds launch parameters only (see `make_tiling` for their defaults); every choice computes
    the same function:
      sweeps: "triton" or "mosaic", the lowering of the two sequential sweeps (SWEEPS);
      block_v, sweep_warps, sweep_stages: the sequential sweeps' value tile (default 32 on Triton, 64
        on Mosaic), warps and software-pipelining depth (default sweep_stages: 2, or 1 where 2 would
        not fit shared memory); residual_block_v: the backward's residual sweep's value tile
        (default 64 on Triton at K > 128, else block_v); mosaic_stages: chunks in flight in the
        Mosaic sweeps' TMA pipeline;
        mosaic_warpgroups: 2 runs the Mosaic forward sweep warp-specialised (a state group, an output
        group and a memory group) instead of in one warpgroup (default 2 where K <= 128 on a GPU,
        else 1); reverse_warpgroups: 2 runs the Mosaic reverse sweep warp-specialised (a state group,
        a helper group forming the dS-free products a chunk ahead, a memory group; default 1);
      key_grads: "triton" or "mosaic", the kernel that forms dq and dk after the Triton pair kernel,
        or "fused", one Mosaic kernel for both (CHUNK_GRADS);
      split_output: with one segment on the Triton sweeps, the forward runs the residual sweep
        (states entering each chunk and Vnew) and forms O in a chunk-parallel kernel
        (`forward.output_from_states`) instead of inside the sweep; a differentiated call keeps
        those residuals, so its backward has no residual sweep (the memory of keep_residuals;
        default: on with the Triton sweeps at K > 128 and 16-bit inputs, where it took
        forward+backward 19-20% faster, docs/benchmarks.md 2026-12-04; off elsewhere);
      mosaic_prepare: with the Mosaic sweeps, T = (I + A)^-1 on Mosaic too (mosaic_prepare.py;
        default False until measured);
      keep_residuals: with one segment, the forward of a differentiated call stores the states
        entering each chunk and Vnew (bf16) as it goes, and the backward skips its residual sweep
        (default False: it holds 2 (K V / C + V) bytes more per token and value head between forward
        and backward, and it measured slower on Mosaic at K = 128 and on Triton at K = 256: the output
        sweep's extra writes cost more than the residual sweep they save);
      inner_block_v, block_k, num_warps, num_stages: the chunk-parallel kernels' value-tile loop
        (default 128 at K <= 128 where it divides the padded V, else 64), key tile (of the key-tiled
        gradient kernel), warps and stages; loop_stages: 1 unrolls the Triton gradient kernels'
        loop over value tiles, n > 1 makes it a loop software-pipelined n deep (default 3 with the
        Triton sweeps at K > 128 and 16-bit inputs, else 1);
      segments: context parallelism, the number of sequence segments swept side by side (default:
        enough to fill the GPU when B * HV is small; see `default_segments`);
      interpret: run the kernels in Pallas interpret mode (default: when there is no GPU).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    tiling = make_tiling(B=B, T=T, H=H, HV=HV, K=K, V=V, chunk_size=chunk_size, scale=scale,
                         has_docs=reset is not None, dtype=q.dtype, **{**_LAUNCH.get(), **launch})
    N, C, Kp, Vp = tiling.N, tiling.C, tiling.K, tiling.V
    chunked = lambda x: x.reshape(B, N, C, *x.shape[2:])
    q_, k_ = (chunked(_pad_last(x, tiling.key_width)) for x in (q, k))
    v_ = chunked(_pad_last(v, tiling.value_width))
    g_, beta_ = (chunked(x.astype(jnp.float32)) for x in (g, beta))
    S0 = _pad_last(jnp.pad(initial_state, [(0, 0), (0, 0), (0, Kp - K), (0, 0)]), Vp)
    docs = () if reset is None else document_masks(reset, N, C)
    o, S = _chunked(q_, k_, v_, g_, beta_, S0, docs, tiling)
    return o.reshape(B, T, HV, -1)[..., :V], S[:, :, :K, :V]
