"""What the Mosaic GPU kernels share (mosaic_sweeps.py, mosaic_grads.py): availability, shared-memory
tiles, tensor-core products, the in-kernel decays of a chunk, and the gate rows they read.

The kernels run one warpgroup (or, warp-specialised, several) per program on wgmma with TMA copies.
Two constraints of Mosaic's layout inference shape this code: a shared-memory buffer is read in one
register layout only (so the gate vectors needed per row and per column arrive as two copies), and
a [M, N] -> [M * N] reshape of a register array defeats it (sum by rows, then over them). The
interpret mode of jax >= 0.12, which runs the same kernels on a CPU, takes neither register
operands nor pre-initialised accumulators, so every product starts from a zero accumulator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.layout import Tiling

try:  # Mosaic GPU ships with every supported jax; its interpret mode only with jax >= 0.12.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

CHUNK = 64  # wgmma's M: the chunk is one 64-row tile


# The kernels use Mosaic GPU Pallas as of jax 0.11 (jax 0.10's `plgpu.load` differs, for one).
MIN_JAX = (0, 11)


def interpret_supported() -> bool:
    return plgpu is not None and hasattr(plgpu, "InterpretGPUParams")


def unsupported_reason(*, C, K, V, BV, dtype) -> str | None:
    """Why a call (chunk size C, head dims K, V as the kernels see them, value tile BV, input dtype)
    cannot run on the Mosaic sweeps, or None if it can."""
    if plgpu is None or jax.__version_info__[:2] < MIN_JAX:
        return f"the Mosaic GPU sweeps need jax >= {MIN_JAX[0]}.{MIN_JAX[1]}, this is {jax.__version__}"
    if C != CHUNK:
        return f"chunk_size must be {CHUNK} (one wgmma tile), got {C}"
    if jnp.dtype(dtype).itemsize != 2:
        return f"q, k, v must be bfloat16 or float16 (wgmma operands), got {jnp.dtype(dtype).name}"
    if K % 64 or BV % 64 or V % BV:
        # block_v 32 (64-byte rows) fails Mosaic's layout inference in jax 0.11 and 0.12.
        return f"head dims and block_v must be multiples of 64 (got K={K}, V={V}, block_v={BV})"
    return None


def launch(t: Tiling):
    kw = {}
    if t.interpret:
        kw["interpret"] = plgpu.InterpretGPUParams()
    return kw


def tile(shape, dtype):
    """A shared-memory tile of this shape in the swizzled layout wgmma and TMA use without bank
    conflicts: tiles of 8 rows of (at most) 128 bytes."""
    width = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, width // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(width)))


def spec(shape, index_map):
    """A pipelined bf16 [rows, cols] tile (the matmul dtype; the transforms depend only on its width)."""
    return plgpu.BlockSpec(shape, index_map, transforms=tile(shape, jnp.bfloat16).transforms)


def mms(*products, overlap=None, interpret=False):
    """Independent products issued together and waited for once. Each product is
    (shape, [(a1, b1), (a2, b2), ...]) or (shape, [...], init): the sum of a_i @ b_i in one float32
    accumulator that starts at zero, or at init (a float32 array in the WGMMA register layout).
    Starting at init, as in S <- d S + K^T X, lets the accumulator take over init's registers:
    the state and the product never live side by side, which at K = 256 is 128 registers a
    thread less. (interpret: the GPU interpreter of jax 0.12 runs no wgmma inside run_state, so
    there init is added to a zero-started product instead; the same sum.) overlap: register work
    run while the tensor cores are busy; returns (products, its result)."""
    def issue(*accs):
        for acc, (_, pairs, *_) in zip(accs, products):
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)

    inits = [p[2] if len(p) > 2 else None for p in products]
    if any(i is not None for i in inits):
        # Mosaic takes preinitialised accumulators only through run_state, whose body returns
        # nothing: no register work can ride along.
        if overlap is not None:
            raise ValueError("mms: overlap cannot go with an initialised accumulator")
        if interpret:
            sums = mms(*(p[:2] for p in products))
            return tuple(s if i is None else s + i for s, i in zip(sums, inits))
        zeros = lambda shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
        accs = tuple(plgpu.ACC.init(zeros(p[0]) if i is None else i) for p, i in zip(products, inits))
        return tuple(pl.run_state(lambda accs: issue(*accs))(accs))

    def run(*accs):
        issue(*accs)
        extra = overlap() if overlap is not None else None
        return tuple(acc[...] for acc in accs), extra
    out, extra = pl.run_scoped(run, *(plgpu.ACC(p[0], jnp.float32) for p in products))
    return out if overlap is None else (out, extra)


def _state_buffer(shape):
    return tile(shape, jnp.float32)


def load_state(src):
    """A float32 [K, BV] state tile from global memory into wgmma registers. Its staging buffer is
    scoped to this load, so the pipeline that follows reuses the shared memory."""
    def run(buf, bar):
        plgpu.copy_gmem_to_smem(src, buf, bar)
        plgpu.barrier_wait(bar)
        return plgpu.load(buf, layout=plgpu.Layout.WGMMA)
    return pl.run_scoped(run, _state_buffer(src.shape), plgpu.Barrier())


def store_state(S, dst):
    def run(buf):
        buf[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst)
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(run, _state_buffer(dst.shape))


def gate_specs(index_map, has_docs):
    """Pipeline specs of a chunk's gate vectors: G twice, beta, and with documents rel twice. Each
    shared-memory buffer is read in one register layout only (Mosaic's layout inference), so the
    vectors needed both per row and per column arrive twice."""
    return [plgpu.BlockSpec((CHUNK,), index_map)] * (3 + 2 * has_docs)


def gate_srcs(G_ref, beta_ref, rel_ref, b, hv):
    G = G_ref.at[b, hv, :]
    return [G, G, beta_ref.at[b, hv, :]] + ([rel_ref.at[b, :]] * 2 if rel_ref is not None else [])


def program_ids(t: Tiling):
    """(batch, value head, q/k head, value-tile slice) of this program of the (B*HV, V/BV) grid."""
    bh, j = lax.axis_index("bh"), lax.axis_index("vt")
    b, hv = bh // t.HV, bh % t.HV
    return b, hv, hv // t.group, pl.ds(j * t.BV, t.BV)


def chunk_program_ids(t: Tiling):
    """(chunk, batch, value head, q/k head, the chunk's rows) of this program of the (N, B*HV) grid
    of the chunk-parallel Mosaic kernels."""
    n, bh = lax.axis_index("n"), lax.axis_index("bh")
    b, hv = bh // t.HV, bh % t.HV
    return n, b, hv, hv // t.group, pl.ds(n * t.C, t.C)


# ---- the chunk ring of the warp-specialised sweeps: a memory warpgroup keeps `stages` chunks of
# q, k, one [C, BV] tile (v forward, dO backward), T and the gate rows in flight for two compute
# warpgroups.

def chunk_ring(t: Tiling, dt, has_docs: bool, stages: int):
    """The ring's shared-memory buffers, each with a leading slot axis of `stages`."""
    C = t.C
    tiles = [tile((stages, *shape), dt) for shape in ((C, t.K), (C, t.K), (C, t.BV), (C, C))]
    return tiles + [plgpu.SMEM((stages, C), jnp.float32)] * (3 + 2 * has_docs)


def ring_srcs(q_ref, k_ref, x_ref, T_ref, G_ref, beta_ref, rel_ref, b, hv, h, vs):
    """The whole-sequence sources of a program's ring, in chunk_ring's order (x: v or dO)."""
    return [q_ref.at[b, :, h, :], k_ref.at[b, :, h, :], x_ref.at[b, :, hv, vs], T_ref.at[b, :, hv, :],
            *gate_srcs(G_ref, beta_ref, rel_ref, b, hv)]


def ring_barriers(ring, stages: int):
    """loaded (one arrival per TMA copy of a chunk) and consumed (both compute groups are done)."""
    return [plgpu.Barrier(num_arrivals=len(ring), num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages)]


def ring_slot(ring, stages: int, i):
    """(slot, that slot's views of the ring's buffers) of the i-th chunk handled."""
    slot = i % stages
    return slot, [buf.at[slot] for buf in ring]


def ring_producer(srcs, ring, loaded, consumed, *, stages: int, N: int, C: int, reverse=False):
    """The memory warpgroup's loop: the i-th chunk handled (chunk N-1-i with reverse) is copied
    into its slot once both compute groups have released what that slot held."""
    # 128 threads x (232 + 232 + 40) registers: the compute groups get what this group frees.
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, N)
    def _(i):
        n = N - 1 - i if reverse else i
        slot, dsts = ring_slot(ring, stages, i)

        @pl.when(i >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])
        for src, dst in zip(srcs, dsts):
            plgpu.copy_gmem_to_smem(src.at[pl.ds(n * C, C)], dst, loaded.at[slot])


