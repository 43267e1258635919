#!/usr/bin/env bash
# lm-evaluation-harness for the GPU machine, which lacks it (../shared/device.md lists what it has).
# Its import closure is ~100 MB of wheels, more than one device call may carry (64 MiB), so it
# travels in two git-ignored folders, carried by two calls on the same warm machine:
#   .lmw_a/  pyarrow (~54 MB)
#   .lmw_b/  lm-eval, datasets, pandas, sacrebleu, lxml, accelerate and the small rest
# Each is installed into .site_lm/ (git-ignored, so it stays on the machine between calls). A wheel
# whose distribution the machine already has is skipped: the image's versions (huggingface_hub,
# requests, numpy, ...) are what its transformers and torch were installed with, and a copy on
# PYTHONPATH would shadow them. scipy, scikit-learn and nltk are left out: lm-eval imports them only
# for metrics our tasks do not use.
#
#   bash bench/lm_eval_wheels.sh prepare        # here, with the package registry reachable
#   bash bench/lm_eval_wheels.sh install .lmw_a # on the device (call 1, carry [".lmw_a"])
#   bash bench/lm_eval_wheels.sh install .lmw_b # on the device (call 2, carry [".lmw_b", ...])
#   then PYTHONPATH=...:$PWD/.site_lm           # bench/gpu_pending.sh lm_eval does all of it
set -euo pipefail
cmd=${1:?"usage: bash bench/lm_eval_wheels.sh prepare | install DIR"}
cd "$(dirname "$0")/.."
case $cmd in
prepare)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # Two of lm-eval's needs publish sources only; they are pure Python, so build their wheels here.
    python3 -m pip wheel -q --no-deps -w "$tmp" sqlitedict==2.1.0 word2number==1.1
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --find-links "$tmp" -d "$tmp" lm-eval==0.4.13 accelerate psutil
    rm -rf .lmw_a .lmw_b && mkdir -p .lmw_a .lmw_b
    for w in "$tmp"/*.whl; do
        case $(basename "$w") in
            pyarrow-*) cp "$w" .lmw_a/ ;;
            scipy-*|scikit_learn-*|nltk-*|numpy-*|setuptools-*|hf_xet-*|torch-*|nvidia_*|triton-*) ;;
            *) cp "$w" .lmw_b/ ;;
        esac
    done
    du -sh .lmw_a .lmw_b
    for d in .lmw_a .lmw_b; do
        [ "$(du -sm "$d" | cut -f1)" -lt 60 ] || { echo "$d is over 60 MB: split it further"; exit 1; }
    done ;;
install)
    dir=${2:?"usage: bash bench/lm_eval_wheels.sh install DIR"}
    [ -d "$dir" ] || { echo "no folder $dir: carry it (see this script's header)"; exit 1; }
    mkdir -p .site_lm
    # One Python process checks every wheel against the installed distributions: a `pip show` per
    # wheel (~2 s each, 70 wheels) outlasted the step's two minutes on 2026-12-04.
    mapfile -t missing < <(python3 - "$dir" <<'PY'
import importlib.metadata as md, os, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
for wheel in sorted(os.listdir(sys.argv[1])):
    if wheel.endswith(".whl"):
        dist = wheel.split("-")[0]
        if norm(dist) in have:
            print(f"  have {dist} (the machine's own)", file=sys.stderr)
        else:
            print(os.path.join(sys.argv[1], wheel))
PY
)
    if [ ${#missing[@]} -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target .site_lm "${missing[@]}"
    fi
    echo "installed ${#missing[@]} of $(ls "$dir"/*.whl | wc -l) wheels from $dir into .site_lm" ;;
*)
    echo "unknown command '$cmd'"; exit 2 ;;
esac
