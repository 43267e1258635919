"""End-to-end training tests on CPU, in subprocesses: sharding, multi-process, resume, SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from configs import experiment
from gdn_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# Small and quick: tiny model, 8 x 64 tokens per step.
SMALL = ["data.seq_len=64", "train.global_batch=8", "train.warmup_steps=5", "train.steps=40"]
# LLVM's -O0: a third less compile time for the tiny models, the same arithmetic.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _train_cmd(workdir, steps, *overrides):
    return [
        sys.executable,
        TRAIN,
        "--workdir",
        str(workdir),
        "--steps",
        str(steps),
        "--set",
        *SMALL,
        *overrides,
    ]


def _run(cmd, timeout=240, **env):
    out = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _data_state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
    with open(path) as f:
        return json.load(f)


_SHARDED = textwrap.dedent("""
    import re
    import jax, numpy as np
    from configs import experiment
    from gdn_jax.data import pipeline
    from gdn_jax.train import mesh as mesh_lib, step as step_lib
    assert jax.device_count() == 8
    cfg = experiment.apply_overrides(experiment.get_config("tiny_h1"), {overrides!r})
    it = iter(pipeline.make_dataset(cfg.data, global_batch=8, rows=range(8)))
    batches = [{{k: b[k] for k in step_lib.BATCH_KEYS}} for b in (next(it) for _ in range(3))]
    axes = mesh_lib.MESH_AXES

    def mesh(shape):
      n = int(np.prod(shape))
      return jax.make_mesh(shape, axes, devices=jax.devices()[:n],
                           axis_types=(jax.sharding.AxisType.Auto,) * len(axes))

    def run(mesh, *overrides):
      trainer = step_lib.build(experiment.apply_overrides(cfg, overrides), mesh)
      state, rest = trainer.init_fn(), trainer.rest_fn()
      losses = []
      for b in batches:
        state, m = trainer.step_fn(state, rest, mesh_lib.global_batch_array(b, mesh, 8))
        losses.append(float(m["loss"]))
      specs = {{str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
          jax.tree.map(lambda x: x.sharding, state["params"]))[0]}}
      return losses, jax.device_get(state["params"]), specs, trainer

    l1, p1, _, _ = run(mesh((1, 1, 1, 1)))
    # The fused, chunked LM loss (the default) against the plain one.
    lp, _, _, _ = run(mesh((1, 1, 1, 1)), "train.loss=plain")
    np.testing.assert_allclose(lp, l1, rtol=1e-5, atol=1e-5)
    # (data, fsdp, context, tensor): 2 x 2 x 1 x 2 with 2 microbatches; FSDP over 4 devices with
    # each row's tokens split over 2 more (a document's positions continue across the split).
    for shape, micro in (((2, 2, 1, 2), 2), ((1, 4, 2, 1), 1)):
      l8, p8, specs, trainer = run(mesh(shape), f"train.microbatches={{micro}}")
      print(shape, "losses", l1, l8)
      assert any("fsdp" in str(s) for s in specs.values()), specs
      np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)

    # Gradients cross devices in train.grad_reduce_dtype: explicit reduce-scatters over fsdp and
    # all-reduces over the rest, in the lowered step.
    for dtype, t in (("float32", "f32"), ("bfloat16", "bf16")):
      m = mesh((2, 2, 1, 2))
      trainer = step_lib.build(experiment.apply_overrides(
          cfg, [f"train.grad_reduce_dtype={{dtype}}", "model.dtype=bfloat16"]), m)
      b = mesh_lib.global_batch_array(batches[0], m, 8)
      text = trainer.lower_fn(trainer.init_fn(), trainer.rest_fn(), b).as_text()
      found = set(re.findall(r'"stablehlo.reduce_scatter".*?[}}][)] : [(]tensor<(?:[0-9]+x)*([a-z0-9]+)>',
                             text, re.S))
      print(dtype, found)
      assert found == {{t}}, found
    print("OK")