class ChunkDecays:
    """The decays of one chunk in wgmma register layouts, from its G (in-chunk cumulative log-decay)
    and, with documents, rel (document index relative to the one the entering state belongs to),
    given as the buffers of `gate_specs` (beta's is read by the sweeps). Masks are applied before
    every exp, so no masked entry can overflow."""

    def __init__(self, gates):
        C = CHUNK
        G_s, Gc_s, self.beta_s, *rels = gates
        row_l, col_l = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
        self.G_row = plgpu.load(G_s, layout=row_l)
        self.G_col = plgpu.load(Gc_s, layout=col_l)
        self.G_last = G_s[C - 1]
        rows = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=plgpu.Layout.WGMMA)
        self.lower = cols <= rows                       # j <= r
        self.upper = rows <= cols                       # r <= j (the transpose's support)
        keep_in = keep_out = None
        keep_chunk = True
        if rels:
            r_row = plgpu.load(rels[0], layout=row_l)
            r_col = plgpu.load(rels[1], layout=col_l)
            rel_last = rels[0][C - 1]
            same = self.row(r_row, C) == self.col(r_col, C)
            self.lower = self.lower & same
            self.upper = self.upper & same
            keep_in, keep_out, keep_chunk = r_row == 0.0, r_row == rel_last, rel_last == 0.0
        self.d_in = self._masked_exp(self.G_row, keep_in)
        self.d_out = self._masked_exp(self.G_last - self.G_row, keep_out)
        self.d_chunk = jnp.where(keep_chunk, jnp.exp(self.G_last), 0.0)

    def beta(self, width):
        """beta per row, broadcast to [C, width]."""
        return self.row(plgpu.load(self.beta_s, layout=plgpu.Layout.WGMMA.reduce(1)), width)

    @staticmethod
    def _masked_exp(x, keep):
        return jnp.exp(x) if keep is None else jnp.exp(jnp.where(keep, x, -jnp.inf))

    @staticmethod
    def row(x, width):
        """[C] per-row vector broadcast to [C, width]."""
        return lax.broadcast_in_dim(x, (CHUNK, width), [0])

    @staticmethod
    def col(x, rows):
        """[C] per-column vector broadcast to [rows, C]."""
        return lax.broadcast_in_dim(x, (rows, CHUNK), [1])

    def gamma(self):
        """Gamma_rj = exp(G_r - G_j) for j <= r in one document, else 0."""
        diff = self.row(self.G_row, CHUNK) - self.col(self.G_col, CHUNK)
        return jnp.exp(jnp.where(self.lower, diff, -jnp.inf))

    def gamma_t(self):
        """Gamma^T: entry (j, r) = Gamma_rj."""
        diff = self.col(self.G_col, CHUNK) - self.row(self.G_row, CHUNK)
        return jnp.exp(jnp.where(self.upper, diff, -jnp.inf))


