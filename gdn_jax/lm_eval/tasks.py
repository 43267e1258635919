"""lm-eval tasks as eval.py runs them: `--tasks lm_eval:NAME`, results into results.json.

Task names are lm-eval's (tasks, groups and tags: `lm-eval ls tasks`), or those of YAML files under
include_path. When every name is found under include_path, lm-eval's built-in index (thousands
of YAML files, ~10 s to scan) is not read. Nothing downloads here; a built-in task fetches its
data set from the Hugging Face hub the first time it runs (HF_DATASETS_OFFLINE=1 forbids it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

PREFIX = "lm_eval:"


def task_manager(names: Sequence[str], include_path: str | None):
    """A TaskManager that knows every name; ValueError naming those no index has."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f" or under {include_path}" if include_path else ""
        raise ValueError(f"unknown lm-eval task(s) {', '.join(missing)}: not in lm-eval's index"
                         f"{where} (`lm-eval ls tasks` lists them; --lm_eval_include_path DIR adds "
                         f"YAML tasks)")
    return manager


def run_task(lm, name: str, manager, *, limit: float | None = None,
             num_fewshot: int | None = None, bootstrap_iters: int = 100_000) -> dict:
    """One task (or group) through lm_eval.simple_evaluate on the model `lm`; JSON-ready summary:
    {"results": {task: {"METRIC,FILTER": value}}, "groups", "n-shot", "n-samples", "versions",
    "higher_is_better", "limit"}. bootstrap_iters is lm-eval's, for the standard errors it
    cannot write in closed form (perplexities, F1); 0 skips every standard error."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters)
    keep = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
    summary = {k: out[k] for k in keep if k in out}
    summary["limit"] = limit
    return json_ready(summary)


def json_ready(x: Any) -> Any:
    """numpy scalars -> Python numbers, NaN / Inf -> None, recursively."""
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
