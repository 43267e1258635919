"""lm-evaluation-harness (lm-eval 0.4.x) on gdn-jax runs: the model `gdn_jax`.

Importing this package registers `gdn_jax` in lm-eval's model registry (the class loads on first
use, from adapter.py), so that after `import gdn_jax.lm_eval`:

    lm_eval.simple_evaluate(model="gdn_jax", model_args="workdir=runs/tiny", tasks=["piqa"])

and on the command line `python3 -m gdn_jax.lm_eval --workdir runs/tiny --tasks piqa` takes every
option of `lm_eval` / `lm-eval run`. eval.py runs lm-eval tasks as `--tasks lm_eval:piqa`
(tasks.py). lm-eval is an optional dependency: `pip install -e ".[lm_eval]"`.
"""

from __future__ import annotations

MODEL_NAME = "gdn_jax"

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models, before the registry is non-empty)
    from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'gdn_jax.lm_eval needs lm-eval: pip install -e ".[lm_eval]" (lm-eval 0.4.x)'
    ) from e

if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target="gdn_jax.lm_eval.adapter:GdnJaxLM")
