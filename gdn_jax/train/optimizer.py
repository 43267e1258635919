"""AdamW with linear warm-up + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from configs.experiment import ExperimentConfig

_NO_DECAY_NAMES = ("norm", "bias", "scale")


def learning_rate_schedule(cfg: ExperimentConfig) -> optax.Schedule:
    """0 -> lr linearly over the warm-up, then cosine to final_lr at train.steps (flat after)."""
    t = cfg.train
    warmup = cfg.warmup
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.lr,
        warmup_steps=warmup,
        decay_steps=max(t.steps, warmup + 1),
        end_value=t.final_lr,
    )


def decay_mask(params):
    """True where weight decay applies: >= 2-D params that are not norms or biases."""

    def keep(path, leaf):
        names = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path).lower()
        return leaf.ndim >= 2 and not any(n in names for n in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
    t = cfg.train
    parts = []
    if t.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=t.b1,
            b2=t.b2,
            eps=t.eps,
            weight_decay=t.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
