"""The Pallas decode step (kernels_pallas/decode.py, interpret mode on the CPU) against the float64
oracle, the XLA step and the scan reference, and wired through the op, the layer and generate()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.model import get_model_config
from gdn_jax import generate as G
from gdn_jax.inference import for_inference
from gdn_jax.model import LM
from gdn_jax.ops import decode_recurrence, gated_delta_rule_step, xla_decode_recurrence
from gdn_jax.reference import scan_gated_delta_rule
from kernels_pallas.decode import pallas_decode_recurrence
from op_inputs import random_op_inputs
from oracle import gated_delta_rule_oracle

CASES = [  # (B, H, HV, K, V, g_value, beta_value)
    (2, 2, 4, 8, 6, None, None),       # GVA, V not a multiple of 4
    (1, 1, 1, 200, 400, None, None),   # the paper's head dims: K not a power of two
    (3, 2, 2, 16, 64, 0.0, None),      # gate exactly 1
    (2, 1, 2, 32, 32, -30.0, None),    # state decayed to nothing
    (2, 2, 2, 16, 16, None, 0.0),      # no write
    (2, 2, 2, 16, 16, None, 1.0),      # full write
]


def _step_args(x):
    return [jnp.asarray(x[n][:, 0]) for n in ("q", "k", "v", "g", "beta")]


@pytest.mark.parametrize("B,H,HV,K,V,g_value,beta_value", CASES)
def test_pallas_step_matches_the_float64_oracle_and_the_xla_step(B, H, HV, K, V, g_value, beta_value):
    x = random_op_inputs(K + V, B=B, T=1, H=H, HV=HV, K=K, V=V, g_value=g_value,
                         beta_value=beta_value, with_state=True)
    o_ref, S_ref = gated_delta_rule_oracle(**x)
    args, S0 = _step_args(x), jnp.asarray(x["initial_state"])
    o, S = pallas_decode_recurrence(*args, S0, scale=K ** -0.5, interpret=True)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref[:, 0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(S, S_ref, rtol=2e-5, atol=2e-5)
    o_x, S_x = xla_decode_recurrence(*args, S0)
    np.testing.assert_allclose(o, o_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S, S_x, rtol=1e-5, atol=1e-5)


def test_pallas_steps_chained_under_jit_follow_the_scan_with_bf16_inputs():
    """T tokens stepped one at a time in a jitted scan (the state donated each step, as the decode
    loop does) give the scan reference's outputs and final state; bf16 inputs, float32 state."""
    B, T, H, HV, K, V = 2, 9, 2, 4, 32, 24
    x = random_op_inputs(3, B=B, T=T, H=H, HV=HV, K=K, V=V, with_state=True)
    bf = {n: jnp.asarray(x[n], jnp.bfloat16) for n in ("q", "k", "v", "g", "beta")}
    S0 = jnp.asarray(x["initial_state"])

    @jax.jit
    def run(q, k, v, g, beta, S):
        def one(S, xs):
            o, S = decode_recurrence(*xs, S, impl="pallas")
            return S, o
        xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
        S, o = jax.lax.scan(one, S, xs)
        return jnp.moveaxis(o, 0, 1), S

    o, S = run(*bf.values(), S0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    o_ref, S_ref = scan_gated_delta_rule(*bf.values(), scale=K ** -0.5, initial_state=S0, reset=None)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32),
                               rtol=1e-2, atol=1e-2)  # o rounded to bf16 by both
    np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-5)


