"""The training loop: config -> mesh -> sharded init or restore -> data -> steps -> logs, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal

import jax
from jax.experimental import multihost_utils

from configs import experiment
from gdn_jax.data import pipeline
from gdn_jax.train import checkpoint as ckpt_lib
from gdn_jax.train import mesh as mesh_lib
from gdn_jax.train import metrics as metrics_lib
from gdn_jax.train import step as step_lib

# Fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("run.", "data.prefetch")


class NonFiniteLossError(FloatingPointError):
    pass


def _sync_config(cfg: experiment.ExperimentConfig, workdir: str) -> None:
    """Writes DIR/config.json, or checks a resumed run against it."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved = experiment.get_config(path)
        changed = [d for d in experiment.diff(saved, cfg) if not d.startswith(_RESUMABLE_CHANGES)]
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


def train(
    cfg: experiment.ExperimentConfig,
    workdir: str,
    *,
    stop_step: int | None = None,
    model_factory=step_lib.default_model_factory,
) -> dict:
    """Trains until global step `stop_step` (default cfg.train.steps), resuming from the latest
    checkpoint in `workdir`. Returns {"step", "loss"} of the last logged step."""
    stop_step = cfg.train.steps if stop_step is None else stop_step
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
    if latest is None:
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
            + (f"resuming at step {start}" if latest is not None else "from scratch")
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
            batch = mesh_lib.global_batch_array(local, mesh, G)
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
