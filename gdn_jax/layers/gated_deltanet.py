"""Gated DeltaNet mixer (Yang, Kautz, Hatamizadeh, ICLR 2025) and DeltaNet (the same without decay).

For input x [B, T, d]:
    q, k = silu(conv(x W_q)), silu(conv(x W_k))      [B, T, H, K], then L2-normalised in float32
    v    = silu(conv(x W_v))                          [B, T, HV, V]
    beta = sigmoid(x W_b)                             [B, T, HV]   (2 sigmoid with allow_neg_eigval)
    g    = -exp(A_log) * softplus(x W_a + dt_bias)    [B, T, HV]   (g = 0 for DeltaNet)
    o    = gated_delta_rule(q, k, v, g, beta)         S_t = e^{g_t}(I - beta_t k_t k_t^T)S_{t-1} + beta_t k_t v_t^T
    y    = (RMSNorm_head(o) * w * silu(x W_gate)) W_o
Init as in FLA: normal(0.02) projections and convs, A ~ U(0, 16), dt ~ logU(1e-3, 0.1) with
dt_bias = softplus^{-1}(dt).

Inference copies (gdn_jax/inference.py, fuse=True) compute the six input projections as one matmul.
Decoding steps through `gdn_jax.ops.decode_recurrence`, which reads the state once for both of its
products.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gdn_jax import context_parallel
from gdn_jax.layers.conv import ShortConv
from gdn_jax.layers.mlp import FusedLinear, linear
from gdn_jax.layers.norms import GatedRMSNorm, small_param
from gdn_jax.ops import decode_recurrence, gated_delta_rule
from gdn_jax.reference import repeat_heads
from kernels_pallas import launch_defaults

_HIGHEST = jax.lax.Precision.HIGHEST
# The recurrence's output o, named so a remat policy can keep it (gdn_jax/model.py's "dots_gdn").
OUTPUT_NAME = "gdn_output"
# The output gate's product rmsnorm(o) w silu(z), o_proj's input: kept by "dots_gdn_acts" and
# the policies after it.
GATED_NORM_NAME = "gdn_gated_norm"
# q, k, v as the recurrence takes them (after the convs and the L2 norms): kept by
# "dots_gdn_mixer" and "dots_gdn_all".
INPUTS_NAME = "gdn_inputs"


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def init_decay_params(key: jax.Array, num_heads: int, a_min: float = 0.0, a_max: float = 16.0,
                      dt_min: float = 1e-3, dt_max: float = 0.1):
    """(A_log, dt_bias) per head: A ~ U(a_min, a_max), dt ~ logU(dt_min, dt_max) floored at 1e-4."""
    k_a, k_dt = jax.random.split(key)
    A = jax.random.uniform(k_a, (num_heads,), jnp.float32, a_min, a_max)
    u = jax.random.uniform(k_dt, (num_heads,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, 1e-4)
    inv_softplus_dt = dt + jnp.log(-jnp.expm1(-dt))
    return jnp.log(A), inv_softplus_dt


class GatedDeltaNet(nnx.Module):
    """The "G" mixer; with decay=False it is the "D" (DeltaNet) mixer. Config fields gdn_*."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, decay: bool = True):
        d, H, K = cfg.d_model, cfg.gdn_num_heads, cfg.gdn_head_dim
        HV, V = cfg.gdn_v_heads, cfg.gdn_v_dim
        dt, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.num_heads, self.head_dim, self.num_v_heads, self.v_dim = H, K, HV, V
        self.decay = decay
        self.allow_neg_eigval = cfg.gdn_allow_neg_eigval
        self.impl, self.chunk_size = cfg.gdn_impl, cfg.gdn_chunk_size
        # Launch parameters for the Pallas kernels this layer traces (kernels_pallas.launch_defaults),
        # as (name, value) pairs: a module's static attributes must hash (nnx's graphdef is a jit key).
        self.launch = () if cfg.gdn_split_output == "auto" else (("split_output", False),)
        self.decode_impl = "auto"  # the decode step's recurrence (impls.DECODE_IMPLS; for_inference sets it)
        self.dtype = dt
        self.q_proj = linear(d, H * K, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.k_proj = linear(d, H * K, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.v_proj = linear(d, HV * V, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.b_proj = linear(d, HV, ("embed", None), std=std, dtype=dt, rngs=rngs)
        if decay:
            self.a_proj = linear(d, HV, ("embed", None), std=std, dtype=dt, rngs=rngs)
            A_log, dt_bias = init_decay_params(rngs.params(), HV, a_max=cfg.gdn_A_init_max,
                                               dt_min=cfg.gdn_dt_init_min, dt_max=cfg.gdn_dt_init_max)
            self.A_log = small_param(A_log)
            self.dt_bias = small_param(dt_bias)
        W = cfg.gdn_conv_size
        self.q_conv = ShortConv(H * K, W, std=std, impl=cfg.conv_impl, rngs=rngs)
        self.k_conv = ShortConv(H * K, W, std=std, impl=cfg.conv_impl, rngs=rngs)
        self.v_conv = ShortConv(HV * V, W, std=std, impl=cfg.conv_impl, rngs=rngs)
        self.g_proj = linear(d, HV * V, ("embed", "heads"), std=std, dtype=dt, rngs=rngs)
        self.o_norm = GatedRMSNorm(V, eps=cfg.norm_eps, norm_before_gate=True)
        self.o_proj = linear(HV * V, d, ("heads", "embed"), std=std, dtype=dt, rngs=rngs)
        self.in_proj = nnx.data(None)  # FusedLinear of the input projections, inference only

    def _input_projections(self) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj", "b_proj") + (("a_proj",) if self.decay else ()) + (
            "g_proj",)

    def fuse_for_inference(self):
        if self.in_proj is not None:  # fused already
            return
        names = self._input_projections()
        self.in_proj = FusedLinear([getattr(self, n) for n in names])
        for n in names:
            setattr(self, n, None)

    def _project(self, x):
        """Pre-activation q, k, v, beta, a (None without decay) and output gate of x [..., d]."""
        if self.in_proj is None:
            parts = [getattr(self, n)(x) for n in self._input_projections()]
        else:
            parts = self.in_proj(x)
        if not self.decay:
            parts.insert(4, None)
        return parts

    def _gates(self, b_raw, a_raw):
        """beta and g (float32), [..., HV], from their projections."""
        beta = jax.nn.sigmoid(b_raw.astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        if self.decay:
            a = a_raw.astype(jnp.float32) + self.dt_bias[...]
            g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)
        else:
            g = jnp.zeros_like(beta)
        return g, beta

    def _output(self, o, gate_raw):
        with jax.named_scope("out_norm_gate"):
            y = self.o_norm(o, gate_raw.reshape(*o.shape)).astype(self.dtype)
            y = checkpoint_name(y, GATED_NORM_NAME)
        with jax.named_scope("out_proj"):
            return self.o_proj(y.reshape(*o.shape[:-2], -1))

    def __call__(self, x_BxTxD: jax.Array, *, segment_ids=None, positions=None, cache_len=None):
        """Returns (y [B, T, d], cache or None); cache_len (any int) asks for the decode cache.

        Under a mesh with a `context` axis (gdn_jax/context_parallel.py) each device convolves and
        sweeps its own share of T, with the conv's halo and the entering state from the devices
        before it."""
        del positions
        with jax.named_scope("in_proj"):
            q_raw, k_raw, v_raw, b_raw, a_raw, gate_raw = self._project(x_BxTxD)
        with jax.named_scope("gates"):
            g, beta = self._gates(b_raw, a_raw)
        if context_parallel.context_size() > 1:
            if cache_len is not None:
                raise ValueError("GatedDeltaNet: prefill (cache_len) does not run context-parallel; "
                                 "use a mesh without a context axis")
            mix = context_parallel.over_context(self._mix_segment)
            return self._output(mix(q_raw, k_raw, v_raw, g, beta, segment_ids), gate_raw), None
        want = cache_len is not None
        with jax.named_scope("short_conv"):
            q, cq = self.q_conv(q_raw, segment_ids=segment_ids, return_cache=want)
            k, ck = self.k_conv(k_raw, segment_ids=segment_ids, return_cache=want)
            v, cv = self.v_conv(v_raw, segment_ids=segment_ids, return_cache=want)
        with jax.named_scope("qk_l2norm"):
            q, k, v = checkpoint_name(self._heads(q, k, v), INPUTS_NAME)
        with jax.named_scope("gated_delta_rule"), launch_defaults(**dict(self.launch)):
            o, S = gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids,
                                    output_final_state=want, chunk_size=self.chunk_size, impl=self.impl)
            o = checkpoint_name(o, OUTPUT_NAME)
        cache = dict(conv_q=cq, conv_k=ck, conv_v=cv, state=S) if want else None
        return self._output(o, gate_raw), cache

    def _heads(self, q, k, v):
        """Conv outputs [B, T, ...] -> L2-normalised q, k [B, T, H, K] and v [B, T, HV, V]."""
        B, T = q.shape[:2]
        q = l2_normalize(q.reshape(B, T, self.num_heads, self.head_dim))
        k = l2_normalize(k.reshape(B, T, self.num_heads, self.head_dim))
        return q, k, v.reshape(B, T, self.num_v_heads, self.v_dim)

    def _mix_segment(self, q_raw, k_raw, v_raw, g, beta, segment_ids):
        """One device's share of the convs and the recurrence, inside context_parallel.over_context."""
        W = self.q_conv.kernel_size
        halo = lambda x: context_parallel.from_previous(x, W - 1)
        seg_halo = None if segment_ids is None else halo(segment_ids)
        q, k, v = (conv(x, segment_ids=segment_ids, cache=halo(x), cache_segment_ids=seg_halo)[0]
                   for conv, x in ((self.q_conv, q_raw), (self.k_conv, k_raw),
                                   (self.v_conv, v_raw)))
        q, k, v = self._heads(q, k, v)
        o, _ = context_parallel.gated_delta_rule_segment(
            q, k, v, g, beta, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
        return o

    def step(self, x_BxD: jax.Array, cache: dict, *, pos=None, t=None):
        """One token: (y [B, d], new cache)."""
        del pos, t
        B = x_BxD.shape[0]
        q_raw, k_raw, v_raw, b_raw, a_raw, gate_raw = self._project(x_BxD)
        q, cq = self.q_conv.step(q_raw, cache["conv_q"])
        k, ck = self.k_conv.step(k_raw, cache["conv_k"])
        v, cv = self.v_conv.step(v_raw, cache["conv_v"])
        q = l2_normalize(q.reshape(B, self.num_heads, self.head_dim))
        k = l2_normalize(k.reshape(B, self.num_heads, self.head_dim))
        v = v.reshape(B, self.num_v_heads, self.v_dim)
        g, beta = self._gates(b_raw, a_raw)
        o, S = decode_recurrence(q, k, v, g, beta, cache["state"], impl=self.decode_impl)
        return self._output(o, gate_raw), dict(conv_q=cq, conv_k=ck, conv_v=cv, state=S)


class DeltaNet(GatedDeltaNet):
    """The "D" mixer: GatedDeltaNet without a_proj / A_log / dt_bias, so g = 0 (no decay)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, decay=False)
