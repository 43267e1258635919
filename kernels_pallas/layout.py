"""How the kernels see the data: chunked array layouts, tiling, and BlockSpecs.

Arrays travel chunk-major without copies, by reshaping T into (N, C):
  q, k      [B, N, C, H, K]          v, o, U, Vnew  [B, N, C, HV, V]
  g, beta   [B, N, C, HV] float32    W              [B, N, C, HV, K]
  doc, reach_in, reach_out  [B, N, C] (document index and the two survival masks; only with segments)
  per-chunk states          [B, N, HV, K, V] (chunk-major, so sequence segments split and merge by reshape)
Programs are indexed by (chunk n, batch-head bh) for chunk-parallel kernels and by (bh, value tile j)
for the kernels that walk the chunks in order; value head hv = bh % HV reads q/k head hv // (HV // H).
"""

from __future__ import annotations

from typing import NamedTuple

from jax.experimental import pallas as pl


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
    keep_residuals: bool = False  # Mosaic, one segment: the forward keeps states and Vnew for the backward
    segments: int = 1           # context parallelism: sequence segments swept side by side
    interpret: bool = False     # run every kernel in Pallas interpret mode (CPU)
    BVR: int = 0                # value tile of the backward's residual sweep (0: BV)
    residual_stages: int = 0    # its pipelining depth (0: sweep_stages)

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
    def qk_spec(self, key_tiled=False):
        width = self.BK if key_tiled else self.K
        return pl.BlockSpec((None, None, self.C, None, width),
                            lambda n, bh, kt=0: (bh // self.HV, n, 0, (bh % self.HV) // self.group, kt))

    def head_spec(self, width, key_tiled=False):
        """[C, width] of value head hv; key_tiled: width is BK and the block follows the key tile."""
        if key_tiled:
            return pl.BlockSpec((None, None, self.C, None, self.BK),
                                lambda n, bh, kt: (bh // self.HV, n, 0, bh % self.HV, kt))
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
