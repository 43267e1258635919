"""The training loop: config -> mesh -> sharded init or restore -> data -> steps -> logs, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from configs import experiment
from gdn_jax.data import pipeline
from gdn_jax.train import checkpoint as ckpt_lib
from gdn_jax.train import mesh as mesh_lib
from gdn_jax.train import metrics as metrics_lib
from gdn_jax.train import step as step_lib

# Fields that may change between a run and its resumption: the mesh and microbatches change how
# the same global batch is computed (elastic resume on another number of devices), not what.
_RESUMABLE_CHANGES = ("run.", "data.prefetch", "mesh.", "train.microbatches")


class NonFiniteLossError(FloatingPointError):
    pass


def _sync_config(cfg: experiment.ExperimentConfig, workdir: str) -> None:
    """Writes DIR/config.json, or checks a resumed run against it."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved = experiment.get_config(path)
        changed = [d for d in experiment.diff(saved, cfg) if not d.startswith(_RESUMABLE_CHANGES)]
        if saved.train.global_batch != cfg.train.global_batch:
            raise ValueError(
                f"{workdir} was trained with train.global_batch={saved.train.global_batch}, this "
                f"run asks for {cfg.train.global_batch}: documents are dealt to batch rows by "
                "index modulo the global batch, so another one cannot continue the same sample "
                f"order. Resume with train.global_batch={saved.train.global_batch} (on any number "
                "of processes and devices), or start a new --workdir (--init_from keeps the "
                "weights).")
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config; changed: "
                f"{'; '.join(changed)}. Use a new --workdir, or drop the changes."
            )
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(experiment.to_dict(cfg), f, indent=2)
        os.replace(tmp, path)


def _check_vocab(cfg: experiment.ExperimentConfig) -> None:
    need = pipeline.vocab_size(cfg.data)
    if need > cfg.model.vocab_size:
        raise ValueError(
            f"the data uses {need} token ids but model.vocab_size = "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {need}"
        )


class _Preemption:
    """SIGTERM -> save and stop. Multi-process runs use JAX's preemption sync point so that every
    process stops at the same step; a single process catches the signal itself."""

    def __init__(self):
        self.flag = False
        self.multi = jax.process_count() > 1
        if not self.multi:
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        del frame
        if self.flag:  # a second SIGTERM while the first is pending: die now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self):
        if not self.multi:
            signal.signal(signal.SIGTERM, self._old)


def _check_same_params(cfg: experiment.ExperimentConfig, source: str, abstract_params,
                       model_factory) -> None:
    """Raises ValueError naming the first parameter whose shape differs between the run's model
    and the one `source` (a workdir) was trained with."""
    from flax import nnx

    src = experiment.get_config(os.path.join(source, "config.json"))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_factory(src.model, nnx.Rngs(0)))
    theirs = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
    flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    for path in sorted(set(flat_ours) | set(flat_theirs), key=str):
        a, b = flat_ours.get(path), flat_theirs.get(path)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"--init_from {source}: parameter {jax.tree_util.keystr(path)} is "
                f"{None if b is None else tuple(b.shape)} there and "
                f"{None if a is None else tuple(a.shape)} in this run's model"
            )


def _init_from(trainer, source: str, step: int | None, model_factory) -> dict:
    """A fresh train state (step 0, new optimiser) holding the params of `source`'s checkpoint."""
    step = ckpt_lib.resolve_step(source, step)
    _check_same_params(trainer.cfg, source, trainer.abstract_state["params"], model_factory)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_state["params"],
        trainer.state_shardings["params"],
    )
    params = ckpt_lib.restore_params(source, step, target)
    with jax.set_mesh(trainer.mesh):
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings["opt_state"])(
            params
        )
        step0 = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings["step"])
    return {"step": step0, "params": params, "opt_state": opt_state}