def ring_program(t: Tiling, q_ref, k_ref, x_ref, T_ref, G_ref, beta_ref, rel_ref, ring, loaded,
                 consumed, *, reverse=False):
    """The common start of a warp-specialised sweep: this program's ids, its warpgroup, and the
    memory warpgroup (wg 2) running the ring's producer over q, k, x (v or dO), T and the gates.
    Returns (b, hv, h, vs, wg, stage), stage(i) = ring_slot(ring, t.mosaic_stages, i)."""
    b, hv, h, vs = program_ids(t)
    wg = lax.axis_index("wg")
    srcs = ring_srcs(q_ref, k_ref, x_ref, T_ref, G_ref, beta_ref, rel_ref, b, hv, h, vs)
    stages = t.mosaic_stages

    @pl.when(wg == 2)
    def _memory():
        ring_producer(srcs, ring, loaded, consumed, stages=stages, N=t.N, C=t.C, reverse=reverse)

    return b, hv, h, vs, wg, lambda i: ring_slot(ring, stages, i)


def _rows_by_head(x, t: Tiling):
    """[B, N, C, HV] -> [B, HV, T] float32 rows (TMA needs the time axis contiguous)."""
    return jnp.moveaxis(x.reshape(t.B, t.N * t.C, t.HV), 1, 2).astype(jnp.float32)


def gate_rows(g, beta, docs, t: Tiling):
    """G (in-chunk cumsum of g) and beta as [B, HV, T] rows, and with documents rel [B, T]: each
    position's document index counted from the one the entering state belongs to (0: the state
    reaches it). From the chunk's own doc and reach_in (kernels_pallas.gated_delta_rule.document_masks),
    so it stays right when the chunks are regrouped into sequence segments."""
    G = _rows_by_head(jnp.cumsum(g, axis=2), t)
    beta_rows = _rows_by_head(beta, t)
    rel = None
    if docs:
        doc, reach_in = docs[0], docs[1]  # [B, N, C]
        rel = doc - doc[..., :1] + (1 - reach_in[..., :1].astype(doc.dtype))
        rel = rel.reshape(t.B, t.N * t.C).astype(jnp.float32)
    return G, beta_rows, rel


def flat(x):
    """[B, N, C, heads, D] -> [B, T, heads, D]."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])
