"""Device mesh, logical-axis sharding rules, batch placement, mesh checks and multi-host start-up.

The mesh has axes (data, fsdp, context, tensor):
  data     replicas: each holds all parameters and a share of the batch rows.
  fsdp     a share of the batch rows, and of the parameters, gradients and optimiser state (their
           "embed" dimension); parameters are all-gathered where they are used (gdn_jax/train/step.py).
  context  a share of every row's T tokens (gdn_jax/context_parallel.py); parameters replicated.
  tensor   a share of the heads, MLP hidden units and vocabulary.
Parameters carry logical axis names (see gdn_jax.model); LOGICAL_RULES below is the one place that
maps them onto mesh axes. Later axes vary fastest over the devices, so tensor and context groups
sit on neighbouring devices (one host) when they fit there.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.experiment import ExperimentConfig, MeshConfig
from gdn_jax.context_parallel import CONTEXT_AXIS

MESH_AXES = ("data", "fsdp", CONTEXT_AXIS, "tensor")
BATCH_AXES = ("data", "fsdp")  # split the batch rows
STEP_AXES = (*BATCH_AXES, CONTEXT_AXIS)  # the train step computes gradients per device over these
# Logical parameter axis -> mesh axis. Names not listed (and None) are replicated.
LOGICAL_RULES = (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"))


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order, with a -1 resolved; ValueError when they do not fit."""
    sizes = [cfg.data, cfg.fsdp, cfg.context, cfg.tensor]
    named = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {named}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axes must be positive (or one of them -1), got {named}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known or (-1 not in sizes and known != num_devices):
        raise ValueError(f"{named}: their product {known} does not match the {num_devices} "
                         "devices")
    return tuple(num_devices // known if s == -1 else s for s in sizes)


def check_context(cfg: ExperimentConfig, context: int) -> None:
    """ValueError unless the model and sequence can be split over `context` devices: each
    device's share of T must be whole chunks of the gated delta rule, and every layer must have a
    context-parallel path (GDN, DeltaNet, attention with the XLA backend)."""
    if context == 1:
        return
    m, T = cfg.model, cfg.data.seq_len
    chunk = m.gdn_chunk_size if any(k in "GD" for k in m.mixers) else 1
    if T % (context * chunk):
        raise ValueError(
            f"mesh.context={context} must divide data.seq_len / model.gdn_chunk_size = "
            f"{T} / {chunk}: each device's share of the sequence must be whole chunks")
    halo = max(m.gdn_conv_size - 1, 0)
    if halo > T // context:
        raise ValueError(f"mesh.context={context}: the convolution's halo of {halo} tokens is "
                         f"longer than a device's {T // context} tokens")
    for i, kind in enumerate(m.mixers):
        if kind == "M":
            raise ValueError(f"mesh.context={context}: layer {i} ('M', Mamba2) has no context "
                             "parallelism; use mesh.context=1 for models with Mamba2 layers")
        if kind in "SA" and m.attn_impl == "cudnn":
            raise ValueError(f"mesh.context={context}: layer {i} ('{kind}', attention) with "
                             "model.attn_impl='cudnn' has no context parallelism (it takes no "
                             "position mask); set model.attn_impl=xla")


def check_fits(cfg: ExperimentConfig, shape: dict[str, int]) -> None:
    """ValueError unless the run's batch and model split over a mesh of this {axis: size}."""
    rows = shape["data"] * shape["fsdp"]
    if cfg.train.global_batch % rows:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} must be a multiple of "
                         f"mesh.data * mesh.fsdp = {rows}")
    check_context(cfg, shape[CONTEXT_AXIS])


def check_config(cfg: ExperimentConfig, num_devices: int) -> dict[str, int]:
    """All mesh checks of a run, before anything compiles; returns {axis: size}."""
    shape = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, num_devices)))
    check_fits(cfg, shape)
    return shape


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    shape = mesh_shape(cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_to_spec(names: Sequence[Any], shape: Sequence[int], mesh) -> P:
    """Mesh PartitionSpec for a parameter with logical `names`: a mesh axis is used at most once,
    and a dimension its mesh axis does not divide stays replicated."""
    rules = dict(LOGICAL_RULES)
    used, spec = set(), []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if isinstance(name, str) else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            used.add(axis)
            spec.append(axis)
    return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh) -> Any:
    """NamedShardings for an abstract nnx.State of Params, as a pure dict (like the params)."""
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)

    def one(spec, leaf):
        names = tuple(spec) if spec is not None else ()
        names = names + (None,) * (len(leaf.shape) - len(names))
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def tree_shardings_like(tree: Any, params_shardings: Any, mesh) -> Any:
    """Shardings for a pytree (e.g. optimiser state) whose subtrees mirror the params: a leaf whose
    key path ends with a parameter's path gets that parameter's sharding; other leaves replicate."""
    by_path = {
        tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    depth = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        path = tuple(path)
        for n in range(min(depth, len(path)), 0, -1):
            s = by_path.get(path[-n:])
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh) -> NamedSharding:
    """Batch arrays [G, T]: rows over (data, fsdp), tokens over context."""
    return NamedSharding(mesh, P(BATCH_AXES, CONTEXT_AXIS))


def _local_block(mesh, global_batch: int, seq_len: int) -> tuple[range, range]:
    """The rows and token columns of the global batch this process's devices hold."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch, seq_len))
    blocks = []
    for size, dim in ((global_batch, 0), (seq_len, 1)):
        spans = sorted({idx[dim].indices(size)[:2] for idx in index_map.values()})
        lo, hi = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != hi - lo:
            raise ValueError(
                f"process {jax.process_index()} holds non-contiguous batch "
                f"{'rows' if dim == 0 else 'columns'} {spans}; order the mesh so each process "
                "owns one block of the batch")
        blocks.append(range(lo, hi))
    return blocks[0], blocks[1]


def local_rows(mesh, global_batch: int, seq_len: int) -> range:
    """Global batch rows held by this process's devices (the rows its data pipeline must make)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"train.global_batch={global_batch} must be a multiple of data*fsdp = {n}")
    return _local_block(mesh, global_batch, seq_len)[0]


def global_batch_array(local: dict[str, np.ndarray], mesh, global_batch: int) -> dict:
    """The global jax.Arrays from each process's rows (whole rows of T tokens: where the context
    axis spans processes, each keeps only its columns)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        shape = (global_batch,) + v.shape[1:]
        cols = _local_block(mesh, global_batch, v.shape[1])[1]
        v = v[:, cols.start:cols.stop]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


# ---- multi-host --------------------------------------------------------------------------------


def initialize_distributed(
    mode: str,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed before any other JAX call.

    mode "off": single process (explicit coordinator flags are an error).
    mode "auto": jax.distributed.initialize() detects the cluster (Slurm, Open MPI, TPU, K8s...).
    mode "manual" (implied by --coordinator_address): the three flags say everything.
    Failures propagate: a multi-host job must never fall back to N independent runs.
    """
    explicit = coordinator_address is not None
    if mode == "off":
        if explicit or num_processes is not None or process_id is not None:
            raise ValueError(
                "--coordinator_address/--num_processes/--process_id given with " "--distributed=off"
            )
        return
    # Cross-process collectives of the CPU backend (tests, CPU clusters); no effect on GPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "auto" and not explicit:
        jax.distributed.initialize()
        return
    if mode in ("auto", "manual"):
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "manual distributed start needs --coordinator_address, --num_processes "
                "and --process_id"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return
    raise ValueError(f"--distributed must be off, auto or manual, got {mode!r}")
