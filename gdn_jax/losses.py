"""The LM loss with the head fused in: cross-entropy of h W against integer targets, chunked over
tokens so that the [tokens, vocab] logits never exist in memory whole.

    loss = sum_t w_t (logsumexp(h_t W) - (h_t W)[y_t])        h [N, D], W [D, V], y, w [N]

`fused_cross_entropy_sum` computes it chunk by chunk (float32 logits of `chunk_tokens` rows at a
time) and keeps only each token's logsumexp for the backward, which recomputes a chunk's logits and
forms, with P = softmax(h W) - onehot(y) scaled by w,
    dh = P W^T,     dW = h^T P.
So training a 32K-vocabulary model at 16K tokens a step holds [chunk, V] logits instead of
[16K, V] (2.1 GB in float32), and reads them once in each direction. `reference_cross_entropy_sum`
is the plain version the tests compare against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def reference_cross_entropy_sum(h_NxD, W_DxV, targets_N, weights_N, *, compute_dtype=jnp.float32):
    """sum_t w_t CE_t with the whole [N, V] logits in memory (what `fused_cross_entropy_sum` avoids)."""
    logits = jnp.dot(h_NxD.astype(compute_dtype), W_DxV.astype(compute_dtype),
                     preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_N[:, None], axis=-1)[:, 0]
    return jnp.sum(weights_N * (lse - picked))


def _chunks(x, chunk):
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _logits(h, W, compute_dtype):
    return jnp.dot(h.astype(compute_dtype), W.astype(compute_dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, W, targets, weights, chunk, compute_dtype):
    return _forward(h, W, targets, weights, chunk, compute_dtype)[0]


def _forward(h, W, targets, weights, chunk, compute_dtype):
    def one(args):
        h_c, y_c, w_c = args
        logits = _logits(h_c, W, compute_dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum(w_c * (lse - picked)), lse

    sums, lse = jax.lax.map(one, (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    return jnp.sum(sums), lse.reshape(-1)


def _fused_fwd(h, W, targets, weights, chunk, compute_dtype):
    total, lse = _forward(h, W, targets, weights, chunk, compute_dtype)
    return total, (h, W, targets, weights, lse)


def _fused_bwd(chunk, compute_dtype, res, g):
    h, W, targets, weights, lse = res
    V = W.shape[1]

    def one(dW, args):
        h_c, y_c, w_c, lse_c = args
        P = jnp.exp(_logits(h_c, W, compute_dtype) - lse_c[:, None])
        P = (P - jax.nn.one_hot(y_c, V, dtype=P.dtype)) * (g * w_c)[:, None]
        P_c = P.astype(compute_dtype)
        dh_c = jnp.dot(P_c, W.astype(compute_dtype).T, preferred_element_type=jnp.float32)
        dW = dW + jnp.dot(h_c.astype(compute_dtype).T, P_c, preferred_element_type=jnp.float32)
        return dW, dh_c

    dW, dh = jax.lax.scan(one, jnp.zeros(W.shape, jnp.float32),
                          (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk),
                           _chunks(lse, chunk)))
    # The loss is piecewise constant in the integer targets; their cotangent is float0.
    zero_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (dh.reshape(h.shape).astype(h.dtype), dW.astype(W.dtype), zero_targets,
            jnp.zeros_like(weights))


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy_sum(h_NxD, W_DxV, targets_N, weights_N, *, chunk_tokens=2048,
                            compute_dtype=jnp.float32):
    """sum_t w_t CE_t of logits h W, chunked (see the module docstring). Differentiable in h and W
    (the weights are treated as constants: they are masks). N is padded to a multiple of the chunk
    with zero-weight rows. compute_dtype is the matmuls' operand dtype (accumulation is float32)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    N = h_NxD.shape[0]
    chunk = min(chunk_tokens, N)
    pad = -N % chunk
    if pad:
        h_NxD = jnp.pad(h_NxD, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        weights_N = jnp.pad(weights_N, (0, pad))
    return _fused(h_NxD, W_DxV, targets_N, weights_N.astype(jnp.float32), chunk, jnp.dtype(compute_dtype))


# ------------------------------------------------------------------ the LM losses the train step runs


def plain_lm_loss_sum(model, tokens_BxT, targets_BxT, mask_BxT, model_kwargs, *, chunk_tokens):
    """sum of masked token cross-entropies from the model's whole float32 [B, T, V] logits."""
    del chunk_tokens
    logits_BxTxV = model(tokens_BxT, **model_kwargs).astype(jnp.float32)
    with jax.named_scope("loss"):
        ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        return jnp.sum(ce_BxT * mask_BxT)


def fused_lm_loss_sum(model, tokens_BxT, targets_BxT, mask_BxT, model_kwargs, *, chunk_tokens):
    """The same sum through `fused_cross_entropy_sum` on model.features and model.head_weight():
    logits exist chunk_tokens rows at a time, in float32, with matmuls in the model's dtype."""
    h_BxTxD = model.features(tokens_BxT, **model_kwargs)
    D = h_BxTxD.shape[-1]
    with jax.named_scope("loss"):  # head matmuls included: the fused loss forms the logits
        return fused_cross_entropy_sum(h_BxTxD.reshape(-1, D), model.head_weight(),
                                       targets_BxT.reshape(-1), mask_BxT.reshape(-1),
                                       chunk_tokens=chunk_tokens, compute_dtype=model.dtype)


# train.loss names one of these (configs/experiment.py validates the name; the step looks it up).
LM_LOSSES = {"plain": plain_lm_loss_sum, "fused": fused_lm_loss_sum}


def check_model_supports(loss: str, model) -> None:
    """ValueError naming train.loss when `model` lacks what the loss needs."""
    if loss == "fused" and not (hasattr(model, "features") and hasattr(model, "head_weight")):
        raise ValueError(f"train.loss='fused' needs a model with features() and head_weight() (as "
                         f"gdn_jax.model.LM has); {type(model).__name__} has not: use "
                         "train.loss='plain'")
