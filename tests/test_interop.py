"""FLA / Hugging Face checkpoint interop: FLA's own logits, bit-identical round trips, the config
field policy, clear errors, and the import-fla / eval.py / train.py / export-fla path.

The fixtures in tests/data/fla were written by FLA 0.6.0 itself (bench/make_fla_fixtures.py):
`save_pretrained` checkpoints and FLA's float32 logits on fixed tokens.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs.model import ModelConfig, get_model_config
from gdn_jax.interop import fla_config, fla_weights, load_fla_checkpoint, save_fla_checkpoint
from gdn_jax.interop.fla import model_params, read_tensors
from gdn_jax.model import LM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "fla")
NAMES = ("base", "gva", "neg_eigval", "tied", "hybrid")
needs_fixtures = pytest.mark.skipif(not os.path.isdir(os.path.join(FIXTURES, "base")),
                                    reason="FLA fixtures missing (bench/make_fla_fixtures.py)")


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _copy_fixture(name, tmp_path) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


# ---- FLA's own checkpoints and logits ---------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_fla_fixture_reproduces_fla_logits(name):
    path = os.path.join(FIXTURES, name)
    cfg, model = load_fla_checkpoint(path, dtype="float32", gdn_impl="chunk")
    ref = load_file(os.path.join(path, "reference.safetensors"))
    logits = _forward(model, jnp.asarray(ref["tokens"], jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == ref["logits"].shape
    err = _rel_err(logits, ref["logits"])
    assert err < 1e-4, f"{name}: relative error {err:.2e} against FLA's logits"
    fla = json.load(open(os.path.join(path, "config.json")))
    assert cfg.tie_embeddings == fla["tie_word_embeddings"] and (model.lm_head is None) == (
        fla["tie_word_embeddings"])
    assert cfg.gdn_allow_neg_eigval == fla["allow_neg_eigval"]
    assert cfg.gdn_v_heads == (fla["num_v_heads"] or fla["num_heads"])
    assert ("S" in cfg.mixers) == (fla["attn"] is not None)


@needs_fixtures
def test_fixture_kinds_cover_the_issue():
    """The fixtures hold what they claim: shards + index, bf16 files, GVA, tied, hybrid."""
    assert os.path.isfile(os.path.join(FIXTURES, "base", "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(FIXTURES, "base", "tokenizer.json"))
    cfgs = {n: json.load(open(os.path.join(FIXTURES, n, "config.json"))) for n in NAMES}
    assert cfgs["gva"]["num_v_heads"] > cfgs["gva"]["num_heads"]
    assert cfgs["neg_eigval"]["allow_neg_eigval"] and cfgs["tied"]["tie_word_embeddings"]
    assert cfgs["hybrid"]["attn"]["window_size"] == 16
    tied = load_file(os.path.join(FIXTURES, "tied", "model.safetensors"))
    assert "lm_head.weight" not in tied  # transformers drops the tied copy


@needs_fixtures
@pytest.mark.parametrize("name,dtype", [("base", "float32"), ("hybrid", "bfloat16")])
def test_reexport_of_fla_checkpoint_is_bit_identical(name, dtype, tmp_path):
    """FLA's files -> our model -> FLA's files: the same tensors, bit for bit, and a config that
    maps to the same ModelConfig."""
    src = os.path.join(FIXTURES, name)
    cfg, model = load_fla_checkpoint(src)
    out = str(tmp_path / "out")
    save_fla_checkpoint(model, cfg, out, dtype=dtype)
    from safetensors import safe_open

    def raw(path):
        tensors = {}
        for f in sorted(os.listdir(path)):
            if f.startswith("model") and f.endswith(".safetensors"):
                with safe_open(os.path.join(path, f), framework="flax") as st:
                    tensors.update({k: np.asarray(st.get_tensor(k)) for k in st.keys()})
        return tensors

    a, b = raw(src), raw(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    again = fla_config.to_model_config(json.load(open(os.path.join(out, "config.json"))),
                                       dtype="float32")
    assert again == cfg


# ---- our models -> FLA files -> our models ----------------------------------------------------


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=96, d_model=32, num_layers=3, mlp_hidden=48, gdn_num_heads=2,
                gdn_head_dim=8, gdn_expand_v=2.0, gdn_chunk_size=16, attn_num_heads=4,
                attn_head_dim=8, window_size=5, dtype="float32", gdn_impl="scan")
    return ModelConfig(**{**base, **kw})


def _perturbed_model(cfg, seed=0):
    """An LM whose every parameter is random (norm scales, A_log and dt_bias included)."""
    model = LM(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.mark.parametrize("kw,shard", [
    (dict(layer_pattern="GSA", gdn_num_v_heads=4, gdn_allow_neg_eigval=True,
          tie_embeddings=False, gdn_conv_size=3, attn_num_kv_heads=2, rope_theta=321.0), 20_000),
    (dict(layer_pattern="G", tie_embeddings=True, num_layers=2), None),
])
def test_round_trip_is_bit_identical(kw, shard, tmp_path):
    cfg = _tiny(**kw)
    model = _perturbed_model(cfg)
    out = str(tmp_path / "fla")
    files = save_fla_checkpoint(model, cfg, out, max_shard_bytes=shard)
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    fla = json.load(open(os.path.join(out, "config.json")))
    assert fla["model_type"] == "gated_deltanet"
    assert fla["architectures"] == ["GatedDeltaNetForCausalLM"]
    # Same kernel settings (they are not in FLA's config), so the logits can be compared bitwise.
    cfg2, model2 = load_fla_checkpoint(out, dtype="float32", gdn_impl=cfg.gdn_impl,
                                       gdn_chunk_size=cfg.gdn_chunk_size)
    assert cfg2.mixers == cfg.mixers
    p1, p2 = model_params(model), model_params(model2)
    assert sorted(p1, key=str) == sorted(p2, key=str)
    for k in p1:
        assert np.array_equal(p1[k], p2[k]), k
    tokens = jax.random.randint(jax.random.key(3), (2, 21), 0, cfg.vocab_size)
    assert np.array_equal(np.asarray(_forward(model, tokens)), np.asarray(_forward(model2, tokens)))


def test_bfloat16_export_rounds_once(tmp_path):
    cfg = _tiny(num_layers=1)
    model = _perturbed_model(cfg)
    save_fla_checkpoint(model, cfg, str(tmp_path), dtype="bfloat16")
    on_disk = read_tensors(str(tmp_path))
    ours = fla_weights.ours_to_fla(cfg, model_params(model))
    for k, x in ours.items():
        want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.array_equal(on_disk[k], want), k


# ---- config fields --------------------------------------------------------------------------


def test_every_fla_field_has_a_policy():
    handled = set(fla_config.MAPPED) | set(fla_config.REQUIRED) | fla_config.IGNORED
    assert set(fla_config.FLA_DEFAULTS) <= handled
    if os.path.isdir(FIXTURES):
        for name in NAMES:
            assert set(json.load(open(os.path.join(FIXTURES, name, "config.json")))) <= handled


def test_fla_default_config_is_the_fla_gdn_1_3b_preset():
    """FLA's defaults (hidden_ratio 4 -> MLP 5632, 6 x 256, untied, eps 1e-6) map to our preset."""
    cfg = fla_config.to_model_config({"model_type": "gated_deltanet"})
    preset = get_model_config("fla_gdn_1.3b")
    unused = ("attn_", "mamba_", "window", "rope")  # no attention or Mamba2 layers
    skip = {"name", "layer_pattern"} | set(fla_config.RUNTIME_FIELDS) | {
        f for f in preset.__dataclass_fields__ if f.startswith(unused)}
    for f in preset.__dataclass_fields__:
        if f not in skip:
            assert getattr(cfg, f) == getattr(preset, f), f
    assert cfg.mixers == preset.mixers and cfg.mlp_hidden == 5632


