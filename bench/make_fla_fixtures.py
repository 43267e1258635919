"""Writes the FLA checkpoint fixtures of tests/test_interop.py: small GatedDeltaNetForCausalLM
models saved by FLA itself (`save_pretrained`), with FLA's float32 logits on fixed tokens.

Runs in an environment with PyTorch, transformers and FLA (`flash-linear-attention`, `fla-core`),
not gdn_jax. On a GPU machine run it as is. On a CPU, FLA's Triton kernels run in Triton's
interpreter:

    python3 -m venv /tmp/flavenv && /tmp/flavenv/bin/pip install torch==2.13.0 \
        flash-linear-attention==0.6.0 fla-core==0.6.0 triton
    TRITON_INTERPRET=1 /tmp/flavenv/bin/python bench/make_fla_fixtures.py --out tests/data/fla

(about a minute on 2 CPU cores). Each fixture directory holds FLA's `config.json`, its
safetensors (one file, or shards with `model.safetensors.index.json`), and `reference.safetensors`
with `tokens` [B, T] int64 and FLA's `logits` [B, T, V] float32 computed by the chunk kernel (the
training path; T = 72 spans two 64-token chunks). `fixture.json` records two self-checks: the logits of FLA's fused-recurrent kernel against the chunk ones, and the
logits of the saved checkpoint reloaded through `AutoModelForCausalLM.from_pretrained`;
`versions.json` the versions, the device and the command.

Weights: FLA's init, then every tensor redrawn (projections ~ N(0, 1/fan_in), norm scales
1 + N(0, 0.2), convs N(0, 0.5), A ~ U(0.5, 8.5), dt_bias + N(0, 0.5)), so a swapped or misplaced tensor
changes the logits visibly. "bf16" fixtures round the weights to bfloat16 first, compute the logits
in float32 and save the checkpoint in bfloat16, as FLA checkpoints usually are.

Fixtures (hidden 64, 2 layers, vocab 64): base (float32, saved in shards, with a tokenizer.json),
gva (1 q/k head, 4 value heads), neg_eigval (allow_neg_eigval, conv_size 3, norm_eps 1e-5), tied
(tie_word_embeddings, unfused norm and SwiGLU) and hybrid (3 layers, the middle one sliding-window
attention with GQA and its own rope_theta). FLA's attention layer calls flash-attn, which has no CPU
build; where flash-attn is missing this script stands in a plain PyTorch causal (windowed) softmax
attention for `flash_attn_func` and records that in fixture.json. Everything else in that model
(projections, RoPE, the GDN layers) is FLA's. About 700 KB in all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys

B, T = 1, 72
SEED = 1234


def _stand_in_flash_attn():
    """Where flash-attn is missing, gives FLA's attention layer a float32 PyTorch reference of
    `flash_attn_func` (unpadded batches only). Returns True when it did. Call after importing
    FLA."""
    import torch

    import fla.layers.attn as fla_attn

    if fla_attn.flash_attn_func is not None:
        return False

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), softmax_scale=None):
        # q [B, T, H, D]; k, v [B, S, KV, D]; query i sees keys j with i - left <= j <= i.
        if softmax_scale is not None:
            raise NotImplementedError("softmax_scale")
        H, KV = q.shape[2], k.shape[2]
        k = k.repeat_interleave(H // KV, dim=2)
        v = v.repeat_interleave(H // KV, dim=2)
        qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
        scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
        Tq, Tk = q.shape[1], k.shape[1]
        i = torch.arange(Tq)[:, None] + (Tk - Tq)
        j = torch.arange(Tk)[None, :]
        allowed = j <= i if causal else torch.ones(Tq, Tk, dtype=torch.bool)
        if window_size[0] >= 0:
            allowed = allowed & (j >= i - window_size[0])
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vf
        return out.transpose(1, 2).to(q.dtype)

    fla_attn.flash_attn_func = flash_attn_func
    return True


def _interpreter_fixes():
    """Two gaps of Triton's CPU interpreter (TRITON_INTERPRET=1) that FLA's kernels run into.

    - There is no device to time autotuning candidates on, and the autotuner fails looking for
      one. Every candidate computes the same thing, so the first is taken.
    - A plain `range` loop inside a kernel gives Python ints, where the compiler gives tensors
      (FLA calls `i_t.to(tl.int64)` on one). While a kernel runs, its module's `range` yields
      interpreter tensors instead; `tl.static_range` is untouched.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import builtins

    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]

    def as_int(x):
        if isinstance(x, tl.constexpr):
            x = x.value
        if isinstance(x, tl.tensor):
            return int(x.handle.data.reshape(-1)[0])
        return int(x)

    def tensor_range(*args, **kwargs):
        bounds = [as_int(a) for a in args]
        if kwargs.get("step") is not None:
            bounds = bounds[:2] if len(bounds) > 1 else [0] + bounds
            bounds.append(as_int(kwargs["step"]))
        for i in builtins.range(*bounds):
            yield interpreter._implicit_cvt(i)

    patch_lang = interpreter._patch_lang

    def patched(fn):
        scope = patch_lang(fn)
        module = sys.modules.get(getattr(fn, "__module__", None))
        if module is not None:
            scope.set_attr(module, "range", tensor_range)
        return scope

    interpreter._patch_lang = patched


COMMON = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=1.0,
              vocab_size=64, intermediate_size=32, max_position_embeddings=128)