def test_op_step_takes_the_impl_and_names_a_bad_one():
    x = random_op_inputs(5, B=1, T=1, H=1, HV=2, K=16, V=8, with_state=True)
    args, S0 = _step_args(x), jnp.asarray(x["initial_state"])
    o_p, S_p = gated_delta_rule_step(*args, S0, impl="pallas")
    o_x, S_x = gated_delta_rule_step(*args, S0, impl="xla")
    np.testing.assert_allclose(o_p, o_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S_p, S_x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_delta_rule_step(*args, S0, impl="triton")


def test_block_v_must_divide_v():
    x = random_op_inputs(6, B=1, T=1, H=1, K=8, V=24, with_state=True)
    with pytest.raises(ValueError, match="block_v must divide V = 24"):
        pallas_decode_recurrence(*_step_args(x), jnp.asarray(x["initial_state"]), scale=1.0,
                                 block_v=16, interpret=True)


def test_generate_with_the_pallas_decode_step_matches_the_xla_one():
    """The tiny GDN LM's inference copy with decode_impl="pallas" decodes the same greedy tokens as
    with "xla", and its decode-step logits agree to float32 rounding."""
    model = LM(get_model_config("tiny"), rngs=nnx.Rngs(0))
    xla = for_inference(model, dtype="float32", decode_impl="xla")
    pallas = for_inference(model, dtype="float32", decode_impl="pallas")
    prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, model.cfg.vocab_size)
    tokens_x = G.generate(xla, prompt, max_new_tokens=6, temperature=0.0)
    tokens_p = G.generate(pallas, prompt, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens_p), np.asarray(tokens_x))
    logits = []
    for m in (xla, pallas):
        _, cache = m.prefill(prompt, cache_len=16)
        step_logits, _ = m.step(prompt[:, -1], cache)
        logits.append(np.asarray(step_logits, np.float32))
        # the kernel runs in the "pallas" copy's step, and only there
        jaxpr = str(jax.make_jaxpr(lambda t, c: m.step(t, c))(prompt[:, -1], cache))
        assert ("gdn_decode_step" in jaxpr) == (m is pallas)
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decode_impl must be one of"):
        for_inference(model, decode_impl="triton")


def _bench():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "bench_decode_step.py")
    spec = importlib.util.spec_from_file_location("bench_decode_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_bench_checks_both_steps_and_prints_its_table(capsys):
    _bench().main(["--shapes", "tiny", "--batches", "2", "--iters", "1"])
    out = capsys.readouterr().out
    check = next(line for line in out.splitlines() if line.startswith("tiny B=2 pallas vs xla"))
    assert float(check.split("max |dS| ")[1]) < 1e-5
    row = next(line for line in out.splitlines() if line.startswith("| tiny | 2 |"))
    xla_us, pallas_us, floor_us, ratio = (float(x) for x in row.split("|")[3:7])
    assert xla_us > 0 and pallas_us > 0 and floor_us > 0
    assert abs(ratio - xla_us / pallas_us) < 0.02 * ratio + 0.01


def test_decode_bench_arguments_name_what_is_wrong(capsys):
    bench = _bench()
    for argv, said in ((["--shapes", "nope"], "unknown shapes"), (["--batches", "0"], "--batches"),
                       (["--iters", "0"], "--iters")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("H,HV,K,V", [(9, 9, 200, 400), (6, 6, 256, 512), (16, 32, 128, 128)])
def test_decode_kernel_lowers_to_triton_for_a_gpu(triton_lowers_as_for_h100, H, HV, K, V):
    """The kernel lowers to Triton for a GPU on this CPU at the 1.3B models' and Qwen3-Next's head
    dims (Triton refuses tensors whose dims are not powers of two: K = 200 must go through the
    mask, not a [200, BV] tile), with the state aliased to the new state."""
    B = 2
    q = jnp.zeros((B, H, K), jnp.bfloat16)
    v = jnp.zeros((B, HV, V), jnp.bfloat16)
    g = jnp.zeros((B, HV), jnp.bfloat16)
    S = jnp.zeros((B, HV, K, V), jnp.float32)
    fn = jax.jit(lambda q, k, v, g, b, S: pallas_decode_recurrence(q, k, v, g, b, S, scale=0.1,
                                                                   interpret=False), donate_argnums=5)
    text = fn.trace(q, q, v, g, g, S).lower(lowering_platforms=("cuda",)).as_text()
    assert "gdn_decode_step" in text
    assert "tf.aliasing_output" in text or "output_operand_alias" in text
