"""FLA checkpoint directory <-> train.py workdir.

import_fla: writes DIR/config.json (an ExperimentConfig whose model is the FLA model's),
DIR/checkpoints/0/state (weights only; see gdn_jax/train/checkpoint.py), DIR/tokenizer.json when
the FLA directory has one (data.tokenizer points at it), and DIR/fla_import.json (where it came
from). eval.py evaluates DIR; train.py fine-tunes it in place (`--workdir DIR`) or into a new run
(`--init_from DIR --workdir NEW`), with a fresh optimiser.

export_fla: the params of a workdir checkpoint -> an FLA checkpoint directory, with the run's
tokenizer.json beside it when it has one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil

from configs import experiment
from gdn_jax.interop import fla, fla_config, fla_weights

TOKENIZER = "tokenizer.json"
PROVENANCE = "fla_import.json"

# Fine-tuning defaults of an imported run (override with --set train.*).
FINETUNE = experiment.TrainConfig(lr=1e-4, final_lr=1e-5, warmup_steps=30)


def _runtime_only_changes(a, b) -> list[str]:
    """Names of ModelConfig fields that differ between a and b and change the function."""
    runtime = set(fla_config.RUNTIME_FIELDS) | set(fla_config.INIT_FIELDS)
    return [f.name for f in dataclasses.fields(a)
            if f.name not in runtime and getattr(a, f.name) != getattr(b, f.name)]


def import_fla(src: str, workdir: str, *, config: str | None = None, overrides=(),
               dtype: str = "float32", overwrite: bool = False) -> experiment.ExperimentConfig:
    """Writes a train.py workdir holding the FLA checkpoint `src`; returns its config.

    config: a preset name or config JSON whose data / train / mesh / run sections the run takes
    (default: the ExperimentConfig defaults with FINETUNE, data.seq_len = FLA's
    max_position_embeddings). overrides: "section.field=value" as train.py's --set; model fields
    may change only where the function stays the same (dtype, gdn_impl, remat, ...).
    """
    cfg_model, params, fla_cfg = fla.read_fla_checkpoint(
        src, dtype=dtype, name=f"fla:{os.path.basename(os.path.normpath(src))}")
    workdir = os.path.abspath(workdir)
    for existing in ("config.json", "checkpoints"):
        if os.path.exists(os.path.join(workdir, existing)) and not overwrite:
            raise FileExistsError(f"{os.path.join(workdir, existing)} exists; choose a new "
                                  f"--workdir or pass --overwrite")
    if config is not None:
        base = experiment.get_config(config)
    else:
        base = experiment.ExperimentConfig(train=FINETUNE)
        max_pos = fla_cfg.get("max_position_embeddings")
        if isinstance(max_pos, int) and max_pos > 0:
            base = dataclasses.replace(base, data=dataclasses.replace(base.data, seq_len=max_pos))
    tokenizer = "bytes"
    src_tok = os.path.join(src, TOKENIZER)
    if os.path.isfile(src_tok):
        tokenizer = os.path.join(workdir, TOKENIZER)
    cfg = dataclasses.replace(base, name=cfg_model.name, model=cfg_model,
                              data=dataclasses.replace(base.data, tokenizer=tokenizer))
    cfg = experiment.apply_overrides(cfg, list(overrides))
    changed = _runtime_only_changes(cfg.model, cfg_model)
    if changed:
        free = ", ".join(fla_config.RUNTIME_FIELDS[1:])
        raise ValueError(f"--set model.{changed[0]}: the imported weights fix this field "
                         f"({getattr(cfg_model, changed[0])!r}); only {free} may change")

    if overwrite:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    if cfg.data.tokenizer == os.path.join(workdir, TOKENIZER):
        shutil.copyfile(src_tok, cfg.data.tokenizer)
    _check_tokenizer(cfg)
    from gdn_jax.train import checkpoint

    checkpoint.save_weights_only(workdir, 0, fla_weights.unflatten(params))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(experiment.to_dict(cfg), f, indent=2)
    with open(os.path.join(workdir, PROVENANCE), "w") as f:
        json.dump(dict(source=os.path.abspath(src), imported=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), fla_config=fla_cfg,
            tensors=len(params)), f, indent=1)
    return cfg


def _check_tokenizer(cfg: experiment.ExperimentConfig) -> None:
    from gdn_jax.data.tokenizers import get_tokenizer

    tok = get_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} has {tok.vocab_size} ids but the "
                         f"model's vocab_size is {cfg.model.vocab_size}"
                         + ("; the FLA directory has no tokenizer.json, so the byte tokenizer "
                            "(258 ids) was chosen: put the model's tokenizer.json beside its "
                            "config.json, or pass --set data.tokenizer=PATH"
                            if cfg.data.tokenizer == "bytes" else ""))


def export_fla(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int | None = None, overwrite: bool = False) -> list[str]:
    """Writes the params of workdir's checkpoint `step` (default the latest) as an FLA checkpoint
    directory `out`; returns the files written."""
    from gdn_jax.data.tokenizers import get_tokenizer
    from gdn_jax.train import checkpoint

    cfg = experiment.get_config(os.path.join(workdir, "config.json"))
    fla_config.from_model_config(cfg.model)  # refuse what FLA cannot hold before loading weights
    _, model = checkpoint.load_params(workdir, step)
    tok = get_tokenizer(cfg.data.tokenizer)
    files = fla.save_fla_checkpoint(
        model, cfg.model, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        max_position_embeddings=cfg.data.seq_len, overwrite=overwrite)
    if cfg.data.tokenizer.endswith(".json"):
        shutil.copyfile(cfg.data.tokenizer, os.path.join(out, TOKENIZER))
        files.append(TOKENIZER)
    return files