@pytest.mark.parametrize("ratio,size,want", [(4, None, 5632), (2, None, 2816), (None, None, 5632),
                                             (4, 1000, 1000)])
def test_mlp_width_follows_fla(ratio, size, want):
    cfg = fla_config.to_model_config({"model_type": "gated_deltanet", "hidden_ratio": ratio,
                                      "intermediate_size": size})
    assert cfg.mlp_hidden == want


def test_ignored_fields_do_not_change_the_config():
    base = fla_config.to_model_config({"model_type": "gated_deltanet"})
    noisy = {"model_type": "gated_deltanet", "fuse_norm": False, "fuse_swiglu": False,
             "attn_mode": "fused_recurrent", "use_l2warp": True, "fuse_cross_entropy": False,
             "max_position_embeddings": 8192, "pad_token_id": 0, "torch_dtype": "bfloat16",
             "output_gate_activation": "silu", "transformers_version": "4.53.0"}
    assert fla_config.to_model_config(noisy) == base


@pytest.mark.parametrize("field,value", [
    ("use_short_conv", False), ("use_gate", False), ("hidden_act", "powlu"),
    ("output_gate_activation", "sigmoid"), ("attnres_block_size", 2), ("model_type", "mamba2"),
    ("architectures", ["GatedDeltaNetModel"]), ("some_new_option", 1), ("num_v_heads", 9),
    ("expand_v", 0.3), ("hidden_size", 0), ("tie_word_embeddings", "yes"),
])
def test_refused_fields_are_named(field, value):
    with pytest.raises(ValueError) as e:
        fla_config.to_model_config({"model_type": "gated_deltanet", field: value})
    assert repr(field) in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("attn,named", [
    ({"layers": [1], "num_heads": 4, "qkv_bias": True}, "qkv_bias"),
    ({"layers": [1], "num_heads": 3}, "num_heads"),
    ({"layers": [7], "num_heads": 4}, "layers"),
    ({"layers": [1], "num_heads": 4, "qk_norm": True}, "qk_norm"),
    ([{"layers": [0], "num_heads": 4}, {"layers": [1], "num_heads": 8}], "num_heads"),
    ([{"layers": [0], "num_heads": 4, "window_size": 8},
      {"layers": [1], "num_heads": 4, "window_size": 16}], "window_size"),
])
def test_attention_layers_we_cannot_compute_are_refused(attn, named):
    fla = {"model_type": "gated_deltanet", "hidden_size": 64, "num_hidden_layers": 3,
           "attn": attn}
    with pytest.raises(ValueError, match=named):
        fla_config.to_model_config(fla)


