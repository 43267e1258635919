"""Logits parity with FLA in both directions, on one machine with both FLA (PyTorch) and gdn_jax.

    python3 bench/check_fla_parity.py                       # FLA's default config (fla_gdn_1.3b)
    python3 bench/check_fla_parity.py --set hidden_size=128 num_hidden_layers=2 vocab_size=512
    TRITON_INTERPRET=1 python3 bench/check_fla_parity.py --set ...    # CPU, small sizes only

1. FLA builds GatedDeltaNetForCausalLM(config) with random weights (every tensor redrawn, as in
   bench/make_fla_fixtures.py), saves it with save_pretrained (float32) and computes its logits on
   random tokens with the kernel of --fla_mode.
2. gdn_jax imports the directory (load_fla_checkpoint, float32, the first impl of --gdn_impls;
   "auto" is Pallas on a GPU) and computes the logits of the same tokens: import error =
   |ours - FLA| / |FLA| (Frobenius).
3. gdn_jax exports its model (save_fla_checkpoint); FLA loads that directory with
   AutoModelForCausalLM.from_pretrained and computes the logits again: export error against
   FLA's first logits (0 when the round trip is exact) and against ours.
4. Each further impl of --gdn_impls imports the directory again: its own import error.

Both sides compute in float32 throughout: JAX's matmuls at "highest" precision, PyTorch's with TF32
off, and FLA's layers in --fla_mode "fused_recurrent" (default), whose recurrence is elementwise
float32. FLA's "chunk" kernels run their float32 dots as TF32 (Triton's default for float32 tl.dot):
at the 1.3B size their logits differ from exact float32 by about 1.5e-3 (H200, 2026-12-03/04), which
would hide the import's own error (2.2e-5 in exact float32, docs/interop.md).

Prints one line per error and writes them with the versions and the command to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to PyTorch too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def compiled_logits(model, tokens, progress):
    """model(tokens) through one jitted forward, compiled ahead so the compile time is reported
    apart from the run (a float32 1.3B forward once compiled for minutes on a GPU)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    t0 = time.time()
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, tokens).compile()
    progress(f"gdn_jax: compiled in {time.time() - t0:.1f} s; logits")
    return compiled(state, tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="GatedDeltaNetConfig fields (JSON values), e.g. num_hidden_layers=2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gdn_impls", default="auto",
                   help="comma list of gated_delta_rule impls to import with (each its own import "
                        "error; the first is exported), e.g. chunk,auto")
    p.add_argument("--fla_mode", default="fused_recurrent", choices=("fused_recurrent", "chunk"),
                   help="FLA's GatedDeltaNet kernel (its attn_mode); chunk runs float32 dots as TF32")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    import make_fla_fixtures as fixtures

    fixtures._interpreter_fixes()
    import torch
    import transformers
    import triton

    import fla
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    fixtures._stand_in_flash_attn()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gdn_jax.interop import load_fla_checkpoint, save_fla_checkpoint

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    overrides.setdefault("attn_mode", args.fla_mode)
    config = GatedDeltaNetConfig(**overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()

    def progress(what):
        print(f"[{time.time() - start:7.1f} s] {what}", flush=True)

    torch.manual_seed(args.seed)
    # Built and redrawn where it runs: at 1.3B, drawing 1.4G numbers on a CPU takes minutes.
    with torch.device(device):
        model = GatedDeltaNetForCausalLM(config).float()
    fixtures._redraw(model, torch.Generator(device).manual_seed(args.seed))
    model = model.eval()
    n_params = sum(x.numel() for x in model.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen)

    def fla_logits(m):
        # FLA's layer takes its chunk kernel whenever autograd is on, whatever attn_mode says
        # (fla/layers/gated_deltanet.py); without grad and for T > 64 it takes attn_mode.
        grad = torch.enable_grad() if args.fla_mode == "chunk" else torch.no_grad()
        with grad:
            return m(tokens.to(device)).logits.detach().float().cpu().numpy()

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    results = dict(params=n_params, batch=args.batch, seq_len=args.seq_len, config=overrides)

    def save_json(results):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "fla"), os.path.join(tmp, "ours")
        t0 = time.time()
        progress(f"FLA model built ({n_params / 1e6:.1f}M params on {device}); FLA logits")
        ref = fla_logits(model)
        progress("save_pretrained")
        model.save_pretrained(src)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        results["import_rel_err_by_impl"] = {}
        impls = args.gdn_impls.split(",")

        def import_logits(impl):
            progress(f"gdn_jax: load_fla_checkpoint (gdn_impl={impl})")
            cfg_i, model_i = load_fla_checkpoint(src, dtype="float32", gdn_impl=impl)
            progress(f"gdn_jax: compiling the forward (gdn_impl={impl})")
            logits = np.asarray(jax.device_get(
                compiled_logits(model_i, jnp.asarray(tokens.numpy(), jnp.int32), progress)))
            results["import_rel_err_by_impl"][impl] = err = rel(logits, ref)
            progress(f"gdn_jax: import rel err {err:.2e} (gdn_impl={impl})")
            return cfg_i, model_i, logits

        # The first impl's import is exported and checked before the others run, so a slow
        # compile of a later impl cannot cost the export numbers.
        cfg, ours_model, ours = import_logits(impls[0])
        results["import_rel_err"] = results["import_rel_err_by_impl"][impls[0]]
        progress("gdn_jax: save_fla_checkpoint")
        save_fla_checkpoint(ours_model, cfg, out)
        del ours_model
        progress("FLA: from_pretrained on the export, logits")
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                             attn_mode=overrides["attn_mode"])
        again = fla_logits(back.to(device).eval())
        del back
        results["export_rel_err_vs_fla"] = rel(again, ref)
        results["export_rel_err_vs_ours"] = rel(again, ours)
        progress(f"export rel err vs FLA {results['export_rel_err_vs_fla']:.2e}, vs ours "
                 f"{results['export_rel_err_vs_ours']:.2e}")
        save_json(results)  # so far, in case a later impl's compile outlasts the run
        for impl in impls[1:]:
            import_logits(impl)
        results["seconds"] = round(time.time() - t0, 1)
    results.update(
        device=torch.cuda.get_device_name(0) if device == "cuda" else
        ("cpu (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"),
        jax_backend=jax.default_backend(), jax=jax.__version__, torch=torch.__version__,
        fla=fla.__version__, triton=triton.__version__, transformers=transformers.__version__,
        python=platform.python_version(), gdn_impl=cfg.gdn_impl, fla_mode=overrides["attn_mode"],
        jax_matmul_precision="highest",
        command="python3 bench/check_fla_parity.py " + " ".join(sys.argv[1:]))
    print(f"{n_params / 1e6:.1f}M params, tokens {args.batch} x {args.seq_len}, "
          f"{results['device']} / jax {jax.default_backend()}")
    print(f"import  (ours vs FLA)                  rel err {results['import_rel_err']:.2e}")
    print(f"export  (FLA on our export vs FLA)     rel err {results['export_rel_err_vs_fla']:.2e}")
    print(f"export  (FLA on our export vs ours)    rel err {results['export_rel_err_vs_ours']:.2e}")
    for impl, err in results["import_rel_err_by_impl"].items():
        print(f"import  (gdn_impl={impl:<8})              rel err {err:.2e}")
    save_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
