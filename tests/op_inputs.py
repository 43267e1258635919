"""Random inputs for the gated delta rule with realistic statistics (unit-norm keys, g <= 0, beta in (0, 1))."""

import numpy as np


def random_op_inputs(seed, B=2, T=37, H=2, HV=None, K=8, V=6, *, g_value=None, beta_value=None,
                     with_state=False, num_docs=None):
    """Returns a dict of float32 NumPy arrays: q, k, v, g, beta, and optionally initial_state, segment_ids.

    g_value / beta_value pin every g (or beta) to one number, for the edge cases (g = 0, g = -30, ...).
    num_docs > 1 packs that many documents per row, with boundaries at random positions.
    """
    rng = np.random.default_rng(seed)
    HV = HV or H
    k = rng.standard_normal((B, T, H, K))
    x = dict(
        q=rng.standard_normal((B, T, H, K)),
        k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=rng.standard_normal((B, T, HV, V)),
        g=np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, HV)) - 2))),  # logsigmoid: in (-inf, 0)
        beta=1 / (1 + np.exp(-rng.standard_normal((B, T, HV)))),
    )
    if g_value is not None:
        x["g"] = np.full((B, T, HV), g_value)
    if beta_value is not None:
        x["beta"] = np.full((B, T, HV), beta_value)
    if with_state:
        x["initial_state"] = rng.standard_normal((B, HV, K, V))
    out = {n: a.astype(np.float32) for n, a in x.items()}
    if num_docs:
        cuts = np.stack([np.sort(rng.choice(np.arange(1, T), num_docs - 1, replace=False)) for _ in range(B)])
        out["segment_ids"] = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32) + 7
    return out
