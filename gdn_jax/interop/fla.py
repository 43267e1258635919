"""Load and save FLA GatedDeltaNetForCausalLM checkpoints (Hugging Face `save_pretrained` layout).

    cfg, model = load_fla_checkpoint("path/to/fla_dir", dtype="float32")
    logits_BxTxV = model(tokens_BxT)
    save_fla_checkpoint(model, cfg, "path/to/out_dir")   # FLA: AutoModelForCausalLM.from_pretrained

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`. Files are read and
written with the `safetensors` library. Tensors may be float32, bfloat16 or float16 on disk; our
parameters are float32. fla_config.py says how each config field is handled and fla_weights.py how
each tensor maps.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.model import ModelConfig
from gdn_jax.interop import fla_config, fla_weights

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_SAVE_DTYPES = ("float32", "bfloat16", "float16")


def read_config(path: str) -> dict:
    """FLA's config.json of a checkpoint directory, as a dict."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: is {path!r} a checkpoint saved by FLA's "
                                f"save_pretrained?")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None


def _shard_files(path: str) -> dict[str, list[str] | None]:
    """{file: tensor names the index assigns to it (None: a single unindexed file)}."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' of tensor name -> shard file")
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}, named by {index}, not found")
        return files
    other = [f for f in sorted(os.listdir(path)) if f.endswith((".bin", ".pt", ".pth"))] \
        if os.path.isdir(path) else []
    hint = (f"; found {other[0]}: only safetensors checkpoints are read (save with "
            f"safe_serialization=True)") if other else ""
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path!r}{hint}")


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (single file or shards), as float32 numpy arrays."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    cpu = jax.devices("cpu")[0]
    for file, listed in _shard_files(path).items():
        with jax.default_device(cpu), safe_open(file, framework="flax") as f:
            names = list(f.keys())
            if listed is not None:
                missing = sorted(set(listed) - set(names))
                if missing:
                    raise ValueError(f"tensor {missing[0]!r}: the index puts it in "
                                     f"{os.path.basename(file)}, which does not hold it")
                unlisted = sorted(set(names) - set(listed))
                if unlisted:
                    raise ValueError(f"tensor {unlisted[0]!r} in {os.path.basename(file)} is not "
                                     f"in the index's weight_map")
            for name in names:
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"tensor {name!r} has dtype {dtype}; expected a float type")
                if name in out:
                    raise ValueError(f"tensor {name!r} appears in more than one file")
                out[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return out


def read_fla_checkpoint(path: str, **runtime) -> tuple[ModelConfig, dict, dict]:
    """(our ModelConfig, our flat float32 params {path: array}, FLA's config dict)."""
    fla = read_config(path)
    cfg = fla_config.to_model_config(fla, **runtime)
    params = fla_weights.fla_to_ours(cfg, read_tensors(path))
    return cfg, params, fla


def model_from_params(cfg: ModelConfig, params: dict, model_factory=None) -> nnx.Module:
    """An LM for cfg holding exactly `params` (flat {path: array}); raises ValueError naming any
    parameter of the model that `params` lacks or sets with another shape."""
    if model_factory is None:
        from gdn_jax.model import LM

        model_factory = lambda c: LM(c, rngs=nnx.Rngs(0))  # noqa: E731
    with nnx.use_eager_sharding(False):
        model = model_factory(cfg)
    state = nnx.state(model, nnx.Param)
    want = fla_weights.flatten(nnx.to_pure_dict(state))
    missing = sorted(set(want) - set(params), key=str)
    extra = sorted(set(params) - set(want), key=str)
    for problem, paths in (("is not set by the checkpoint", missing),
                           ("is not a parameter of the model", extra)):
        if paths:
            raise ValueError(f"parameter {'.'.join(map(str, paths[0]))} {problem}")
    for p, value in want.items():
        if tuple(params[p].shape) != tuple(value.shape):
            raise ValueError(f"parameter {'.'.join(map(str, p))}: checkpoint shape "
                             f"{tuple(params[p].shape)}, model shape {tuple(value.shape)}")
    loaded = {p: jnp.asarray(v, jnp.float32) for p, v in params.items()}
    nnx.replace_by_pure_dict(state, fla_weights.unflatten(loaded))
    nnx.update(model, state)
    return model


def load_fla_checkpoint(path: str, dtype: str = "float32", **runtime):
    """(ModelConfig, LM) from an FLA GatedDeltaNetForCausalLM checkpoint directory.

    dtype: the model's compute dtype (parameters are float32 whatever the file holds; logits are
    float32). runtime: other fields that do not change the function (gdn_impl, gdn_chunk_size,
    gdn_split_output, conv_impl, remat, attn_impl, name). Raises ValueError naming the config field
    or tensor that cannot be imported; FileNotFoundError when config.json or the safetensors are missing.
    """
    cfg, params, _ = read_fla_checkpoint(path, dtype=dtype, **runtime)
    return cfg, model_from_params(cfg, params)


def model_params(model: nnx.Module) -> dict:
    """The model's parameters as a flat {path: float32 numpy array}."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {p: np.asarray(jax.device_get(v), np.float32)
            for p, v in fla_weights.flatten(state).items()}


def write_tensors(path: str, tensors: dict[str, np.ndarray], *, max_shard_bytes: int | None = None):
    """Writes `model.safetensors`, or shards of at most max_shard_bytes (a tensor larger than that
    gets a shard of its own) with their `model.safetensors.index.json`."""
    from safetensors.numpy import save_file

    meta = {"format": "pt"}  # transformers refuses safetensors without it
    if max_shard_bytes is None or sum(x.nbytes for x in tensors.values()) <= max_shard_bytes:
        save_file(tensors, os.path.join(path, SINGLE), metadata=meta)
        return [SINGLE]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata=meta)
        weight_map.update({name: file for name in shard})
        files.append(file)
    total = sum(x.nbytes for x in tensors.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX]


def save_fla_checkpoint(model: nnx.Module, cfg: ModelConfig, path: str, *, dtype: str = "float32",
                        max_shard_bytes: int | None = None, bos_token_id: int | None = None,
                        eos_token_id: int | None = None, max_position_embeddings: int = 2048,
                        overwrite: bool = False) -> list[str]:
    """Writes `path/config.json` (model_type "gated_deltanet") and the safetensors that FLA's
    `AutoModelForCausalLM.from_pretrained(path)` loads. Returns the files written.

    dtype: the tensors' dtype on disk (float32, bfloat16 or float16). Raises ValueError naming
    the layer or field FLA cannot represent (Mamba2 or DeltaNet layers, attention whose heads do
    not tile d_model), before anything is written; FileExistsError when path already holds a
    checkpoint and overwrite is False.
    """
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES}, got {dtype!r}")
    fla = fla_config.from_model_config(cfg, dtype=dtype, bos_token_id=bos_token_id,
                                       eos_token_id=eos_token_id,
                                       max_position_embeddings=max_position_embeddings)
    tensors = fla_weights.ours_to_fla(cfg, model_params(model))
    np_dtype = jnp.dtype(dtype)
    tensors = {name: np.ascontiguousarray(x.astype(np_dtype)) for name, x in tensors.items()}
    os.makedirs(path, exist_ok=True)
    existing = [f for f in os.listdir(path)
                if f in (CONFIG, SINGLE, INDEX) or (f.startswith("model-") and
                                                     f.endswith(".safetensors"))]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{os.path.join(path, sorted(existing)[0])} exists; pass "
                                  f"overwrite=True (--overwrite) to replace the checkpoint")
        for f in existing:
            os.remove(os.path.join(path, f))
    files = write_tensors(path, tensors, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(fla, f, indent=2, sort_keys=True)
    return [CONFIG] + files
