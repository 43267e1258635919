"""How the kernels see the data: chunked array layouts, tiling, and BlockSpecs.

Arrays travel chunk-major without copies, by reshaping T into (N, C):
  q, k      [B, N, C, H, K]          v, o, U, Vnew  [B, N, C, HV, V]
  g, beta   [B, N, C, HV] float32    W              [B, N, C, HV, K]
  doc, reach_in, reach_out  [B, N, C] (document index and the two survival masks; only with segments)
  per-chunk states          [B, N, HV, K, V] (chunk-major, so sequence segments split and merge by reshape)
Programs are indexed by (chunk n, batch-head bh) for chunk-parallel kernels and by (bh, value tile j)
for the kernels that walk the chunks in order; value head hv = bh % HV reads q/k head hv // (HV // H).

Head dims: the kernels compute at K and V padded to their tiles (`Tiling.K`, `Tiling.V`), while the
Triton kernels read and write the caller's arrays at their true widths (`Tiling.Kd`, `Tiling.Vd`:
q, k and dq, dk are Kd wide; v, dO and o are Vd wide) through masked loads that give zeros beyond
them and masked stores; arrays made inside the op (W, U, T, Vnew, states, ...) are padded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


class Tiling(NamedTuple):
    """Static shape and launch parameters of one call (hashable, so usable as a static argument).

    Two families of kernels are tuned apart: the sequential sweeps (one program per [K, BV] state
    tile, walking all chunks) and the chunk-parallel kernels (one program per chunk, or per chunk and
    key tile, looping over value tiles of width BVI inside).
    """
    B: int
    N: int
    C: int
    H: int
    HV: int
    K: int                      # padded to a power of two >= 16
    V: int                      # padded: a power of two >= 16 up to 64, else a multiple of 64
    BV: int                     # value-tile width of the sequential sweeps' programs
    BK: int                     # key-tile width of the key-tiled gradient kernel
    scale: float
    has_docs: bool
    BVI: int = 64               # value-tile width of the chunk-parallel kernels' inner loops
    num_warps: int = 4          # chunk-parallel kernels
    num_stages: int = 1
    sweep_warps: int = 4        # sequential sweeps
    sweep_stages: int = 1       # software-pipelining depth of the sweeps' loop over chunks
    sweeps: str = "triton"      # which lowering runs the two sequential sweeps (gated_delta_rule.SWEEPS)
    mosaic_stages: int = 2      # Mosaic sweeps: chunks in flight in the TMA pipeline
    mosaic_warpgroups: int = 1  # Mosaic forward sweep: 2 splits the state chain and the output
    reverse_warpgroups: int = 1  # Mosaic reverse sweep: 2 moves the dS-free products to a helper group
    key_grads: str = "triton"   # the backward's chunk-parallel kernels (gated_delta_rule.CHUNK_GRADS)
    mosaic_prepare: bool = False  # Mosaic sweeps: T = (I + A)^-1 on Mosaic as well (mosaic_prepare.py)
    keep_residuals: bool = False  # one segment: the forward keeps states and Vnew for the backward
    split_output: bool = False    # one segment, Triton: residual sweep + chunk-parallel output (kept)
    segments: int = 1           # context parallelism: sequence segments swept side by side
    interpret: bool = False     # run every kernel in Pallas interpret mode (CPU)
    BVR: int = 0                # value tile of the backward's residual sweep (0: BV)
    residual_stages: int = 0    # its pipelining depth (0: sweep_stages)
    loop_stages: int = 1        # gradient kernels' value-tile loop: 1 unrolled, n > 1 pipelined n deep
    Kd: int = 0                 # q, k (and dq, dk) as the caller holds them: true width (0: K)
    Vd: int = 0                 # v, dO and o: true width (0: V)

    @property
    def key_width(self) -> int:
        return self.Kd or self.K

    @property
    def value_width(self) -> int:
        return self.Vd or self.V

    def load_keys(self, ref, lead, start=0, size=None):
        """[C, size] columns start.. of a q/k-like ref (last dim Kd), zeros beyond Kd. Inside a loop,
        start must be traced (`traced_zero`)."""
        return _load_cols(ref, lead, start, size or self.K, self.key_width, self.K, self.C)

    def load_values(self, ref, lead, start, size):
        """[C, size] columns start.. of a v/dO-like ref (last dim Vd), zeros beyond Vd."""
        return _load_cols(ref, lead, start, size, self.value_width, self.V, self.C)

    def store_keys(self, ref, lead, start, size, value):
        _store_cols(ref, lead, start, size, self.key_width, self.K, value)

    def store_values(self, ref, lead, start, size, value):
        _store_cols(ref, lead, start, size, self.value_width, self.V, value)

    @property
    def residual_tiling(self) -> "Tiling":
        """This tiling as the backward's residual sweep runs it (its own value tile and stages)."""
        return self._replace(BV=self.BVR or self.BV, sweep_stages=self.residual_stages or self.sweep_stages)

    @property
    def sweep_launch(self) -> dict:
        return dict(num_warps=self.sweep_warps, num_stages=self.sweep_stages, interpret=self.interpret)

    @property
    def chunk_launch(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, interpret=self.interpret)

    @property
    def loop_launch(self) -> dict:
        """The chunk-parallel gradient kernels' launch: their value-tile loop is software-pipelined
        loop_stages deep when it is a loop (backward.over_value_tiles)."""
        return dict(self.chunk_launch, num_stages=max(self.num_stages, self.loop_stages))

    @property
    def group(self) -> int:
        return self.HV // self.H

    @property
    def value_tiles(self) -> int:
        return self.V // self.BV

    @property
    def chunk_grid(self) -> tuple[int, int]:
        return (self.N, self.B * self.HV)

    @property
    def key_tiled_grid(self) -> tuple[int, int, int]:
        # The key tile is the fastest grid axis, so the K/BK programs of one chunk run together and
        # share their [C, V] reads through L2 instead of each fetching them from memory.
        return (self.K // self.BK, self.N, self.B * self.HV)

    @staticmethod
    def key_tiled(spec):
        """A (n, bh, kt)-indexed BlockSpec of a chunk-parallel kernel, for the key-tiled grid."""
        return pl.BlockSpec(spec.block_shape, lambda kt, n, bh: spec.index_map(n, bh, kt))

    @property
    def sequential_grid(self) -> tuple[int, int]:
        return (self.B * self.HV, self.value_tiles)

    def heads(self, bh):
        """(batch, value head, q/k head) of program index bh."""
        b, hv = bh // self.HV, bh % self.HV
        return b, hv, hv // self.group

    # BlockSpecs for chunk-parallel kernels, grid (n, bh) or (n, bh, key tile kt).
    def qk_spec(self):
        """q or k of the program's q/k head, the whole (true) key width: [C, Kd]."""
        return pl.BlockSpec((None, None, self.C, None, self.key_width),
                            lambda n, bh, *_: (bh // self.HV, n, 0, (bh % self.HV) // self.group, 0))

    def value_spec(self):
        """v, dO or o of value head hv, the whole (true) value width: [C, Vd]."""
        return self.head_spec(self.value_width)

    def key_out_spec(self):
        """dq or dk of value head hv, [C, Kd] (each key-tiled program stores its BK columns)."""
        return self.head_spec(self.key_width)

    def head_spec(self, width):
        """[C, width] of value head hv."""
        return pl.BlockSpec((None, None, self.C, None, width),
                            lambda n, bh, *_: (bh // self.HV, n, 0, bh % self.HV, 0))

    def gate_spec(self):
        return pl.BlockSpec((None, None, self.C, None),
                            lambda n, bh, *_: (bh // self.HV, n, 0, bh % self.HV))

    def partial_spec(self):
        """[C] slot kt of a [B, N, C, HV, K // BK] array of per-key-tile partial sums."""
        return pl.BlockSpec((None, None, self.C, None, None),
                            lambda n, bh, kt: (bh // self.HV, n, 0, bh % self.HV, kt))

    def doc_spec(self):
        return pl.BlockSpec((None, None, self.C), lambda n, bh, *_: (bh // self.HV, n, 0))

    def state_spec(self, key_tiled=False):
        rows = self.BK if key_tiled else self.K
        return pl.BlockSpec((None, None, None, rows, self.V),
                            lambda n, bh, kt=0: (bh // self.HV, n, bh % self.HV, kt, 0))


def traced_zero():
    """0 as a traced value. Masked accesses may reach past the array's end, which is what the masks
    are for, but Pallas checks concrete slice bounds as if every access were unmasked: a masked
    access starts at a traced offset. Call it outside loops (the CPU interpreter resolves program ids
    only at the kernel's top level) and pass it in."""
    return pl.program_id(0) * 0


def _traced(start):
    return traced_zero() + start if isinstance(start, int) else start


def _cols_mask(start, size, true, rows):
    return start + jax.lax.broadcasted_iota(jnp.int32, (rows, size), 1) < true


def _load_cols(ref, lead, start, size, true, padded, rows):
    if true == padded:  # the array is as wide as the kernels' tiles: plain loads
        return ref[(*lead, pl.ds(start, size))]
    start = _traced(start)
    return pl_triton.load(ref.at[(*lead, pl.ds(start, size))], mask=_cols_mask(start, size, true, rows),
                          other=0)


def _store_cols(ref, lead, start, size, true, padded, value):
    if true == padded:
        ref[(*lead, pl.ds(start, size))] = value.astype(ref.dtype)
        return
    start = _traced(start)
    pl_triton.store(ref.at[(*lead, pl.ds(start, size))], value.astype(ref.dtype),
                    mask=_cols_mask(start, size, true, value.shape[0]))