def test_mixed_attention_specs_map_to_a_pattern():
    fla = {"model_type": "gated_deltanet", "hidden_size": 64, "num_hidden_layers": 6,
           "attn": [{"layers": [1, 4], "num_heads": 4, "window_size": 32},
                    {"layers": [5], "num_heads": 4}]}
    cfg = fla_config.to_model_config(fla)
    assert cfg.mixers == "GSGGSA" and cfg.window_size == 32 and cfg.attn_head_dim == 16
    back = fla_config.from_model_config(cfg)
    assert back["attn"] == [
        dict(layers=[1, 4], num_heads=4, num_kv_heads=4, qkv_bias=False, window_size=32,
             rope_theta=10000.0),
        dict(layers=[5], num_heads=4, num_kv_heads=4, qkv_bias=False, window_size=None,
             rope_theta=10000.0)]


@pytest.mark.parametrize("kw,named", [
    (dict(layer_pattern="GM"), "layer 1 is 'M'"),
    (dict(layer_pattern="D"), "layer 0 is 'D'"),
    (dict(layer_pattern="GS", attn_head_dim=4), "attn_head_dim"),
])
def test_export_refuses_what_fla_cannot_hold(kw, named, tmp_path):
    cfg = _tiny(**kw, mamba_head_dim=16, mamba_d_state=8, mamba_chunk_size=16)
    model = LM(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=named):
        save_fla_checkpoint(model, cfg, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x" / "config.json")


def test_export_does_not_overwrite(tmp_path):
    cfg = _tiny(num_layers=1)
    model = LM(cfg, rngs=nnx.Rngs(0))
    save_fla_checkpoint(model, cfg, str(tmp_path))
    with pytest.raises(FileExistsError):
        save_fla_checkpoint(model, cfg, str(tmp_path))
    save_fla_checkpoint(model, cfg, str(tmp_path), overwrite=True, max_shard_bytes=5_000)
    assert not os.path.exists(tmp_path / "model.safetensors")  # the old single file is gone
    load_fla_checkpoint(str(tmp_path))


# ---- tensors --------------------------------------------------------------------------------


@pytest.fixture
def small_ckpt(tmp_path):
    cfg = _tiny(num_layers=2, tie_embeddings=False)
    model = _perturbed_model(cfg)
    path = str(tmp_path / "ckpt")
    save_fla_checkpoint(model, cfg, path)
    return path


def _edit(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,named", [
    (lambda t: t.pop("model.layers.1.attn.A_log"), "model.layers.1.attn.A_log"),
    (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
    (lambda t: t.update({"model.layers.0.attn.D": np.ones(2, np.float32)}),
     "model.layers.0.attn.D"),
    (lambda t: t.update({"model.layers.0.attn.q_conv1d.weight": np.ones((16, 1, 3), np.float32)}),
     "model.layers.0.attn.q_conv1d.weight"),
    (lambda t: t.update({"model.norm.weight": np.ones(33, np.float32)}), "model.norm.weight"),
    (lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}), "model.norm.weight"),
])
def test_tensor_errors_name_the_tensor(small_ckpt, edit, named):
    _edit(small_ckpt, edit)
    with pytest.raises(ValueError) as e:
        load_fla_checkpoint(small_ckpt)
    assert named in str(e.value)


