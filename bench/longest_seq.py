"""The longest sequence that trains: bench/train_throughput.py at one T after another, each run in
its own process (an out-of-memory failure cannot poison the next).

    python bench/longest_seq.py                                   # fla_gdn_1.3b, batch 1, one GPU
    python bench/longest_seq.py --context 8 -- --remat full       # 8 GPUs of one host, T split 8 ways
    python bench/longest_seq.py --config tiny --start 128 --granule 64 --max_trials 3   # CPU smoke

Peak memory grows linearly with T at a fixed batch (the GDN state does not grow; activations do), so
two runs at --start and 2 x --start give the line, and its crossing with the device's memory limit
predicts the longest T. Then runs at the prediction (rounded down to --granule tokens) and a
granule above it check it, and, where the prediction was wrong, a bisection in granules finds the
edge. Prints one line per run and the longest T that ran. Arguments after `--` go to
train_throughput.py (e.g. --remat full, --set ...). XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default
0.75 of the GPU) bounds what "fits" means; set it to 0.95 to use nearly the whole GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.py")


def trial(args, T: int) -> dict:
    """One run at sequence length T: {"T", "ok", "peak" (GiB), "limit" (GiB), "tok_s", "why"}."""
    cmd = [sys.executable, BENCH, "--config", args.config, "--batch", "1", "--seq", str(T),
           "--steps", "1", "--warmup", "1", "--context", str(args.context), *args.bench]
    t0 = time.time()
    # Read as it prints: the run is over at its "last loss" line. On the GPU a 1.3B run has then
    # sat for minutes before exiting (2026-12-04, cause not found), so it is killed there.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, done = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("last loss"):
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    finished = done.wait(args.timeout)
    text = "".join(lines)
    ok = "last loss" in text or (proc.poll() == 0)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if not finished:
        last = [l for l in text.strip().splitlines() if l.strip()][-1:] or ["(no output)"]
        return {"T": T, "ok": False, "seconds": args.timeout,
                "why": f"timed out after {args.timeout} s; last output: {last[0][:100]}"}
    r = {"T": T, "ok": ok, "seconds": round(time.time() - t0)}
    m = re.search(r"peak memory\s+([0-9.]+) GiB \(device 0, of ([0-9.]+) GiB\)", text)
    if m:
        r["peak"], r["limit"] = float(m[1]), float(m[2])
    m = re.search(r"tokens/s\s+([0-9,]+)", text)
    if m:
        r["tok_s"] = int(m[1].replace(",", ""))
    if not ok:
        oom = re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", text)
        last = [l for l in text.strip().splitlines() if l.strip()][-1:] or ["(no output)"]
        r["why"] = "out of memory" if oom else last[0][:120]
    return r


def show(r: dict) -> None:
    if r["ok"]:
        peak = f"{r['peak']:.2f} of {r['limit']:.2f} GiB" if "peak" in r else "peak n/a"
        print(f"T = {r['T']:>8}: ran, {peak}, {r.get('tok_s', 0):,} tokens/s ({r['seconds']} s "
              "with start-up and compile)", flush=True)
    else:
        print(f"T = {r['T']:>8}: failed ({r['why']})", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="fla_gdn_1.3b")
    p.add_argument("--context", type=int, default=1, help="context axis size (GPUs per sequence)")
    p.add_argument("--start", type=int, default=8192, help="first T (must run)")
    p.add_argument("--granule", type=int, default=4096, help="T step of the search, tokens")
    p.add_argument("--max_trials", type=int, default=8)
    p.add_argument("--timeout", type=int, default=900,
                   help="seconds per run, start-up and compile included (the 1.3B step compiles "
                        "for over 100 s on an H200)")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then train_throughput.py args")
    args = p.parse_args()
    args.bench = [a for a in args.bench if a != "--"]
    g = args.granule
    results = []

    def run(T):
        r = trial(args, T)
        results.append(r)
        show(r)
        return r

    a, b = run(args.start), run(2 * args.start) if args.max_trials > 1 else None
    if not a["ok"]:
        sys.exit(f"T = {args.start} does not run: lower --start")
    good = a["T"]
    bad = None
    if b is not None and b["ok"]:
        good = b["T"]
        if "peak" in a and "peak" in b and b["peak"] > a["peak"]:
            per_token = (b["peak"] - a["peak"]) / (b["T"] - a["T"])
            guess = int((b["limit"] - b["peak"]) / per_token + b["T"]) // g * g
            print(f"predicted from the line through the first two: T = {guess}", flush=True)
            if guess > good and len(results) < args.max_trials:
                r = run(guess)
                good, bad = (guess, None) if r["ok"] else (good, guess)
            if bad is None and len(results) < args.max_trials:
                r = run(good + g)
                good, bad = (good, good + g) if not r["ok"] else (good + g, None)
    elif b is not None:
        bad = b["T"]
    while len(results) < args.max_trials:
        if bad is None:  # no failure yet: keep doubling
            T = 2 * good
        elif bad - good <= g:
            break
        else:
            T = (good + bad) // 2 // g * g
            if T <= good:
                break
        r = run(T)
        good, bad = (T, bad) if r["ok"] else (good, T)
    edge = f", and T = {bad} did not" if bad else " (no failure reached)"
    print(f"longest T that ran: {good} ({args.config}, batch 1, context {args.context}){edge}")


if __name__ == "__main__":
    main()
