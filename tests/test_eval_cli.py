"""eval.py end to end on a run trained by train.py: results.json numbers, plots, generation, errors."""

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run trained for 4 steps by train.py, with checkpoints at steps 2 and 4."""
    d = str(tmp_path_factory.mktemp("run"))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--workdir",
        d,
        "--steps",
        "4",
        "--set",
        "run.checkpoint_every=2",
        "train.global_batch=4",
        "data.seq_len=64",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d


def _check_png(path):
    assert os.path.getsize(path) > 2000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not blank


def test_cli_end_to_end(workdir):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        "--workdir",
        workdir,
        "--tasks",
        "ppl,niah,mqar,extrapolation",
        "--lengths",
        "400",
        "--depths",
        "0,1",
        "--niah_samples",
        "1",
        "--extrapolation_seqs",
        "2",
        "--mqar_examples",
        "8",
        "--mqar_seq_len",
        "64",
        "--mqar_kv_pairs",
        "4,8",
        "--max_tokens",
        "1500",
        "--batch_size",
        "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 4" in proc.stdout  # the latest checkpoint
    assert "[s_niah_2] length    400 depth 100.0%" in proc.stdout
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert r["step"] == 4 and r["train_seq_len"] == 64
    ppl = r["ppl"]
    # Four steps of training: still close to uniform over the 258-token vocabulary.
    assert math.isfinite(ppl["perplexity"]) and 100 < ppl["perplexity"] < 600
    assert math.isclose(math.log(ppl["perplexity"]), ppl["nll_per_token"], rel_tol=1e-9)
    assert 1400 <= ppl["num_tokens"] < 1500 and ppl["window"] == 64
    for task in ("s_niah_1", "s_niah_2", "s_niah_3"):
        t = r["niah"]["tasks"][task]
        assert np.shape(t["exact_match"]) == (2, 1)
        assert all(0.0 <= x <= 1.0 for row in t["exact_match"] + t["contains"] for x in row)
        assert t["examples"][0]["length"] == 400 and len(t["examples"][0]["answer"]) in (7, 36)
        _check_png(os.path.join(out, t["plot"]))
    m = r["mqar"]
    assert [x["num_kv_pairs"] for x in m["results"]] == [4, 8]
    assert all(
        0.0 <= x["accuracy"] <= 1.0 and x["num_queries"] == 8 * x["num_kv_pairs"]
        for x in m["results"]
    )
    _check_png(os.path.join(out, "mqar.png"))
    e = r["extrapolation"]
    assert e["seq_len"] == 256 and e["train_multiple_edges"] == [0, 64, 128, 256]
    losses = e["log2_bucket_mean_loss"] + e["train_multiple_mean_loss"]
    assert all(math.isfinite(x) and 3.0 < x < 8.0 for x in losses)  # log(258) = 5.55
    _check_png(os.path.join(out, "extrapolation.png"))
    assert set(r["seconds"]) == {"ppl", "niah", "mqar", "extrapolation"}


def test_generate_prints_continuation(workdir, capsys):
    assert (
        eval_cli.main(
            [
                "--workdir",
                workdir,
                "--step",
                "2",
                "--generate",
                "def f(",
                "--max_new_tokens",
                "12",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "step 2" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith("def f(") and len(line) > len("def f(")


def test_errors(workdir, tmp_path, capsys):
    assert eval_cli.main(["--workdir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    assert eval_cli.main(["--workdir", str(no_ckpt)]) == 2
    assert "config.json" in capsys.readouterr().err
    with open(os.path.join(workdir, "config.json")) as f:
        (no_ckpt / "config.json").write_text(f.read())
    assert eval_cli.main(["--workdir", str(no_ckpt)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert eval_cli.main(["--workdir", workdir, "--step", "3"]) == 2
    assert "steps: [2, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", workdir, "--tasks", "ppl,bogus"])
    assert "unknown task(s) bogus" in capsys.readouterr().err