def test_tied_checkpoint_with_a_different_head_is_refused(small_ckpt):
    cfg_file = os.path.join(small_ckpt, "config.json")
    fla = json.load(open(cfg_file))
    json.dump(dict(fla, tie_word_embeddings=True), open(cfg_file, "w"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_fla_checkpoint(small_ckpt)
    _edit(small_ckpt, lambda t: t.update({"lm_head.weight": t["model.embeddings.weight"]}))
    cfg, model = load_fla_checkpoint(small_ckpt)  # an identical copy is accepted
    assert cfg.tie_embeddings and model.lm_head is None


@needs_fixtures
def test_sharded_index_errors(tmp_path):
    path = _copy_fixture("base", tmp_path)
    index_file = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_file))
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
    json.dump(index, open(index_file, "w"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_fla_checkpoint(path)
    os.remove(os.path.join(path, "model-00002-of-00005.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00005"):
        load_fla_checkpoint(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_fla_checkpoint(str(tmp_path))
    json.dump({"model_type": "gated_deltanet"}, open(tmp_path / "config.json", "w"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_fla_checkpoint(str(tmp_path))


# ---- command line: import-fla -> eval.py / train.py -> export-fla ------------------------------


def _train(*args):
    """train.py in a subprocess: it sets XLA:CPU flags that must precede the backend's start."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@needs_fixtures
def test_import_eval_finetune_export(tmp_path, capsys):
    sys.path.insert(0, ROOT)
    import eval as eval_cli
    from gdn_jax.interop.__main__ import main as interop_main
    from gdn_jax.train import checkpoint

    src = os.path.join(FIXTURES, "base")
    wd, ft, out = str(tmp_path / "imported"), str(tmp_path / "ft"), str(tmp_path / "out")
    assert interop_main(["import-fla", src, "--workdir", wd, "--set", "data.seq_len=24",
                         "train.global_batch=2", "run.log_every=1", "model.gdn_impl=chunk"]) == 0
    assert interop_main(["import-fla", src, "--workdir", wd]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert checkpoint.is_weights_only(wd, 0)
    # The workdir's model is FLA's: same logits as FLA on the fixture tokens.
    _, model = checkpoint.load_params(wd)
    ref = load_file(os.path.join(src, "reference.safetensors"))
    assert _rel_err(_forward(model, jnp.asarray(ref["tokens"], jnp.int32)), ref["logits"]) < 1e-4

    # eval.py reads it, with the tokenizer.json that came with the checkpoint.
    assert eval_cli.main(["--workdir", wd, "--tasks", "ppl", "--max_tokens", "300"]) == 0
    results = json.load(open(os.path.join(wd, "eval", "results.json")))
    assert results["tokenizer"] == os.path.join(wd, "tokenizer.json")
    assert "HFTokenizer" in capsys.readouterr().out
    assert 1.0 < results["ppl"]["perplexity"] < 1e4

    # Fine-tune into a new workdir. The first step's learning rate is 0 (warm-up), so its
    # checkpoint holds exactly the imported weights: proof that training started from them.
    _train("--init_from", wd, "--workdir", ft, "--steps", "1")
    assert checkpoint.checkpoint_steps(ft) == [1]
    imported = model_params(model)
    tuned = model_params(checkpoint.load_params(ft, 1)[1])
    for k in imported:
        assert np.array_equal(imported[k], tuned[k]), k
    metrics = [json.loads(line) for line in open(os.path.join(ft, "metrics.jsonl"))]
    assert np.isfinite(metrics[-1]["loss"])

    # Or in place: the weights-only checkpoint starts the run, which then resumes normally.
    _train("--workdir", wd, "--steps", "2")
    assert checkpoint.checkpoint_steps(wd) == [0, 2] and not checkpoint.is_weights_only(wd, 2)
    _train("--workdir", wd, "--steps", "3")
    assert checkpoint.checkpoint_steps(wd)[-1] == 3
    moved = model_params(checkpoint.load_params(wd, 3)[1])
    assert any(not np.array_equal(imported[k], moved[k]) for k in imported)

    # Export the imported weights (step 0): FLA's original tensors, bit for bit, and the tokenizer.
    assert interop_main(["export-fla", "--workdir", wd, out, "--step", "0"]) == 0
    a, b = read_tensors(src), read_tensors(out)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert open(os.path.join(out, "tokenizer.json")).read() == open(
        os.path.join(src, "tokenizer.json")).read()
    exported = json.load(open(os.path.join(out, "config.json")))
    original = json.load(open(os.path.join(src, "config.json")))
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (
        original["bos_token_id"], original["eos_token_id"])


@needs_fixtures
def test_import_needs_a_tokenizer_that_fits(tmp_path):
    from gdn_jax.interop.workdir import import_fla
    from gdn_jax.train import checkpoint

    tied, wd = os.path.join(FIXTURES, "tied"), str(tmp_path / "imported")
    # Vocab 64 and no tokenizer.json: the byte tokenizer (258 ids) does not fit.
    with pytest.raises(ValueError, match="tokenizer"):
        import_fla(tied, wd)
    with pytest.raises(ValueError, match="model.d_model"):
        import_fla(tied, wd, overrides=["model.d_model=32"])
    tok = os.path.join(FIXTURES, "base", "tokenizer.json")
    cfg = import_fla(tied, wd, overrides=[f"data.tokenizer={tok}", "model.gdn_impl=scan"])
    assert cfg.model.gdn_impl == "scan" and cfg.data.seq_len == 128  # max_position_embeddings
    model_cfg, model = checkpoint.load_params(wd)
    assert model_cfg.tie_embeddings and model.lm_head is None
    ref = load_file(os.path.join(tied, "reference.safetensors"))
    assert _rel_err(_forward(model, jnp.asarray(ref["tokens"], jnp.int32)), ref["logits"]) < 1e-4
