"""Experiment configuration: model + data + optimiser + mesh + checkpointing, as frozen dataclasses.

    cfg = get_config("tiny")                       # a preset by name
    cfg = get_config("runs/tiny/config.json")      # or a JSON file written by train.py
    cfg = apply_overrides(cfg, ["train.lr=1e-3", "model.d_model=128"])
    d = to_dict(cfg); cfg == from_dict(d)

Preset names: "tiny" (the CPU default), "tiny_<variant>" for every tiny model preset, and every
paper / FLA model preset ("gdn_1.3b", "fla_gdn_1.3b", ...) with the paper's training recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from configs.model import ModelConfig, get_model_config, model_config_names


@dataclass(frozen=True)
class DataConfig:
    source: str = (
        "embedded"  # registered source: "embedded" | "text" | "jsonl" | "arrayrecord" | "mqar"
    )
    paths: tuple[str, ...] = ()  # files or glob patterns for the text / jsonl / arrayrecord sources
    heldout_paths: tuple[str, ...] = ()  # same, for the held-out split of file sources
    text_field: str = (
        "text"  # JSON field holding the document in jsonl (and JSON arrayrecord) records
    )
    tokenizer: str = "bytes"  # "bytes", a SentencePiece .model path or a HF tokenizer.json path
    seq_len: int = 128  # tokens per row fed to the model, T
    shuffle_seed: int = 0  # seed of the per-epoch document shuffle
    add_bos: bool = True  # put the tokenizer's BOS before each document (when it has one)
    add_eos: bool = True  # put the tokenizer's EOS after each document (when it has one)
    prefetch: int = 2  # batches prepared ahead by a background thread (0 = none)
    options: dict = field(default_factory=dict)  # extra keyword options of the source (e.g. mqar's)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # length of the LR schedule and default last step, optimiser steps
    global_batch: int = 16  # sequences per optimiser step, summed over all processes
    microbatches: int = 1  # gradient-accumulation splits of the global batch per step
    lr: float = 3e-3  # peak learning rate, after warm-up
    final_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warm-up from 0 to lr, steps (ignored when warmup_tokens > 0)
    warmup_tokens: int = 0  # warm-up length in tokens; converted with global_batch * seq_len
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW decoupled decay, on >= 2-D params except norms and biases
    clip_norm: float = 1.0  # clip_by_global_norm threshold (0 disables)
    seed: int = 0  # parameter-init seed
    grad_reduce_dtype: str = "float32"  # dtype gradients cross devices in: "float32" | "bfloat16"
    loss: str = "fused"  # LM loss (gdn_jax.losses.LM_LOSSES): "fused" (head chunked over tokens) | "plain"
    loss_chunk_tokens: int = 4096  # tokens per chunk of the fused loss's [chunk, vocab] logits

    def __post_init__(self):
        if self.loss not in ("fused", "plain"):
            raise ValueError(f"train.loss must be 'fused' or 'plain', got {self.loss!r}")
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"train.loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        if self.grad_reduce_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.grad_reduce_dtype must be float32 or bfloat16, got "
                             f"{self.grad_reduce_dtype!r}")


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # pure data-parallel replicas; -1 takes the devices left over
    fsdp: int = 1  # parameter/optimiser-state sharding ways (batch is split over it too)
    context: int = 1  # context-parallel ways: each row's tokens are split over this many devices
    tensor: int = 1  # tensor-parallel ways (heads, mlp, vocab)


@dataclass(frozen=True)
class RunConfig:
    log_every: int = 10  # steps between progress lines / metrics.jsonl records
    checkpoint_every: int = 100  # steps between (async) checkpoints
    keep_checkpoints: int = 3  # most recent checkpoints kept
    async_checkpoints: bool = True  # save in a background thread


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "tiny"  # preset the config started from, for logs
    model: ModelConfig = field(default_factory=lambda: get_model_config("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch * self.data.seq_len

    @property
    def warmup(self) -> int:
        """Warm-up length in steps."""
        if self.train.warmup_tokens > 0:
            return max(1, math.ceil(self.train.warmup_tokens / self.tokens_per_step))
        return self.train.warmup_steps


# ---- presets -------------------------------------------------------------------------------------

# The embedded byte-level corpus needs 256 bytes + BOS + EOS.
_BYTE_VOCAB = 258


def _tiny(model_name: str) -> ExperimentConfig:
    # CPU presets compute in float32 (CPUs have no bf16 matmul units); gdn_impl stays "auto"
    # (the chunk path on a CPU, the Pallas kernels on a GPU).
    return ExperimentConfig(
        name=model_name, model=get_model_config(model_name, vocab_size=_BYTE_VOCAB, dtype="float32")
    )


def _paper(model_name: str) -> ExperimentConfig:
    # Gated DeltaNet paper recipe: AdamW peak 4e-4, cosine, wd 0.1, clip 1.0, 0.5M-token batches of
    # 4096 tokens, 1B warm-up tokens, 100B tokens in all (1.3B models).
    return ExperimentConfig(
        name=model_name,
        model=get_model_config(model_name),
        data=DataConfig(source="jsonl", seq_len=4096, prefetch=4),
        train=TrainConfig(
            steps=200_000,
            global_batch=128,
            lr=4e-4,
            final_lr=4e-5,
            warmup_steps=0,
            warmup_tokens=1_000_000_000,
        ),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        run=RunConfig(log_every=50, checkpoint_every=1000, keep_checkpoints=3),
    )


def config_names() -> list[str]:
    return model_config_names()


def get_config(name_or_path: str) -> ExperimentConfig:
    """A preset by name, a JSON file written by `to_dict`, or a workdir holding config.json."""
    if os.path.isdir(name_or_path):
        name_or_path = os.path.join(name_or_path, "config.json")
    if name_or_path.endswith(".json"):
        with open(name_or_path) as f:
            return from_dict(json.load(f))
    if name_or_path not in model_config_names():
        raise ValueError(
            f"unknown config {name_or_path!r}: not a JSON file or a workdir, and not a "
            f"preset; presets: {', '.join(config_names())}"
        )
    if name_or_path.startswith("tiny"):
        return _tiny(name_or_path)
    return _paper(name_or_path)


# ---- (de)serialisation and overrides ---------------------------------------------------------------


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """Converts a JSON value (or a parsed CLI string) to the type the field declares."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(value, hint, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a JSON object, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    return value


def from_dict(d: dict, cls=ExperimentConfig, where: str = "config"):
    """Rebuilds a (nested) config dataclass from `to_dict`'s output; unknown keys are errors."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings: --set data.tokenizer=bytes


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Applies "section.field=value" overrides (values parsed as JSON, else taken as strings).

    Raises ValueError naming the field for unknown sections/fields or malformed items.
    """
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = d, ExperimentConfig
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                prefix = ".".join(parts[:depth]) or "config"
                raise ValueError(
                    f"override {item!r}: {prefix} has no field {part!r}; fields: "
                    f"{', '.join(names)}"
                )
            hint = _field_types(cls)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ValueError(
                        f"override {item!r}: {key} is a section; set one of its fields"
                    )
                node[part] = _coerce(_parse_value(text), hint, key)
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ValueError(
                        f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section"
                    )
                node, cls = node[part], hint
    return from_dict(d)


def diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Dotted names of the fields that differ between two configs."""
    out = []

    def walk(x, y, prefix):
        for k in x:
            if isinstance(x[k], dict) and isinstance(y.get(k), dict) and k != "options":
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y.get(k):
                out.append(f"{prefix}{k}: {x[k]!r} -> {y.get(k)!r}")

    walk(to_dict(a), to_dict(b), "")
    return out
