"""A float64 NumPy oracle written straight from the paper's equation: explicit matrices, a loop over t.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

It shares no code with gdn_jax, so it can judge every implementation.
"""

import numpy as np


def gated_delta_rule_oracle(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None):
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    group = HV // H
    scale = K ** -0.5 if scale is None else scale
    o = np.zeros((B, T, HV, V))
    final = np.zeros((B, HV, K, V))
    for b in range(B):
        for j in range(HV):
            h = j // group
            S = np.zeros((K, V)) if initial_state is None else np.asarray(initial_state[b, j], np.float64)
            for t in range(T):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros((K, V))
                kt = k[b, t, h][:, None]
                vt = v[b, t, j][:, None]
                S = np.exp(g[b, t, j]) * (np.eye(K) - beta[b, t, j] * kt @ kt.T) @ S + beta[b, t, j] * kt @ vt.T
                o[b, t, j] = S.T @ (scale * q[b, t, h])
            final[b, j] = S
    return o, final