FIXTURES = {
    "base": dict(config=dict(COMMON), dtype="float32", shard="40KB", tokenizer=True),
    "gva": dict(config=dict(COMMON, num_heads=1, num_v_heads=4, expand_v=0.5), dtype="bfloat16"),
    "neg_eigval": dict(config=dict(COMMON, allow_neg_eigval=True, conv_size=3, norm_eps=1e-5,
                                   expand_v=2.0),
                       dtype="bfloat16"),
    "tied": dict(config=dict(COMMON, tie_word_embeddings=True, fuse_norm=False, fuse_swiglu=False),
                 dtype="bfloat16"),
    "hybrid": dict(config=dict(COMMON, num_hidden_layers=3,
                               attn=dict(layers=[1], num_heads=4, num_kv_heads=2, window_size=16,
                                         rope_theta=500.0)),
                   dtype="bfloat16"),
}


def _corpus() -> str:
    """A few KB of English for the fixture tokenizer: this file's docstrings."""
    return (__doc__ or "") * 4


def _make_tokenizer(vocab_size: int, path: str) -> dict:
    """A byte-level BPE tokenizer.json of exactly vocab_size ids with <s> = 1 and </s> = 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=40, show_progress=False)
    tok.train_from_iterator([_corpus()], trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise RuntimeError("tokenizer larger than the model's vocabulary")
    tok.save(path)
    return dict(vocab=tok.get_vocab_size(with_added_tokens=True), bos=tok.token_to_id("<s>"),
                eos=tok.token_to_id("</s>"))


def _redraw(model, generator):
    """Every parameter redrawn so that each one matters to the logits (see the module docstring),
    drawn on the generator's device (the model must live there too)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=generator, device=generator.device) * 8 + 0.5))
            elif name.endswith("dt_bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=generator, device=generator.device))
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, device=generator.device))
            elif p.ndim == 1:  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator, device=generator.device))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device=generator.device))
            else:  # nn.Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=generator, device=generator.device) / math.sqrt(p.shape[1]))


def _logits(model, tokens, *, chunk: bool):
    """FLA picks its kernel from autograd: grad enabled -> chunk, else (T <= 64) fused_recurrent
    and, for T > 64, the config's attn_mode (chunk). Force one or the other."""
    import torch

    if chunk:
        with torch.enable_grad():
            return model(tokens).logits.detach().float()
    model.config.attn_mode = "fused_recurrent"
    for layer in model.model.layers:
        if hasattr(layer.attn, "mode"):
            layer.attn.mode = "fused_recurrent"
    with torch.no_grad():
        out = model(tokens).logits.float()
    model.config.attn_mode = "chunk"
    for layer in model.model.layers:
        if hasattr(layer.attn, "mode"):
            layer.attn.mode = "chunk"
    return out


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def make_fixture(name: str, spec: dict, out_root: str, stand_in: bool) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config_kwargs = dict(spec["config"])
    tok_info = None
    if spec.get("tokenizer"):
        tok_info = _make_tokenizer(config_kwargs["vocab_size"], os.path.join(out, "tokenizer.json"))
        config_kwargs.update(bos_token_id=tok_info["bos"], eos_token_id=tok_info["eos"])
    torch.manual_seed(SEED)
    config = GatedDeltaNetConfig(**config_kwargs)
    model = GatedDeltaNetForCausalLM(config).float()
    generator = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
    _redraw(model, generator)
    if spec["dtype"] == "bfloat16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    model.eval()
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=generator)

    logits = _logits(model, tokens, chunk=True)
    recurrent = _logits(model, tokens, chunk=False)

    save_kwargs = {"max_shard_size": spec["shard"]} if spec.get("shard") else {}
    to_save = model if spec["dtype"] == "float32" else model.to(torch.bfloat16)
    to_save.save_pretrained(out, **save_kwargs)
    save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_logits = _logits(reloaded, tokens, chunk=True)
    hybrid = bool(config_kwargs.get("attn"))
    info = dict(
        name=name,
        storage_dtype=spec["dtype"],
        tokens_shape=[B, T],
        logits="float32, FLA chunk kernel (autograd enabled), model in float32",
        rel_err_fused_recurrent_vs_chunk=rel_err(recurrent, logits),
        rel_err_reloaded_vs_saved=rel_err(reloaded_logits, logits),
        attention_core=("PyTorch float32 reference standing in for flash_attn_func (flash-attn "
                        "missing here)" if hybrid and stand_in else
                        "flash_attn" if hybrid else None),
        tokenizer=tok_info,
        seed=SEED,
    )
    with open(os.path.join(out, "fixture.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="tests/data/fla", help="directory of the fixture directories")
    p.add_argument("--only", default=None, help="comma list of fixture names (default: all)")
    args = p.parse_args(argv)
    _interpreter_fixes()

    import torch
    import transformers
    import triton

    import fla

    stand_in = _stand_in_flash_attn()

    torch.use_deterministic_algorithms(False)
    names = args.only.split(",") if args.only else list(FIXTURES)
    os.makedirs(args.out, exist_ok=True)
    device = "cpu (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    versions = dict(torch=torch.__version__, fla=fla.__version__, triton=triton.__version__,
                    transformers=transformers.__version__, python=platform.python_version())
    for name in names:
        info = make_fixture(name, FIXTURES[name], args.out, stand_in)
        print(f"{name:<11} recurrent vs chunk {info['rel_err_fused_recurrent_vs_chunk']:.2e}  "
              f"reloaded vs saved {info['rel_err_reloaded_vs_saved']:.2e}", flush=True)
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump(dict(versions, device=device,
                       command="TRITON_INTERPRET=1 python bench/make_fla_fixtures.py --out "
                               "tests/data/fla" if "interpret" in device.lower() else
                               "python bench/make_fla_fixtures.py --out tests/data/fla"),
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
