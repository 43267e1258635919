"""Progress lines, metrics.jsonl, TensorBoard, and MFU (process 0 writes; others stay quiet)."""

from __future__ import annotations

import json
import os
import time

import jax

# Dense bf16 peak FLOP/s per chip, by a substring of `device_kind`.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records after `last_step` (a resumed run logs those steps again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(records)


class MetricsLogger:
    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        flops_per_token: float | None,
        num_devices: int,
        start_step: int,
    ):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        peak = peak_flops(jax.devices()[0])
        self.peak_total = peak * num_devices if peak and flops_per_token else None
        self.flops_per_token = flops_per_token
        self._t0 = time.perf_counter()
        self._last_time = self._t0
        self._last_step = start_step
        self._start_step = start_step
        self._tokens = 0.0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)

    def add_tokens(self, n: float) -> None:
        self._tokens += n

    def log(self, step: int, metrics: dict) -> dict:
        """`metrics` are host floats of `step` (the step just finished)."""
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        record["tokens_per_sec"] = self._tokens / dt
        record["step_time"] = dt / max(steps, 1)
        if self.peak_total:
            record["mfu"] = record["tokens_per_sec"] * self.flops_per_token / self.peak_total
        self._last_time, self._last_step, self._tokens = now, step, 0.0
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step":
                self._tb.add_scalar(f"train/{k}", v, step)
        done = step - self._start_step
        eta = (now - self._t0) / max(done, 1) * (self.total_steps - step)
        line = (
            f"step {step:>7d}/{self.total_steps} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
            f"tok/s {record['tokens_per_sec']:,.0f}"
        )
        if "mfu" in record:
            line += f" | MFU {100 * record['mfu']:.1f}%"
        line += f" | ETA {eta / 60:.1f} min"
        print(line, flush=True)
        return record

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