""")


def test_sharded_accumulated_steps_match_single_device():
    # FSDP, context and tensor parallelism with microbatches vs one device taking the whole batch.
    overrides = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.seq_len=32",
                 "train.global_batch=8", "data.prefetch=0"]
    code = _SHARDED.format(overrides=overrides)
    out = _run(
        [sys.executable, "-c", code],
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false "
        + FAST_COMPILE,
    )
    assert "OK" in out.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


AUDITED = os.path.join(ROOT, "tests", "audited_train.py")


def _launch(workdir, steps, processes, audit_dir, *overrides):
    """train.py (audited) with `processes` processes on localhost; returns their outputs."""
    cmd = [sys.executable, AUDITED, "--workdir", str(workdir), "--steps", str(steps), "--set",
           *SMALL, "run.log_every=1", *overrides]
    if processes > 1:
        port = _free_port()
        cmds = [cmd + ["--coordinator_address", f"localhost:{port}", "--num_processes",
                       str(processes), "--process_id", str(i)] for i in range(processes)]
    else:
        cmds = [cmd]
    env = _env(AUDIT_DIR=str(audit_dir), XLA_FLAGS=FAST_COMPILE)
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _tokens_by_step(audit_dir):
    """{step: [(document id, position) of every input token fed at that step, by any process]}."""
    out = {}
    for path in audit_dir.glob("*.jsonl"):
        for record in map(json.loads, path.read_text().splitlines()):
            tokens = out.setdefault(record["step"], [])
            for row in record["rows"]:
                tokens.extend((d, p) for d, first, last in row for p in range(first, last + 1))
    return out


def test_elastic_resume_1_then_2_then_1_processes_matches_uninterrupted(tmp_path):
    steps, G, T = 9, 8, 64
    (tmp_path / "audit_ref").mkdir()
    (tmp_path / "audit").mkdir()
    _launch(tmp_path / "ref", steps, 1, tmp_path / "audit_ref")
    _launch(tmp_path / "run", 3, 1, tmp_path / "audit")
    outs = _launch(tmp_path / "run", 6, 2, tmp_path / "audit")
    assert "2 process(es)" in outs[0] and "resuming at step 3" in outs[0], outs[0]
    outs = _launch(tmp_path / "run", steps, 1, tmp_path / "audit")
    assert "1 process(es)" in outs[0] and "resuming at step 6" in outs[0], outs[0]

    ref, got = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    for s in ref:
        np.testing.assert_allclose(got[s]["loss"], ref[s]["loss"], rtol=1e-5, err_msg=f"step {s}")
        np.testing.assert_allclose(got[s]["grad_norm"], ref[s]["grad_norm"], rtol=1e-4)
    # The 2-process checkpoint: each process wrote the position of its own rows.
    ck = tmp_path / "run" / "checkpoints" / "6" / "data"
    states = [json.loads((ck / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0]["rows"] == [0, 1, 2, 3] and states[1]["rows"] == [4, 5, 6, 7]

    # The tokens fed, by their global ids: the same at every step as the uninterrupted run's ...
    seen, want = _tokens_by_step(tmp_path / "audit"), _tokens_by_step(tmp_path / "audit_ref")
    assert sorted(seen) == sorted(want) == list(range(1, steps + 1))
    for s in seen:
        assert len(seen[s]) == G * T and sorted(seen[s]) == sorted(want[s]), f"step {s}"
    # ... none twice ...
    tokens = [t for s in seen for t in seen[s]]
    assert len(set(tokens)) == len(tokens)
    # ... and no gaps: every document read from its first token on without a hole, and row r's
    # stream reads documents r, r + G, r + 2G, ... without skipping one.
    positions = {}
    for d, p in tokens:
        positions.setdefault(d, []).append(p)
    assert all(sorted(ps) == list(range(len(ps))) for ps in positions.values())
    for r in range(G):
        docs = sorted(d for d in positions if d % G == r)
        assert docs == list(range(r, r + G * len(docs), G)), (r, docs)

    # Another global batch cannot continue the same order: refused, naming the field.
    cfg = experiment.get_config(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"train.global_batch=8.*train.global_batch=8"):
        loop.train(experiment.apply_overrides(cfg, ["train.global_batch=16"]),
                   str(tmp_path / "run"), stop_step=12)


def test_kill9_resume_matches_uninterrupted_run_and_loss_falls(tmp_path):
    steps = 30
    extra = ["run.log_every=1", "run.checkpoint_every=10"]
    _run(_train_cmd(tmp_path / "ref", steps, *extra))
    ref = _metrics(tmp_path / "ref")
    # The tiny config learns: loss falls well below its start (ln 258 ~ 5.55).
    assert ref[steps]["loss"] < ref[1]["loss"] - 1.5, (ref[1]["loss"], ref[steps]["loss"])

    cmd = _train_cmd(tmp_path / "run", steps, *extra)
    # The audited command trains the same, but a second per step from step 12 on, so the kill
    # lands after checkpoint 10's commit and well before the end on any machine.
    audit = tmp_path / "audit"
    audit.mkdir()
    proc = subprocess.Popen([sys.executable, AUDITED, *cmd[2:]],
                            env=_env(AUDIT_DIR=str(audit), AUDIT_SLOW_FROM="12"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "run" / "checkpoints" / "10" / "commit_success.txt"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    killed_at = max(_metrics(tmp_path / "run"))
    assert killed_at < steps, "the run finished before it was killed"
    _run(cmd)
    got = _metrics(tmp_path / "run")
    assert sorted(got) == sorted(ref)
    for s in ref:
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(got[s][k], ref[s][k], rtol=1e-6, atol=0, err_msg=f"{k}@{s}")
    # Same data positions: every row's (documents consumed, offset) agrees at every checkpoint.
    assert _data_state(tmp_path / "run", steps) == _data_state(tmp_path / "ref", steps)

    # The eval-facing loader rebuilds the model from config.json + the latest checkpoint.
    import jax
    from gdn_jax.train.checkpoint import load_params
    from flax import nnx

    model_cfg, model = load_params(str(tmp_path / "run"))
    assert model_cfg.vocab_size == 258
    tokens = np.zeros((1, 8), np.int32)
    assert np.isfinite(np.asarray(model(jax.numpy.asarray(tokens)))).all()
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) > 0


def test_sigterm_saves_a_checkpoint(tmp_path):
    cmd = _train_cmd(tmp_path / "run", 100000, "run.log_every=1", "run.checkpoint_every=100000")
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if (tmp_path / "run" / "metrics.jsonl").exists() and _metrics(tmp_path / "run"):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    steps = [int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1
    assert _data_state(tmp_path / "run", steps[0])["rows"] == list(range(8))


def test_nonfinite_loss_stops_with_a_message(tmp_path):
    cmd = _train_cmd(
        tmp_path / "run",
        20,
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.clip_norm=0",
        "run.checkpoint_every=1000",
    )
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "last good params saved" in out.stderr or "checkpoint of the last good" in out.stderr
    steps = [int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    assert steps


def test_cli_rejects_unknown_override(tmp_path):
    out = subprocess.run(
        [sys.executable, TRAIN, "--workdir", str(tmp_path), "--set", "train.lrr=1"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "train has no field 'lrr'" in out.stderr
