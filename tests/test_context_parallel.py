"""Context parallelism (gdn_jax/context_parallel.py): T split over 1, 2 and 4 emulated CPU devices.

The op against the scan reference on one device (forward and every gradient, random cotangents),
the GDN LM and H1 against one device (logits and every parameter gradient), and the mesh checks.
The multi-device checks run in subprocesses, which set the device count before JAX starts.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from configs import experiment
from gdn_jax.train import loop
from gdn_jax.train import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = """
import functools, jax, jax.numpy as jnp, numpy as np
from gdn_jax.xla_flags import overlap_collectives
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 4

def mesh(P, axes=("context",)):
    shape = (1,) * (len(axes) - 1) + (P,)
    return jax.make_mesh(shape, axes, devices=jax.devices()[:P],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axes))

def close(name, got, want, tol=1e-5):
    # Within tol of the reference, relative to the reference's largest entry.
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
    assert err <= tol, (name, err)
    return err
"""


def _run(code: str, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    # LLVM's -O0: a third less compile time, the same arithmetic.
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
                        " --xla_backend_optimization_level=0")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_PRELUDE + code)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


_OP = """
from gdn_jax.ops import gated_delta_rule
from gdn_jax.context_parallel import gated_delta_rule_context_parallel
from op_inputs import random_op_inputs

def segments(B, T, P):
    # Row 0: a document starts exactly at device 1's first token. Row 1: documents that cross
    # every device boundary. Other rows: one document.
    T_l, seg = T // P, np.ones((B, T), np.int32)
    seg[0, T_l:] = 2
    seg[1, T_l - 3:] = 2
    seg[1, (P - 1) * T_l + 2:] = 3
    return seg

def check(impl, devices, B, T, H, HV, K, V):
    x = random_op_inputs(0, B=B, T=T, H=H, HV=HV, K=K, V=V, with_state=True)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta", "initial_state")]
    key_o, key_S = jax.random.split(jax.random.key(1))
    r_o = jax.random.normal(key_o, (B, T, HV, V))
    r_S = jax.random.normal(key_S, (B, HV, K, V))

    def loss(op, args, seg):
        o, S = op(*args[:5], initial_state=args[5], segment_ids=seg, output_final_state=True)
        return jnp.sum(o * r_o) + jnp.sum(S * r_S), (o, S)

    grad = lambda op: jax.jit(jax.value_and_grad(functools.partial(loss, op), has_aux=True))
    reference = grad(functools.partial(gated_delta_rule, impl="scan"))
    split = grad(functools.partial(gated_delta_rule_context_parallel, impl=impl, chunk_size=16))
    for P in devices:
        seg = jnp.asarray(segments(B, T, P))
        (_, (o_ref, S_ref)), grads_ref = reference(args, seg)
        with jax.set_mesh(mesh(P)):
            (_, (o, S)), grads = split(args, seg)
        errs = [close("o", o, o_ref), close("final state", S, S_ref)]
        for name, g, g_ref in zip(("dq", "dk", "dv", "dg", "dbeta", "dS0"), grads, grads_ref):
            errs.append(close(name, g, g_ref))
        print(f"{P} devices, {impl}: max error {max(errs):.1e}")

# Ragged device shares (74 and 37 tokens: not whole chunks of 16), GVA, initial states.
check("chunk", (2, 4), B=3, T=148, H=2, HV=4, K=8, V=6)
# The Pallas kernels (interpret mode here) and their custom VJP under the same split.
check("pallas_triton", (2,), B=2, T=32, H=1, HV=2, K=8, V=8)
"""


def test_op_matches_scan_reference_forward_and_gradients():
    out = _run(_OP)
    assert out.count("max error") == 3, out


_LM = """
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from configs.model import get_model_config
from gdn_jax.model import LM

B, T, V = 2, 80, 64
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
seg = np.ones((B, T), np.int32)
seg[0, 17:], seg[0, 40:] = 2, 3    # a document starting at a device's first token (40)
seg[1, 20:], seg[1, 61:] = 2, 3    # documents crossing device boundaries
seg = jnp.asarray(seg)
r = jax.random.normal(jax.random.key(5), (B, T, V)) / (B * T) ** 0.5

def run(name, devices, remat="none"):
    # window 24: with 2 devices (40 tokens each) SWA takes a halo from the previous device, with
    # 4 (20 each) it all-gathers the keys and values.
    layers = 1 if name == "tiny" else 2  # G; G then S
    cfg = get_model_config(name, vocab_size=V, dtype="float32", gdn_impl="chunk", window_size=24,
                           num_layers=layers, remat=remat)
    graphdef, params, rest = nnx.split(LM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params, tokens, seg):
        logits = nnx.merge(graphdef, params, rest)(tokens, seg)
        return jnp.sum(logits * r), logits

    m = mesh(devices, ("data", "context"))
    with jax.set_mesh(m):
        split = NamedSharding(m, P(None, "context"))
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            params, jax.device_put(tokens, split), jax.device_put(seg, split))
    return logits, jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

for name in ("tiny", "tiny_h1"):
    logits_1, grads_1 = run(name, 1)
    # the 1.3B GDN presets' remat, whose named values sit inside the context-parallel mixer
    cases = [(2, "none"), (4, "none")] + ([(2, "dots_gdn_mixer")] if name == "tiny" else [])
    for devices, remat in cases:
        logits, grads = run(name, devices, remat)
        errs = [close("logits", logits, logits_1)]
        errs += [close(jax.tree_util.keystr(path), g, g_1) for (path, g), g_1 in zip(
            jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_1))]
        print(f"{name} context={devices} remat={remat}: max error {max(errs):.1e} over "
              f"{len(errs)} arrays")
"""


def test_lm_and_h1_context_2_and_4_match_one_device():
    out = _run(_LM)
    assert out.count("max error") == 5, out


def _cfg(*overrides):
    return experiment.apply_overrides(experiment.get_config("tiny"), list(overrides))


def test_bad_meshes_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"mesh.context=4 must divide data.seq_len / "
                                         r"model.gdn_chunk_size = 96 / 16"):
        mesh_lib.check_config(_cfg("mesh.context=4", "data.seq_len=96"), 4)
    with pytest.raises(ValueError, match=r"product 8 does not match the 4 devices"):
        mesh_lib.check_config(_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.context=2"), 4)
    with pytest.raises(ValueError, match=r"layer 0 \('M', Mamba2\) has no context parallelism"):
        cfg = experiment.apply_overrides(experiment.get_config("tiny_h2"), ["mesh.context=2"])
        mesh_lib.check_config(cfg, 2)
    with pytest.raises(ValueError, match=r"layer 1 \('S', attention\).*attn_impl='cudnn'"):
        cfg = experiment.apply_overrides(experiment.get_config("tiny_h1"),
                                         ["mesh.context=2", "model.attn_impl=cudnn"])
        mesh_lib.check_config(cfg, 2)
    assert mesh_lib.check_config(_cfg("mesh.context=4", "data.seq_len=128"), 4) == {
        "data": 1, "fsdp": 1, "context": 4, "tensor": 1}


def test_train_refuses_a_bad_mesh_before_compiling(tmp_path, caplog):
    with jax.log_compiles(True), pytest.raises(ValueError, match="does not match the 1 devices"):
        loop.train(_cfg("mesh.context=2"), str(tmp_path / "run"))
    assert not any("Compiling" in r.getMessage() or "compilation" in r.getMessage()
                   for r in caplog.records)
    assert not (tmp_path / "run").exists()
