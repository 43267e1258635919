"""The train step, one module-level pure function, and the sharded train state it updates.

    new_state, metrics = train_step(state, rest, batch, spec=spec)

state = {"step": int32 [], "params": pure dict of float32 params, "opt_state": optax state}; rest =
the model's non-Param variables; batch = dict of [G, T] arrays (BATCH_KEYS). `StepSpec` holds the
static parts: the model graph (nnx.GraphDef; `nnx.merge` rebuilds the module inside the step), the
optimiser, the microbatch count and the shardings. The model computes in `model.dtype` (bf16 by
default) from float32 master weights and returns float32 logits.

Sharding (mesh axes in gdn_jax/train/mesh.py). Parameters, gradients and optimiser state live
sharded over fsdp. The gradients come from `device_gradients`, run per device (shard_map over data,
fsdp and context; tensor stays automatic): it all-gathers the parameters over fsdp, runs forward and
backward on the device's rows and tokens, and reduces each gradient with explicit collectives, in
`train.grad_reduce_dtype`: a reduce-scatter over fsdp onto the parameter's shard, an all-reduce over
data and context. XLA's latency-hiding scheduler (flags in gdn_jax/xla_flags.py) overlaps the
gathers with the layers before their use and the reductions with the rest of the backward. The
optimiser update then runs on the shards. `build` jits train_step with explicit in/out shardings,
the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.experiment import ExperimentConfig
from gdn_jax import losses
from gdn_jax.train import mesh as mesh_lib
from gdn_jax.train import optimizer as optimizer_lib

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def default_model_factory(model_cfg, rngs):
    from gdn_jax.model import LM

    return LM(model_cfg, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static half of a train step: what `train_step` needs besides state, rest and batch."""

    graphdef: Any  # nnx.GraphDef of the model
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # learning rate by step, for the metrics
    microbatches: int  # gradient-accumulation splits of each device's rows
    model_kwargs: tuple[str, ...]  # batch keys the model's __call__ takes besides the tokens
    param_specs: Any  # per param: PartitionSpec over the per-device axes (fsdp only)
    fsdp_dims: Any  # per param: the dimension sharded over fsdp, or -1
    batch_spec: Any  # PartitionSpec of the [G, T] batch arrays
    manual_axes: tuple[str, ...] = mesh_lib.STEP_AXES  # the mesh axes device_gradients runs over
    grad_reduce_dtype: Any = jnp.float32  # dtype gradients cross devices in
    loss: str = "fused"  # key of gdn_jax.losses.LM_LOSSES (train.loss)
    loss_chunk_tokens: int = 4096  # the fused loss's tokens per logits chunk


def loss_sum(params, rest, batch, spec: StepSpec):
    """(sum of masked token cross-entropies, number of masked tokens) of the batch, by the loss
    spec.loss names in losses.LM_LOSSES."""
    model = nnx.merge(spec.graphdef, params, rest)
    kwargs = {k: batch[k] for k in spec.model_kwargs}
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    total = losses.LM_LOSSES[spec.loss](model, batch["tokens"], batch["targets"], mask_BxT, kwargs,
                                        chunk_tokens=spec.loss_chunk_tokens)  # scopes: losses.py
    return total, jnp.sum(mask_BxT)


def _gather(p, dim):
    return p if dim < 0 else jax.lax.all_gather(p, "fsdp", axis=dim, tiled=True)


def _reduce(g, dim, dtype):
    """A device's gradient of a whole parameter -> the sum over all devices of its fsdp shard."""
    g = g.astype(dtype)
    if dim >= 0:
        g = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True)
    others = tuple(a for a in mesh_lib.STEP_AXES if dim < 0 or a != "fsdp")
    return jax.lax.psum(g, others).astype(jnp.float32)


def device_gradients(params, rest, batch, spec: StepSpec):
    """Per device, inside shard_map over mesh_lib.STEP_AXES: params are this device's fsdp shards,
    batch its rows and tokens. Returns (loss sum, token count, gradient sums), all summed over the
    devices; the gradients as fsdp shards, like the params."""
    dims = spec.fsdp_dims
    # All-gather on use: XLA issues each gather ahead of the layer that needs it.
    full = jax.tree.map(_gather, params, dims)
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    reduce = lambda g: jax.tree.map(lambda x, d: _reduce(x, d, spec.grad_reduce_dtype), g, dims)
    M = spec.microbatches
    if M == 1:
        (total, count), g = grad_fn(full, rest, batch, spec)
        grads = reduce(g)
    else:
        # Local row r = i * M + m goes to microbatch m. Each microbatch's gradients are reduced
        # (scattered) as soon as they exist, so the accumulator is a shard and the reduction of one
        # microbatch overlaps the next one's compute.
        micro = {k: v.reshape((v.shape[0] // M, M) + v.shape[1:]).swapaxes(0, 1)
                 for k, v in batch.items()}

        def body(carry, mb):
            (t, c), g = grad_fn(full, rest, mb, spec)
            acc_t, acc_c, acc_g = carry
            return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, reduce(g))), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
    total, count = jax.lax.psum((total, count), mesh_lib.STEP_AXES)
    return total, count, grads


