"""Every bad argument raises ValueError or TypeError naming it, before anything is computed."""

import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import gated_delta_rule, gated_delta_rule_step

B, T, H, HV, K, V = 2, 10, 2, 4, 8, 6


def good():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return dict(q=z(B, T, H, K), k=z(B, T, H, K), v=z(B, T, HV, V), g=z(B, T, HV), beta=z(B, T, HV))


def call(**changes):
    args = good()
    kw = {}
    for name, value in changes.items():
        (args if name in args else kw)[name] = value
    return gated_delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"),
                            **kw)


BAD = [
    ("q", dict(q=jnp.zeros((B, T, K))), ValueError),
    ("q", dict(q=jnp.zeros((B, T, H, K), jnp.int32)), TypeError),
    ("q", dict(q=np.zeros((B, T, H, K)).tolist()), TypeError),
    ("T >= 1", dict(q=jnp.zeros((B, 0, H, K)), k=jnp.zeros((B, 0, H, K)), v=jnp.zeros((B, 0, HV, V)),
                    g=jnp.zeros((B, 0, HV)), beta=jnp.zeros((B, 0, HV))), ValueError),
    ("k", dict(k=jnp.zeros((B, T, H, K + 1))), ValueError),
    ("k", dict(k=jnp.zeros((B, T, H, K), jnp.bfloat16)), TypeError),
    ("v", dict(v=jnp.zeros((B, T + 1, HV, V))), ValueError),
    ("v", dict(v=jnp.zeros((B, T, HV, V), jnp.int8)), TypeError),
    ("multiple of", dict(v=jnp.zeros((B, T, 3, V)), g=jnp.zeros((B, T, 3)), beta=jnp.zeros((B, T, 3))),
     ValueError),
    ("g", dict(g=jnp.zeros((B, T, H))), ValueError),
    ("beta", dict(beta=jnp.zeros((B, T))), ValueError),
    ("beta", dict(beta=jnp.zeros((B, T, HV), jnp.int32)), TypeError),
    ("initial_state", dict(initial_state=jnp.zeros((B, HV, V, K))), ValueError),
    ("initial_state", dict(initial_state=jnp.zeros((B, HV, K, V), jnp.bfloat16)), TypeError),
    ("segment_ids", dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), ValueError),
    ("segment_ids", dict(segment_ids=jnp.zeros((B, T), jnp.float32)), TypeError),
    ("chunk_size", dict(chunk_size=48), ValueError),
    ("chunk_size", dict(chunk_size=True), ValueError),
    ("impl", dict(impl="triton"), ValueError),
    ("scale", dict(scale="big"), TypeError),
    ("scale", dict(scale=float("nan")), ValueError),
    ("output_final_state", dict(output_final_state=1), TypeError),
]


@pytest.mark.parametrize("needle, changes, error", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(needle, changes, error):
    with pytest.raises(error, match=needle.replace("(", r"\(")):
        call(**changes)


def test_good_arguments_pass():
    o, S = call(output_final_state=True, impl="scan")
    assert np.all(np.asarray(o) == 0) and np.all(np.asarray(S) == 0)  # zero inputs give zero outputs


def step_args():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return dict(q_t=z(B, H, K), k_t=z(B, H, K), v_t=z(B, HV, V), g_t=z(B, HV), beta_t=z(B, HV),
                state=z(B, HV, K, V))


@pytest.mark.parametrize("name, bad, error", [
    ("q_t", jnp.zeros((B, K)), ValueError),
    ("k_t", jnp.zeros((B, H, K + 1)), ValueError),
    ("v_t", jnp.zeros((B, 3, V)), ValueError),
    ("g_t", jnp.zeros((B, H)), ValueError),
    ("beta_t", jnp.zeros((B, HV), jnp.int32), TypeError),
    ("state", jnp.zeros((B, HV, V, K)), ValueError),
])
def test_step_bad_argument_is_named(name, bad, error):
    args = step_args()
    args[name] = bad
    with pytest.raises(error, match=name):
        gated_delta_rule_step(*args.values())
