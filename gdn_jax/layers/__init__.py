"""Sequence mixers, norms and MLP. Every mixer follows one protocol (see docs/models.md):

    y, cache = mixer(x_BxTxD, segment_ids=None, positions=None, cache_len=None)
    y_BxD, cache = mixer.step(x_BxD, cache, pos=pos_B, t=t)
    mixer.fuse_for_inference()    # inference copies only: one matmul per group of projections
"""

from gdn_jax.layers.attention import Attention
from gdn_jax.layers.conv import ShortConv, document_index
from gdn_jax.layers.gated_deltanet import DeltaNet, GatedDeltaNet
from gdn_jax.layers.mamba2 import Mamba2
from gdn_jax.layers.mlp import SwiGLU
from gdn_jax.layers.norms import GatedRMSNorm, RMSNorm


def make_mixer(kind: str, cfg, *, rngs):
    """The mixer for one layer-pattern letter: G, D, M, S or A."""
    if kind == "G":
        return GatedDeltaNet(cfg, rngs=rngs)
    if kind == "D":
        return DeltaNet(cfg, rngs=rngs)
    if kind == "M":
        return Mamba2(cfg, rngs=rngs)
    if kind == "S":
        return Attention(cfg, window=cfg.window_size, rngs=rngs)
    if kind == "A":
        return Attention(cfg, window=None, rngs=rngs)
    raise ValueError(f"unknown mixer letter {kind!r}; known: G, D, M, S, A")


__all__ = ["Attention", "DeltaNet", "GatedDeltaNet", "GatedRMSNorm", "Mamba2", "RMSNorm",
           "ShortConv", "SwiGLU", "document_index", "make_mixer"]