def train(
    cfg: experiment.ExperimentConfig,
    workdir: str,
    *,
    stop_step: int | None = None,
    model_factory=step_lib.default_model_factory,
    init_from: str | None = None,
    init_step: int | None = None,
    on_batch=None,
) -> dict:
    """Trains until global step `stop_step` (default cfg.train.steps), resuming from the latest
    checkpoint in `workdir`. Returns {"step", "loss"} of the last logged step.

    on_batch(step, local_batch), if given, sees every batch this process feeds (its rows, numpy,
    with document_ids), before step `step` runs on it: for audits of the data order.

    A run with no checkpoint yet starts from the params of workdir `init_from` (its checkpoint
    `init_step`, default the latest) when given, with a fresh optimiser at step 0; a run whose
    latest checkpoint is weights-only (written by import-fla) starts from it the same way.
    """
    stop_step = cfg.train.steps if stop_step is None else stop_step
    mesh_lib.check_config(cfg, jax.device_count())  # before anything is written or compiled
    _check_vocab(cfg)
    _sync_config(cfg, workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    G, T = cfg.train.global_batch, cfg.data.seq_len
    rows = mesh_lib.local_rows(mesh, G, T)
    trainer = step_lib.build(cfg, mesh, model_factory)
    data_iter = iter(
        pipeline.make_dataset(cfg.data, global_batch=G, rows=rows, seed=cfg.train.seed)
    )
    manager = ckpt_lib.make_manager(workdir, cfg.run)
    latest = manager.latest_step()
    if latest is not None and ckpt_lib.is_weights_only(workdir, latest):
        init_from, init_step, latest = workdir, latest, None
    if latest is None:
        if init_from is not None:
            state = _init_from(trainer, init_from, init_step, model_factory)
        else:
            state = trainer.init_fn()
        start = 0
    else:
        state = ckpt_lib.restore(
            manager, latest, trainer.abstract_state, trainer.state_shardings, data_iter
        )
        start = int(jax.device_get(state["step"]))
    rest = trainer.rest_fn()

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    try:
        from gdn_jax.model import flops_per_token

        fpt = flops_per_token(cfg.model, T)
    except ImportError:
        fpt = 6.0 * n_params
    if jax.process_index() == 0:
        print(
            f"{cfg.name}: {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
            f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} "
            f"device(s) | batch {G}x{T} | "
            + (f"resuming at step {start}" if latest is not None else
               f"from the params of {init_from} (fresh optimiser)" if init_from else
               "from scratch")
            + f" -> step {stop_step} | workdir {workdir}",
            flush=True,
        )
    logger = metrics_lib.MetricsLogger(
        workdir,
        total_steps=stop_step,
        flops_per_token=fpt,
        num_devices=jax.device_count(),
        start_step=start,
    )
    preemption = _Preemption()
    last = {"step": start, "loss": float("nan")}
    pending = None  # (step, device metrics): fetched after the next step is dispatched
    last_saved = latest

    def save(step):
        nonlocal last_saved
        if last_saved != step:
            ckpt_lib.save(manager, step, state, data_iter)
            last_saved = step

    def drain(item):
        step, m = item
        host = jax.device_get(m)
        if not math.isfinite(float(host["loss"])) or not math.isfinite(float(host["grad_norm"])):
            return step, host, False
        if step % cfg.run.log_every == 0 or step == stop_step:
            last.update(logger.log(step, host))
        return step, host, True

    def stop_if_not_finite(pending, step):
        """Raises after saving when step `pending`'s metrics (fetched one step late) are not finite."""
        bad_step, host, ok = drain(pending)
        if not ok:
            # The step function drops non-finite updates, so `state` holds the last good params.
            save(step)
            manager.wait_until_finished()
            raise NonFiniteLossError(
                f"loss {host['loss']} / grad norm {host['grad_norm']} at step {bad_step}: stopped. "
                f"The update was skipped; checkpoint of the last good params saved at step {step} "
                f"in {ckpt_lib.checkpoint_dir(workdir)}."
            )

    step = start
    try:
        while step < stop_step:
            local = next(data_iter)
            if on_batch is not None:
                on_batch(step + 1, local)
            batch = mesh_lib.global_batch_array(
                {k: local[k] for k in step_lib.BATCH_KEYS}, mesh, G)
            state, m = trainer.step_fn(state, rest, batch)
            step += 1
            logger.add_tokens(G * T)
            if pending is not None:
                stop_if_not_finite(pending, step)
            pending = (step, m)
            if step % cfg.run.checkpoint_every == 0 or step == stop_step:
                save(step)
            if preemption.reached(step):
                save(step)
                if jax.process_index() == 0:
                    print(f"SIGTERM: checkpoint saved at step {step}; stopping.", flush=True)
                break
        if pending is not None:
            stop_if_not_finite(pending, step)
        save(step)
        manager.wait_until_finished()
    finally:
        preemption.close()
        logger.close()
        manager.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return last
