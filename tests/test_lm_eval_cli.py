"""`python3 -m gdn_jax.lm_eval`, `eval.py --tasks lm_eval:...`, and the errors that name a task.

Local tasks only (tests/lm_eval_data.py); nothing downloads. The numbers themselves are checked in
test_lm_eval.py; here both command lines must report the accuracy of a direct simple_evaluate.
"""

import glob
import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads its config
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]'")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lm_eval_data  # noqa: E402
from gdn_jax.evaluate import loading  # noqa: E402
from gdn_jax.lm_eval.__main__ import lm_eval_argv, main  # noqa: E402
from gdn_jax.lm_eval.adapter import GdnJaxLM  # noqa: E402
from gdn_jax.lm_eval.encoding import RequestError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return lm_eval_data.make_workdir(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tasks"))
    lm_eval_data.write_mc_task(d)
    lm_eval_data.write_gen_task(d, ["\n"], 8, name="toy_beams", num_beams=4)
    return d


@pytest.fixture(scope="module")
def lm(workdir):
    return GdnJaxLM(workdir=workdir, batch_size=8, log=lambda m: None)


def _evaluate(lm, tasks_dir, task, **kwargs):
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                   bootstrap_iters=0, **kwargs)


@pytest.fixture(scope="module")
def accuracy(lm, tasks_dir):
    return _evaluate(lm, tasks_dir, "toy_mc")["results"]["toy_mc"]["acc,none"]


def test_workdir_flag_becomes_model_and_model_args():
    assert lm_eval_argv(["--workdir", "W", "--tasks", "t", "--model_args", "dtype=float32"]) == [
        "run", "--model", "gdn_jax", "--model_args", "workdir=W", "--tasks", "t",
        "--model_args", "dtype=float32"]
    assert lm_eval_argv(["run", "--model", "gdn_jax", "--tasks", "t"]) == [
        "run", "--model", "gdn_jax", "--tasks", "t"]


def test_module_command_line_runs_lm_eval(workdir, tasks_dir, accuracy, tmp_path, capsys):
    main(["--workdir", workdir, "--tasks", "toy_mc", "--include_path", tasks_dir,
          "--batch_size", "8", "--output_path", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "[gdn_jax] loglikelihood" in printed and "requests/s" in printed  # progress lines
    (path,) = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        saved = json.load(f)
    assert saved["results"]["toy_mc"]["acc,none"] == accuracy
    assert saved["config"]["model_step"] == 0 and saved["config"]["model_name"] == "tiny_h1"


def test_eval_py_puts_lm_eval_results_next_to_its_own(workdir, tasks_dir, accuracy, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("alpha beta gamma delta " * 20)
    out = tmp_path / "eval"
    argv = ["--workdir", workdir, "--tasks", "ppl,lm_eval:toy_mc", "--data", str(text),
            "--window", "64", "--lm_eval_include_path", tasks_dir, "--out", str(out)]
    assert eval_cli.main(argv) == 0
    with open(out / "results.json") as f:
        r = json.load(f)
    assert r["ppl"]["perplexity"] > 1
    assert r["lm_eval"]["toy_mc"]["results"]["toy_mc"]["acc,none"] == accuracy
    assert r["lm_eval"]["toy_mc"]["n-samples"]["toy_mc"]["effective"] == 12
    assert set(r["seconds"]) == {"ppl", "lm_eval:toy_mc"}


def test_chat_templates_are_refused_naming_the_task(lm, tasks_dir):
    with pytest.raises(RequestError, match="'toy_mc'.*chat template"):
        _evaluate(lm, tasks_dir, "toy_mc", apply_chat_template=True)


def test_unsupported_generation_options_are_refused_naming_the_task(lm, tasks_dir):
    with pytest.raises(RequestError, match="'toy_beams'.*num_beams"):
        _evaluate(lm, tasks_dir, "toy_beams")


def test_bad_model_arguments(workdir):
    with pytest.raises(ValueError, match="workdir=DIR"):
        GdnJaxLM()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        GdnJaxLM(run=loading.load_run(workdir), batch_size="auto")
