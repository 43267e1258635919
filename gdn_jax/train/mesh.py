"""Device mesh, logical-axis sharding rules, batch placement and multi-host start-up.

The mesh has axes (data, fsdp, tensor). Parameters carry logical axis names (see gdn_jax.model);
LOGICAL_RULES below is the one place that maps them onto mesh axes. The batch dimension is split
over (data, fsdp).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.experiment import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis. Names not listed (and None) are replicated.
LOGICAL_RULES = (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"))


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {cfg}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f"mesh {cfg} does not fit {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {np.prod(sizes)} devices, "
            f"but there are {num_devices}"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    shape = mesh_shape(cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


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
    return NamedSharding(mesh, P(BATCH_AXES))


def local_rows(mesh, global_batch: int, seq_len: int) -> range:
    """Global batch rows held by this process's devices (the rows its data pipeline must make)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"train.global_batch={global_batch} must be a multiple of data*fsdp = {n}")
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch, seq_len))
    starts = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows {starts}; "
            "order the mesh so each process owns one block of the batch"
        )
    return range(lo, hi)


def global_batch_array(local: dict[str, np.ndarray], mesh, global_batch: int) -> dict:
    """Assembles the global jax.Arrays from each process's rows."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
        for k, v in local.items()
    }


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
