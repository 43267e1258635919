"""The language model: embedding -> blocks -> final RMSNorm -> LM head.

Each block is pre-norm: h += mixer(norm(h)); h += SwiGLU(norm(h)). The mixer of layer i is
cfg.mixers[i] ("G" GDN, "D" DeltaNet, "M" Mamba2, "S" sliding-window attention, "A" full attention).
Parameters are float32 with logical sharding names in their `out_sharding` metadata ("embed",
"vocab", "heads", "mlp", or None); activations compute in cfg.dtype; the residual stream, norms and
recurrent states stay float32; logits are float32.

Context parallelism: under a mesh with a `context` axis each sequence mixer runs on its device's
share of T (gdn_jax/context_parallel.py); everything else here works token by token.

Decoding: `prefill` runs the parallel path over a prompt and returns a cache; `step` advances one
token. The cache is a dict: {"layers": [per-layer dict], "pos": [B] int32 position of the next token
inside its document (RoPE), "t": int32 absolute index of the next token (KV slot)}.
gdn_jax/inference.py makes the decoding copy of an LM (weights stored in the compute dtype, optionally
fused projections); `tied_head` and `fuse_for_inference` below serve it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gdn_jax import context_parallel
from gdn_jax.layers import RMSNorm, SwiGLU, gated_deltanet, make_mixer, mlp
from kernels_pallas.gated_delta_rule import RESIDUALS_NAME

# A block's two pre-norm outputs (the inputs of its projections), kept by "dots_gdn_acts".
NORM_NAME = "block_norm"
_DOTS_GDN = (gated_deltanet.OUTPUT_NAME, RESIDUALS_NAME)
_ACTS = (NORM_NAME, mlp.PRODUCT_NAME, gated_deltanet.GATED_NORM_NAME)


def _dots_and(*names):
    """Save matmul outputs and the values named `names` (jax.ad_checkpoint.checkpoint_name)."""
    return jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names(*names))


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # matmul outputs, the GDN recurrence's output and what its kernels keep for their backward: the
    # backward recomputes only elementwise chains (norms, convs, gates, SwiGLU's product), never a
    # GDN kernel
    "dots_gdn": _dots_and(*_DOTS_GDN),
    # and the inputs of the projections' weight gradients: the two pre-norm outputs, SwiGLU's
    # product and the gated output norm (the backward then reruns only the convs, L2 norms and gates)
    "dots_gdn_acts": _dots_and(*_DOTS_GDN, *_ACTS),
    # "dots_gdn_acts" less SwiGLU's product (the widest of them) and plus the recurrence's inputs
    # q, k, v: the kernels' backward then starts without the convs, SiLUs and L2 norms rerun and
    # written out for it (their own backward still recomputes the conv outputs, inside its fusions)
    "dots_gdn_mixer": _dots_and(*_DOTS_GDN, NORM_NAME, gated_deltanet.GATED_NORM_NAME,
                                gated_deltanet.INPUTS_NAME),
    # every named activation: the block reruns only the gates and SwiGLU's silu
    "dots_gdn_all": _dots_and(*_DOTS_GDN, *_ACTS, gated_deltanet.INPUTS_NAME),
}


def positions_from_segments(segment_ids_BxT: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T] int32 position of each token inside its document (0 at each document start)."""
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
        return t
    starts = jnp.concatenate([jnp.ones((B, 1), bool),
                              segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class Block(nnx.Module):
    def __init__(self, cfg, kind: str, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt)
        self.mixer = make_mixer(kind, cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, std=cfg.init_std, dtype=dt, rngs=rngs)

    def __call__(self, h_BxTxD, segment_ids=None, positions=None, cache_len=None):
        # Named scopes label the compiled ops for profiles (bench/profile_summary.py); no effect
        # on what is computed.
        with jax.named_scope("mixer_norm"):
            x = checkpoint_name(self.mixer_norm(h_BxTxD), NORM_NAME)
        with jax.named_scope(type(self.mixer).__name__):
            y, cache = self.mixer(x, segment_ids=segment_ids, positions=positions,
                                  cache_len=cache_len)
        h_BxTxD = h_BxTxD + y.astype(jnp.float32)
        with jax.named_scope("mlp_norm"):
            x = checkpoint_name(self.mlp_norm(h_BxTxD), NORM_NAME)
        with jax.named_scope("mlp"):
            h_BxTxD = h_BxTxD + self.mlp(x).astype(jnp.float32)
        return h_BxTxD, cache

    def step(self, h_BxD, cache, *, pos, t):
        y, cache = self.mixer.step(self.mixer_norm(h_BxD), cache, pos=pos, t=t)
        h_BxD = h_BxD + y.astype(jnp.float32)
        h_BxD = h_BxD + self.mlp(self.mlp_norm(h_BxD)).astype(jnp.float32)
        return h_BxD, cache

    def fuse_for_inference(self):
        self.mixer.fuse_for_inference()
        self.mlp.fuse_for_inference()


def _block_forward(block, h, segment_ids, positions):
    return block(h, segment_ids, positions)[0]


class LM(nnx.Module):
    """`LM(cfg, rngs=nnx.Rngs(seed))(tokens_BxT, segment_ids=None)` -> float32 logits [B, T, V]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        emb = cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
        self.embedding = nnx.Param(emb.astype(jnp.float32), out_sharding=("vocab", "embed"),
                                   eager_sharding=False)
        self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.mixers])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=self.dtype)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            head = cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size))
            self.lm_head = nnx.Param(head.astype(jnp.float32), out_sharding=("embed", "vocab"),
                                     eager_sharding=False)
        # Inference copies of a tied model keep the float32 table for the lookup (B rows a step)
        # and read the head from this compute-dtype copy of it (gdn_jax/inference.py).
        self.tied_head = nnx.data(None)

    def _embed(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.float32)

    def head_weight(self) -> jax.Array:
        """The LM head as a [D, V] matrix in the compute dtype (the embedding's transpose when
        tied): logits = features @ head_weight()."""
        if self.lm_head is None:
            table = self.embedding if self.tied_head is None else self.tied_head
            return table[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def _logits(self, h):
        with jax.named_scope("final_norm"):
            x = self.final_norm(h)
        return jnp.einsum("...d,dv->...v", x, self.head_weight(), preferred_element_type=jnp.float32)

    def __call__(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        return self._logits(self._trunk(tokens_BxT, segment_ids))

    def features(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states [B, T, D] the head reads: `model(tokens)` equals
        `features(tokens) @ head_weight()` in float32. The fused LM loss (gdn_jax/losses.py) starts
        here, so the [B, T, V] logits never exist whole."""
        h = self._trunk(tokens_BxT, segment_ids)
        with jax.named_scope("final_norm"):
            return self.final_norm(h)

    def _trunk(self, tokens_BxT, segment_ids):
        B, T = tokens_BxT.shape
        # Per device over the context axis (the train step) a document's count carries over.
        positions = context_parallel.continue_positions(
            positions_from_segments(segment_ids, B, T), segment_ids)
        with jax.named_scope("embed"):
            h = self._embed(tokens_BxT)
        if self.cfg.remat == "none":
            block_fn = _block_forward
        else:
            block_fn = nnx.remat(_block_forward, policy=_REMAT_POLICIES[self.cfg.remat])
        for block in self.blocks:
            h = block_fn(block, h, segment_ids, positions)
        return h

    def prefill(self, tokens_BxT: jax.Array, segment_ids=None, *, cache_len: int,
                last_only: bool = False):
        """Parallel forward over a prompt. Returns (logits [B, T, V] float32, decode cache).

        cache_len: the most tokens (prompt + generated) the cache must serve; full-attention layers
        keep that many KV slots, SWA layers min(window, cache_len). The cache continues each row's
        last document.
        last_only: return logits [B, 1, V] of the last position only (what sampling needs), so the
        head never forms B x T x V logits for a long prompt.
        """
        B, T = tokens_BxT.shape
        positions = positions_from_segments(segment_ids, B, T)
        h = self._embed(tokens_BxT)
        caches = []
        for block in self.blocks:
            h, c = block(h, segment_ids, positions, cache_len=cache_len)
            caches.append(c)
        cache = dict(layers=caches, pos=positions[:, -1] + 1, t=jnp.asarray(T, jnp.int32))
        return self._logits(h[:, -1:] if last_only else h), cache

    def step(self, tokens_B: jax.Array, cache: dict):
        """One decode step: (logits [B, V] float32, new cache)."""
        h = self._embed(tokens_B)
        new_layers = []
        for block, c in zip(self.blocks, cache["layers"]):
            h, c = block.step(h, c, pos=cache["pos"], t=cache["t"])
            new_layers.append(c)
        return self._logits(h), dict(layers=new_layers, pos=cache["pos"] + 1, t=cache["t"] + 1)

    def fuse_for_inference(self):
        """Each block's projections of one input become one matmul (see gdn_jax/inference.py)."""
        for block in self.blocks:
            block.fuse_for_inference()


def count_params(cfg) -> int:
    """Exact number of parameters of LM(cfg), from shapes only (jax.eval_shape; nothing allocated)."""
    abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _mean_context(seq_len: int, window: int | None) -> float:
    """Average number of keys a query sees in a causal (optionally windowed) sequence of seq_len."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    Counts 6 * N_matmul, where N_matmul = every parameter except the embedding lookup table (the LM
    head matmul counts, tied or not), plus the sequence-mixing work the parameter count misses,
    each x3 for forward + backward:
      attention ("S", "A"): 4 * heads * head_dim * mean_context forward (QK^T and AV, causal,
        mean_context = average number of keys a query sees, windowed for SWA);
      GDN / DeltaNet ("G", "D"): 6 * K * V per value head forward (the recurrent form: k^T S,
        the rank-1 write, q^T S); the chunked algorithm's intra-chunk terms are not counted;
      Mamba2 ("M"): 4 * P * N per head forward (state write and read).
    """
    n = count_params(cfg)
    n_matmul = n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.d_model
    mixing = 0.0
    for kind in cfg.mixers:
        if kind in "SA":
            window = cfg.window_size if kind == "S" else None
            mixing += 4 * cfg.attn_num_heads * cfg.attn_head_dim * _mean_context(seq_len, window)
        elif kind in "GD":
            mixing += 6 * cfg.gdn_head_dim * cfg.gdn_v_dim * cfg.gdn_v_heads
        elif kind == "M":
            mixing += 4 * cfg.mamba_head_dim * cfg.mamba_d_state * cfg.mamba_num_heads
    return 6.0 * n_matmul + 3.0 * mixing
