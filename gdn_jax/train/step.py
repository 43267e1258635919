"""Train state, sharded initialisation and the pure, jitted train step.

The state is a plain pytree: {"step": int32 [], "params": pure dict of float32 params,
"opt_state": optax state}. The model's graph (nnx.GraphDef) and its non-Param variables stay
outside; `nnx.merge` rebuilds the module inside the step. Parameters are float32 master weights;
the model computes in `model.dtype` (bf16 by default) and returns float32 logits.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.experiment import ExperimentConfig
from gdn_jax.train import mesh as mesh_lib
from gdn_jax.train import optimizer as optimizer_lib

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def default_model_factory(model_cfg, rngs):
    from gdn_jax.model import LM

    return LM(model_cfg, rngs=rngs)


@dataclasses.dataclass
class Trainer:
    """Everything static about a run: graph, optimiser, shardings and the compiled functions."""

    cfg: ExperimentConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    rest: Any  # non-Param model variables (replicated, not trained)
    tx: optax.GradientTransformation
    abstract_state: Any
    state_shardings: Any
    init_fn: Callable[[], Any]  # () -> state, sharded by state_shardings
    rest_fn: Callable[[], Any]  # () -> the model's non-Param variables
    step_fn: Callable[[Any, dict], tuple[Any, dict]]


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _model_kwargs(model_factory, model_cfg) -> set[str]:
    """Which of segment_ids / positions the model's __call__ accepts."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_factory(model_cfg, nnx.Rngs(0)))
    params = inspect.signature(type(model).__call__).parameters
    return {k for k in ("segment_ids", "positions") if k in params}


def build(cfg: ExperimentConfig, mesh, model_factory=default_model_factory) -> Trainer:
    model_cfg = cfg.model
    tx = optimizer_lib.make_optimizer(cfg)
    schedule = optimizer_lib.learning_rate_schedule(cfg)
    model_kwargs = _model_kwargs(model_factory, model_cfg)

    def make_model():
        # Shardings come from out_shardings below, so the model needs no mesh context while building.
        with nnx.use_eager_sharding(False):
            return model_factory(model_cfg, nnx.Rngs(cfg.train.seed))

    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_rest = _split(abstract_model)
    p_shardings = mesh_lib.param_shardings(abstract_params, mesh)
    replicated = NamedSharding(mesh, P())

    def init():
        _, params, _ = _split(make_model())
        params = nnx.to_pure_dict(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def init_rest():
        return _split(make_model())[2]

    abstract_state = jax.eval_shape(init)
    state_shardings = {
        "step": replicated,
        "params": p_shardings,
        "opt_state": mesh_lib.tree_shardings_like(abstract_state["opt_state"], p_shardings, mesh),
    }
    rest_shardings = jax.tree.map(lambda _: replicated, abstract_rest)
    init_fn = jax.jit(init, out_shardings=state_shardings)
    rest_fn = jax.jit(init_rest, out_shardings=rest_shardings)

    M = cfg.train.microbatches
    G = cfg.train.global_batch
    if G % M:
        raise ValueError(f"train.global_batch={G} must be a multiple of train.microbatches={M}")
    batch_spec = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    micro_spec = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    def loss_sum(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        kwargs = {k: batch[k] for k in model_kwargs}
        logits_BxTxV = model(batch["tokens"], **kwargs).astype(jnp.float32)
        ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
        mask_BxT = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(ce_BxT * mask_BxT), jnp.sum(mask_BxT)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, rest, batch):
        params = state["params"]
        if M == 1:
            (total, count), grads = grad_fn(params, rest, batch)
        else:
            # Row r = i * M + m goes to microbatch m, so every device splits its own rows locally.
            def split(x):
                x = x.reshape((G // M, M) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_spec)

            micro = {k: split(v) for k, v in batch.items()}

            def body(carry, mb):
                (t, c), g = grad_fn(params, rest, mb)
                acc_t, acc_c, acc_g = carry
                return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step is dropped (the loop stops on it), so params never hold NaN/Inf.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "tokens": count,
        }
        return new_state, metrics

    batch_shardings = {k: batch_spec for k in BATCH_KEYS}
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, rest_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def step_fn(state, rest, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
            return jitted(state, rest, batch)

    def with_mesh(fn):
        def wrapped():
            with jax.set_mesh(mesh):
                return fn()

        return wrapped

    return Trainer(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        rest=abstract_rest,
        tx=tx,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        init_fn=with_mesh(init_fn),
        rest_fn=with_mesh(rest_fn),
        step_fn=step_fn,
    )
