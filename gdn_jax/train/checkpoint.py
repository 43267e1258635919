"""Checkpoints: orbax CheckpointManager with the train state and the grain iterator state.

Layout of a workdir:

    DIR/config.json                     the full resolved ExperimentConfig (configs.experiment)
    DIR/metrics.jsonl                   one JSON object per logged step
    DIR/tb/                             TensorBoard event files
    DIR/checkpoints/<step>/state/       orbax StandardSave of {"step", "params", "opt_state"}
    DIR/checkpoints/<step>/data/process_<i>-of-<n>.json   each process's data-iterator state

The data position is global (gdn_jax/data/pipeline.py): a restore merges the states of however
many processes wrote the checkpoint, and each process of the new run takes its own rows from it,
so a checkpoint of N processes resumes on M (with the same global batch).

"params" is the model's nnx.Param state as a pure nested dict (nnx.to_pure_dict(state): layer lists
have int keys), float32. `load_params(workdir)` rebuilds the model for evaluation.

A weights-only checkpoint (`save_weights_only`, written by `python3 -m gdn_jax.interop import-fla`)
has `state/` holding {"params"} alone and no `data/`: eval.py reads it like any other, and train.py
starts from its params with a fresh optimiser and data iterator at step 0.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from configs import experiment
from gdn_jax.data import pipeline


class _FrozenIteratorState(grain.DatasetIterator):
    """The iterator state at save time: async saves must not see the iterator move on."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return self._state

    def set_state(self, state):
        self._state = state


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, cfg: experiment.RunConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints,
        save_interval_steps=1,  # the loop decides when to save
        enable_async_checkpointing=cfg.async_checkpoints,
        create=True,
        cleanup_tmp_directories=True,  # half-written saves of a killed run
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "data"), options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter) -> None:
    """Starts saving (async when configured); returns once arrays are copied off the devices."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(dict(data_iter.get_state()))),
    )
    manager.save(step, args=args, force=True)


def data_state(manager: ocp.CheckpointManager, step: int) -> dict:
    """The global data position of checkpoint `step`: every process's iterator state
    (data/process_<i>-of-<n>.json) merged, whatever number of processes wrote them."""
    data_dir = os.path.join(str(manager.directory), str(step), "data")
    paths = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
    if not paths:
        raise FileNotFoundError(f"no data-iterator state under {data_dir}")
    names = {re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(p)) for p in paths}
    writers = {(int(m[1]), int(m[2])) for m in names if m}
    n = max((count for _, count in writers), default=0)
    if writers != {(i, n) for i in range(n)}:
        raise ValueError(f"{data_dir} holds an incomplete set of process states: {paths}")
    states = []
    for path in paths:
        with open(path) as f:
            states.append(json.load(f))
    return pipeline.merge_states(states)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, state_shardings: Any, data_iter
) -> Any:
    """Restores the train state (placed with `state_shardings`, on any mesh) and sets
    `data_iter` to the global data position (written by any number of processes)."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_shardings,
    )
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    data_iter.set_state(data_state(manager, step))
    if hasattr(data_iter, "start_prefetch"):  # as grain's own restore does
        data_iter.start_prefetch()
    return out["state"]


def checkpoint_steps(workdir: str) -> list[int]:
    path = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []


def resolve_step(workdir: str, step: int | None) -> int:
    """`step`, or the latest checkpoint step of workdir; FileNotFoundError when there is none."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir(workdir)}; "
                                f"steps: {steps}")
    return step


def is_weights_only(workdir: str, step: int) -> bool:
    """True for a checkpoint without the data-iterator item (see the module docstring)."""
    step_dir = os.path.join(checkpoint_dir(workdir), str(step))
    return os.path.isdir(os.path.join(step_dir, "state")) and not os.path.isdir(
        os.path.join(step_dir, "data"))


def save_weights_only(workdir: str, step: int, params: Any) -> None:
    """Writes DIR/checkpoints/<step>/state holding {"params": params} (a pure nested dict)."""
    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})),
                     force=True)
        manager.wait_until_finished()


def restore_params(workdir: str, step: int, target: Any) -> Any:
    """The "params" of checkpoint `step`, as the pure dict `target` of jax.ShapeDtypeStruct (with
    shardings) describes; the optimiser state is not read."""
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restore_args = {"params": jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding),
                                           target)}
    if "partial_restore" in inspect.signature(ocp.args.PyTreeRestore).parameters:
        subset = dict(partial_restore=True)
    else:  # older orbax: an empty `transforms` restores only the keys of `item`
        subset = dict(transforms={})
    restored = ckptr.restore(
        os.path.join(checkpoint_dir(workdir), str(step), "state"),
        args=ocp.args.PyTreeRestore(item={"params": target}, restore_args=restore_args, **subset),
    )
    return restored["params"]


def load_params(workdir: str, step: int | None = None, *, model_factory=None):
    """(model_cfg, model) from a workdir's config.json and its latest (or given) checkpoint.

    The model is an nnx module on the default device (single process, unsharded), params float32.
    Only "params" is read; the optimiser state is skipped.
    """
    from gdn_jax.train.step import default_model_factory

    model_factory = model_factory or default_model_factory
    cfg = experiment.get_config(os.path.join(workdir, "config.json"))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_factory(cfg.model, nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    step = resolve_step(workdir, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        nnx.to_pure_dict(abstract_params),
    )
    params = restore_params(workdir, step, target)
    with nnx.use_eager_sharding(False):
        model = model_factory(cfg.model, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return cfg.model, model