def train_step(state, rest, batch, *, spec: StepSpec):
    """One optimiser step on the global batch: loss = token mean of the masked cross-entropy over
    all G x T tokens, gradients summed over devices and microbatches, clipped AdamW. A step whose
    loss or gradient norm is not finite leaves the state unchanged but for the step count.

    Returns (new_state, metrics {"loss", "grad_norm", "lr", "tokens"}).
    """
    params = state["params"]
    per_device = jax.shard_map(
        functools.partial(device_gradients, spec=spec),
        in_specs=(spec.param_specs, P(), spec.batch_spec),
        out_specs=(P(), P(), spec.param_specs),
        axis_names=set(spec.manual_axes),
        # The Pallas kernels' output shapes carry no varying-axis types, which the check needs;
        # every cross-device sum here is explicit.
        check_vma=False,
    )
    total, count, grads = per_device(params, rest, batch)
    denom = jnp.maximum(count, 1.0)
    loss = total / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    with jax.named_scope("optimizer"):  # labels the ops for profiles
        grad_norm = optax.global_norm(grads)
        updates, opt_state = spec.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
    # A non-finite step is dropped (the loop stops on it), so params never hold NaN/Inf.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": spec.schedule(state["step"]),
               "tokens": count}
    return new_state, metrics


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
    spec: StepSpec
    init_fn: Callable[[], Any]  # () -> state, sharded by state_shardings
    rest_fn: Callable[[], Any]  # () -> the model's non-Param variables
    step_fn: Callable[[Any, Any, dict], tuple[Any, dict]]  # train_step, jitted, under the mesh
    lower_fn: Callable[[Any, Any, dict], Any]  # the same arguments -> jax's Lowered step (HLO)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _model_kwargs(model_factory, model_cfg) -> tuple[str, ...]:
    """Which of segment_ids / positions the model's __call__ accepts."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_factory(model_cfg, nnx.Rngs(0)))
    params = inspect.signature(type(model).__call__).parameters
    return tuple(k for k in ("segment_ids", "positions") if k in params)


def _fsdp_dim(sharding: NamedSharding) -> int:
    """The dimension a parameter's sharding splits over fsdp, or -1."""
    return next((i for i, e in enumerate(sharding.spec) if e == "fsdp"), -1)


def build(cfg: ExperimentConfig, mesh, model_factory=default_model_factory) -> Trainer:
    """The Trainer of a run on `mesh`. Raises ValueError for a config the mesh cannot run
    (mesh_lib.check_fits) before anything is traced or compiled."""
    mesh_lib.check_fits(cfg, dict(mesh.shape))
    model_cfg = cfg.model
    tx = optimizer_lib.make_optimizer(cfg)
    M = cfg.train.microbatches
    rows = cfg.train.global_batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    if rows % M:
        raise ValueError(f"train.microbatches={M} must divide each device's {rows} rows "
                         "(train.global_batch / (mesh.data * mesh.fsdp))")

    def make_model():
        # Shardings come from out_shardings below, so the model needs no mesh context while building.
        with nnx.use_eager_sharding(False):
            return model_factory(model_cfg, nnx.Rngs(cfg.train.seed))

    abstract_model = nnx.eval_shape(make_model)
    losses.check_model_supports(cfg.train.loss, abstract_model)
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
    batch_spec = mesh_lib.batch_sharding(mesh)
    fsdp_dims = jax.tree.map(_fsdp_dim, p_shardings)
    spec = StepSpec(
        graphdef=graphdef,
        tx=tx,
        schedule=optimizer_lib.learning_rate_schedule(cfg),
        microbatches=M,
        model_kwargs=_model_kwargs(model_factory, model_cfg),
        param_specs=jax.tree.map(
            lambda s, d: P(*(["fsdp" if i == d else None for i in range(len(s.spec))])),
            p_shardings, fsdp_dims),
        fsdp_dims=fsdp_dims,
        batch_spec=batch_spec.spec,
        # Per device over every axis where tensor parallelism is off: XLA then sees no automatic
        # axis in the step's collectives (XLA:CPU cannot compile a bf16 reduction that has one).
        manual_axes=mesh_lib.STEP_AXES + (("tensor",) if mesh.shape["tensor"] == 1 else ()),
        grad_reduce_dtype=jnp.dtype(cfg.train.grad_reduce_dtype),
        loss=cfg.train.loss,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
    )
    jitted = jax.jit(
        functools.partial(train_step, spec=spec),
        in_shardings=(state_shardings, rest_shardings, {k: batch_spec for k in BATCH_KEYS}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def step_fn(state, rest, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
            return jitted(state, rest, batch)

    def lower_fn(state, rest, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
            return jitted.lower(state, rest, batch)

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
        spec=spec,
        init_fn=with_mesh(jax.jit(init, out_shardings=state_shardings)),
        rest_fn=with_mesh(jax.jit(init_rest, out_shardings=rest_shardings)),
        step_fn=step_fn,
        lower_fn=lower_fn,
    )
