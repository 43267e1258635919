#!/usr/bin/env bash
# The GPU measurements still owed by the open issues, in parts that each fit one device call
# (10 minutes). Run from the repository root on the GPU machine, with .whl carried (and, for part
# "flashqla", .anchors); logs go to $OUT (or ./gpu_logs), one file per step, and the tail of each
# is printed at the end. Every step has its own timeout, so one that hangs cannot take the call.
#
#   bash bench/gpu_pending.sh k256         # issue 10: K = 256 against FLA, checked; pipelined gradient loops
#   bash bench/gpu_pending.sh kernels      # issue 10: the new Mosaic defaults against the old, K = 128 shapes
#   bash bench/gpu_pending.sh breakdown    # issue 10: per-kernel times of every Mosaic variant
#   bash bench/gpu_pending.sh parity       # issue 12: FLA logits parity at 1.3B
#   bash bench/gpu_pending.sh generation   # issue 11: fla_gdn_1.3b with FLA in the same run
#   bash bench/gpu_pending.sh generation2  # issue 11: gdn_1.3b, S-NIAH wall time, CUDA graphs
#   bash bench/gpu_pending.sh scale        # issue 14: longest T at batch 1; issue 13: gdn_1.3b step
#   bash bench/gpu_pending.sh train_profile  # issue 13: the 1.3B step's time by model scope
#   bash bench/gpu_pending.sh lm_eval      # issue 16: lm-eval requests/s and agreement with FLA
#   bash bench/gpu_pending.sh flashqla     # issue 10: FlashQLA, FLA, new and old Mosaic defaults, K = 128
#   bash bench/gpu_pending.sh flashqla_h16 # issue 10: the short form (h16k128, new defaults only)
set -uo pipefail
part=${1:?"usage: bash bench/gpu_pending.sh k256|kernels|breakdown|parity|generation|generation2|scale|train_profile|lm_eval|flashqla|flashqla_h16"}
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1 || echo "pip install of .whl failed (see $out/pip.log)"
export PYTHONPATH=$PWD:/tmp/site

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a timeout, logging to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $?"
}

case $part in
k256)
    # Run L (2026-12-03) measured the masked paths and the output sweep; what it leaves at K = 256:
    # the gradient kernels' loop over value tiles software-pipelined (ls2, ls3; FLA's autotuned
    # dq/dk kernel runs 2-4 stages, ours unrolled at 1; key grads are the largest kernel, 1.02 ms
    # against a ~0.37 ms memory floor), end to end against the default and FLA in one process.
    step k256_time 420 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 \
        python3 bench/bench_kernels.py --shapes fla1.3b,paper1.3b --iters 20 --rounds 2 \
        --no-chunk --variants triton,triton-ls2,triton-ls3
    step k256_breakdown 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/bench_kernels.py \
        --shapes fla1.3b --iters 20 --no-chunk --no-fla --no-check --breakdown-only --variants triton-ls2,triton-ls3 ;;
kernels)
    # The Mosaic defaults at K <= 128 (fused key grads, two-warpgroup reverse) against the old ones,
    # each shape's default checked first (t16k runs them under context parallelism: segments).
    step kernels_time 560 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 \
        python3 bench/bench_kernels.py --shapes t16k,h16k128,qwen3next --iters 20 --rounds 2 \
        --no-chunk --variants mosaic,mosaic-tkgrw1,triton ;;
breakdown)
    step breakdown 200 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/bench_kernels.py \
        --shapes h16k128 --iters 30 --no-check --no-chunk --no-fla --breakdown-only \
        --variants mosaic,mosaic-fkg,mosaic-rw2,mosaic-mp1,mosaic-mkg,triton ;;
parity)
    # FLA's float32 logits took 130 s (Triton compiles); our Pallas path at float32 and K = 256 had
    # not finished compiling 4 minutes later (2026-12-03), so chunk goes first.
    step parity 570 env FLA_FLASH_QLA=0 python3 bench/check_fla_parity.py --batch 1 --seq_len 2048 \
        --gdn_impls chunk,auto --out "$out/parity_1p3b.json" ;;
generation)
    # Each row prints as it completes, so a step that runs out of time still leaves its rows.
    step gen_fla 560 env FLA_FLASH_QLA=0 python3 bench/generate_throughput.py --configs fla_gdn_1.3b \
        --batches 1,16,64,256 --variants fused,loop --prefill 4096,32768 --iters 2 ;;
generation2)
    step gen_gdn 200 python3 bench/generate_throughput.py --configs gdn_1.3b --batches 1,16,64,256 \
        --variants fused --prefill 4096,32768 --iters 2 --no-fla
    step niah_walltime 150 python3 bench/niah_walltime.py --preset fla_gdn_1.3b \
        --out "$out/niah_walltime.json"
    # B = 1 launches ~400 kernels per token: XLA's command buffers (CUDA graphs) for the whole
    # decode loop body, against the default, in two processes of this call.
    for cb in default "+WHILE,+CONDITIONAL"; do
        flags=""; [ "$cb" = default ] || flags="--xla_gpu_enable_command_buffer=$cb --xla_gpu_graph_min_graph_size=1"
        step "gen_cmdbuf_${cb//[^A-Za-z]/}" 110 env XLA_FLAGS="$flags" python3 bench/generate_throughput.py \
            --configs fla_gdn_1.3b --batches 1,16 --variants fused --prefill 4096 --iters 3 --no-fla
    done ;;
scale)
    step longest_seq 330 python3 bench/longest_seq.py --timeout 100 --max_trials 3
    step train_gdn_1p3b 200 python3 bench/train_throughput.py --config gdn_1.3b --steps 8 ;;
train_profile)
    # issue 13: where the fla_gdn_1.3b step's time goes, by model scope (forward and backward)
    step train_profile 400 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 4 \
        --profile /tmp/prof ;;
lm_eval)
    step train_tiny 120 python3 train.py --workdir /tmp/runs/tiny --steps 300
    step lm_eval 420 env FLA_FLASH_QLA=0 python3 bench/lm_eval_check.py --workdir /tmp/runs/tiny \
        --hf --out "$out/lm_eval_check.json" ;;
flashqla|flashqla_h16)
    mkdir -p /tmp/siteq && tar -xJf .anchors/qla.tar.xz -C /tmp/siteq
    if [ "$part" = flashqla_h16 ]; then  # the short form: one shape, the new defaults, FLA, FlashQLA
        step flashqla_h16 250 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 \
            bench/bench_kernels.py --shapes h16k128 --variants mosaic --rounds 2 --iters 20 --no-chunk \
            --flashqla-site /tmp/siteq
        part=done
    fi
    # FlashQLA (child process), FLA's Triton kernels, and ours in one call: the new Mosaic defaults
    # (checked first at each shape; t16k runs them under segments) against the old ones, in rounds.
    [ "$part" = done ] || step flashqla 560 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 bench/bench_kernels.py \
        --shapes h16k128,t16k --variants mosaic,mosaic-tkgrw1,triton --rounds 2 --iters 20 --no-chunk \
        --flashqla-site /tmp/siteq ;;
*)
    echo "unknown part '$part'"; exit 2 ;;
esac
for f in "$out"/*.log; do
    [ "$f" = "$out/pip.log" ] && continue
    echo "---- $f"; tail -25 "$f"
done
