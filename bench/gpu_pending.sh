#!/usr/bin/env bash
# The GPU measurements still owed by the open issues, in parts that each fit one device call
# (10 minutes). Run from the repository root on the GPU machine, with .whl carried (and, for part
# "flashqla", .anchors); logs go to $OUT (or ./gpu_logs), one file per step, and the tail of each
# is printed at the end. Every step has its own timeout, so one that hangs cannot take the call.
#
#   bash bench/gpu_pending.sh five         # issue 10: FLA in the same process at h6k256v512 and qwen3next
#   bash bench/gpu_pending.sh split        # issue 10: split_output against the default at fla1.3b and paper1.3b
#   bash bench/gpu_pending.sh train        # issue 13: fla_gdn_1.3b and gdn_1.3b steps after run M's kernels
#   bash bench/gpu_pending.sh generation2  # issue 11: S-NIAH before/after in one call, gdn_1.3b B = 256, 32K
#   bash bench/gpu_pending.sh cmdbuf       # issue 11: CUDA graphs for the decode loop at B = 1, 16
#   bash bench/gpu_pending.sh decode       # issue 11: the Pallas decode step against XLA's, alone and in generate()
#   bash bench/gpu_pending.sh conv         # issue 13: the Pallas short conv alone, then in the 1.3B step
#   bash bench/gpu_pending.sh parity       # issue 12: FLA logits parity at 1.3B
#   bash bench/gpu_pending.sh scale        # issue 14: longest T at batch 1
#   bash bench/gpu_pending.sh train_profile  # issue 13: the 1.3B step's time by model scope (REMAT=<policy>)
#   bash bench/gpu_pending.sh train_remat  # issue 13: the old default against split_output with three remat policies
#   bash bench/gpu_pending.sh train_flags  # issue 13: cuBLAS for every GEMM, overlap flags off, vs default
#   bash bench/gpu_pending.sh train_split  # issue 13: split_output (now the K > 128 default) in the step, remat dots_gdn
#   bash bench/gpu_pending.sh honest_k256  # Kernels v2 re-measured with the fixed fwd+bwd: K = 256 shapes, FLA
#   bash bench/gpu_pending.sh honest_k128  # the same at K = 128, with FlashQLA (carry .anchors)
#   bash bench/gpu_pending.sh honest_rest  # the rows honest_k128 did not reach: qwen3next with FLA, t16k
#   bash bench/gpu_pending.sh lm_eval_a    # issue 16, first of two calls: lm-eval's pyarrow (carry .lmw_a)
#   bash bench/gpu_pending.sh lm_eval      # issue 16: lm-eval requests/s and agreement with FLA (carry .whl, .lmw_b)
#   bash bench/gpu_pending.sh multi2       # issue 15, on nvidia-h200-x2: 1 GPU against data parallel and FSDP on 2
#   bash bench/gpu_pending.sh multi2_ctx   # issue 15, on nvidia-h200-x2: context parallel at T = 32K, 1 GPU against 2
#   bash bench/gpu_pending.sh generation   # issue 11: fla_gdn_1.3b with FLA in the same run (done: run of 2026-12-03)
#   bash bench/gpu_pending.sh kernels      # issue 10: the new Mosaic defaults against the old, K = 128 shapes
#   bash bench/gpu_pending.sh breakdown    # issue 10: per-kernel times of every Mosaic variant
#   bash bench/gpu_pending.sh flashqla     # issue 10: FlashQLA, FLA, new and old Mosaic defaults, K = 128
#   bash bench/gpu_pending.sh flashqla_h16 # issue 10: the short form (h16k128, new defaults only)
set -uo pipefail
part=${1:?"usage: bash bench/gpu_pending.sh honest_k256|honest_k128|honest_rest|five|split|train|train_split|train_remat|train_flags|conv|cmdbuf|decode|multi2|multi2_ctx|kernels|breakdown|parity|generation|generation2|scale|train_profile|lm_eval_a|lm_eval|flashqla|flashqla_h16"}
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
five)
    # issue 10's last needed rows: FLA in the same process at the two shapes that lack one, each on
    # the path impl="pallas" picks there (Triton at K = 256, Mosaic at K = 128), checked first.
    # triton-so1 (split_output, written after run M): checked with gradients too (--check-all).
    step five_k256 300 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 bench/bench_kernels.py \
        --shapes h6k256v512 --iters 20 --rounds 2 --no-chunk --check-all --variants triton,triton-so1
    step five_qwen 270 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 bench/bench_kernels.py \
        --shapes qwen3next --iters 20 --rounds 2 --no-chunk --variants mosaic ;;
split)
    # split_output at the two training-relevant K > 128 layers beside the default, each checked
    # with gradients; the breakdown shows the residual sweep and the output kernel apart. Prediction
    # (docs/benchmarks.md): forward+backward -0.5 ms at fla1.3b; the forward alone gains at the
    # paper layer only (its output sweep, 14 tiles of 32 columns, took ~1.0 ms against the
    # residual sweep's 0.63 at 64).
    step split_time 330 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/bench_kernels.py \
        --shapes fla1.3b,paper1.3b --iters 20 --rounds 2 --no-chunk --no-fla --check-all \
        --variants triton,triton-so1
    step split_breakdown 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/bench_kernels.py \
        --shapes fla1.3b --iters 20 --no-chunk --no-fla --no-check --breakdown-only --variants triton-so1 ;;
train)
    # issue 13: the training step after run M's gradient loops (-0.77 ms a layer at fla1.3b's
    # shape, 21 layers: predicted 369.6 -> ~355 ms, 37.3% -> ~38.8% MFU), then the paper layout.
    step train_fla_1p3b 250 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8
    step train_gdn_1p3b 250 python3 bench/train_throughput.py --config gdn_1.3b --steps 8 ;;
conv)
    # issue 13: the short conv's Pallas kernels (checked against the jax.numpy path, then timed alone
    # at fla_gdn_1.3b's widths), then the training step with them against the default in one call.
    # Prediction (docs/benchmarks.md, seventh session): alone, forward+backward within 2x of the
    # bytes' floor (~0.15 ms at 1,536 channels, ~0.3 at 3,072) against XLA's ~0.6-1.2 ms; the step
    # 341 -> 316-326 ms (-15 to -25 ms over 63 convs), 40% -> 42-43% MFU.
    step conv_bench 150 python3 bench/bench_short_conv.py
    step conv_train_pallas 220 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --set model.conv_impl=pallas
    step conv_train_xla 220 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 ;;
honest_rest)
    # What the 2026-12-04 honest_k128 call did not reach (FlashQLA's compiles took 325 of its 560 s):
    # FLA at qwen3next, and ours and FLA at t16k (FlashQLA's rows there were measured). Predictions:
    # qwen3next 1.393 ms (that call) against FLA's ~2.35 (run N1), ~1.7x; t16k <= 2.18 (>= 1.34x).
    step honest_rest 400 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 \
        bench/bench_kernels.py --shapes qwen3next,t16k --iters 20 --rounds 2 --no-chunk --no-check \
        --variants mosaic ;;
honest_k256|honest_k128)
    # Kernels v2 re-measured with the fixed forward+backward (bench_kernels.fwd_and_grad now returns
    # o and S, so the forward's output sweep is no longer dead code; docs/benchmarks.md, "The
    # forward+backward times lacked the forward's output sweep"). Kernels unchanged since run N,
    # where each was checked with gradients on the GPU. Predictions (that section's table):
    # fla1.3b ~3.30 ms (~0.98x FLA), paper1.3b 4.5-4.8 (0.92-0.97x), h6k256v512 ~2.0 (~1.4x),
    # split_output ~2.67 at fla1.3b; h16k128 ~1.26 (~2.1x FLA, ~0.95x FlashQLA), qwen3next ~1.39
    # (~1.7x), t16k <= 2.18 (>= 1.34x). honest_k128 needs .anchors carried (FlashQLA).
    if [ "$part" = honest_k256 ]; then
        step honest_k256 560 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 \
            bench/bench_kernels.py --shapes fla1.3b,paper1.3b,h6k256v512 --iters 20 --rounds 2 \
            --no-chunk --no-check --variants triton,triton-so1
    else
        mkdir -p /tmp/siteq && tar -xJf .anchors/qla.tar.xz -C /tmp/siteq
        step honest_k128 560 env XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0 python3 \
            bench/bench_kernels.py --shapes h16k128,qwen3next,t16k --iters 20 --rounds 2 \
            --no-chunk --no-check --variants mosaic,triton --flashqla-site /tmp/siteq
    fi ;;
train_split)
    # issue 13: the kernels' K > 128 default (split_output: forward+backward 3.291 -> 2.666 ms at
    # this layer) in the fla_gdn_1.3b step against the old default in the same call, each with and
    # without remat "dots_gdn" (saves matmul outputs, the recurrence's output and its kernels'
    # residuals; recomputes elementwise chains only). The 2026-12-04 call measured the split rows
    # (330.9 ms at 64.92 GiB; with dots_gdn 343.4-345.6 ms at 47.55 GiB), but its "off" rows ran
    # split too (train_throughput's --launch scope was collected before the step was traced; fixed).
    # Predictions: off/none ~345 ms at ~54.3 GiB (2026-12-03's row); off/dots_gdn ~357 ms at
    # ~37 GiB (dots_gdn's +12.5 ms recompute, its -17.4 GiB less the split's 10.6).
    step split_off 150 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --remat none --set model.gdn_split_output=off
    step split_auto 150 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --remat none
    step split_auto_dots_gdn 150 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --remat dots_gdn
    step split_off_dots_gdn 150 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --remat dots_gdn --set model.gdn_split_output=off ;;
train_remat)
    # issue 13: the old default (no split_output, no remat: 345.0 ms, 54.34 GiB on 2026-12-03)
    # beside split_output with three remat policies, one call. Predictions (saved-residual bytes
    # counted on the CPU, recompute bytes at ~3 TB/s): dots_gdn ~344 ms at 47.55 GiB (its
    # 2026-12-04 rows); dots_gdn_acts +8.2 GiB (25 KB a token and layer) -> ~55.8 GiB, -9 ms
    # (~76 KB a token and layer of recompute no longer read and written) -> ~335 ms; dots_gdn_all
    # +4.0 GiB more -> ~59.8 GiB, -3 ms more -> ~332 ms.
    # A run takes ~170 s on a fresh machine (start-up and compile; 150 s cut every run on
    # 2026-12-04), so one call holds three: REMATS picks them ("off" is the old default).
    for r in ${REMATS:-off dots_gdn_acts dots_gdn_all}; do
        if [ "$r" = off ]; then
            step remat_before 195 python3 bench/train_throughput.py --config fla_gdn_1.3b \
                --steps 8 --remat none --set model.gdn_split_output=off
        else
            step "remat_$r" 195 python3 bench/train_throughput.py --config fla_gdn_1.3b \
                --steps 8 --remat "$r"
        fi
    done ;;
train_flags)
    # issue 13: XLA's GEMM choice and scheduling for the fla_gdn_1.3b step, each beside the default
    # in one call. Prediction (docs/benchmarks.md, 2026-12-04): cuBLAS for every GEMM (XLA's Triton
    # GEMM fusions off) -2 to +2 ms a step (the trace has only ~7.6 ms a step in Triton GEMM
    # fusions, the rest of the 175 ms already cuBLAS); the overlap flags (latency-hiding
    # scheduler) off on one GPU: 0 +- 2 ms, there are no collectives to hide.
    step flags_default 140 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8
    step flags_cublas 140 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 \
        bench/train_throughput.py --config fla_gdn_1.3b --steps 8
    step flags_no_overlap 140 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 8 \
        --no_overlap_flags ;;
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
    # Exact float32 on both sides (check_fla_parity.py's docstring): FLA in fused_recurrent mode,
    # ours with "highest" matmuls; "auto" is the chunk path at float32 since 2026-12-03.
    step parity 570 env FLA_FLASH_QLA=0 python3 bench/check_fla_parity.py --batch 1 --seq_len 2048 \
        --gdn_impls chunk --out "$out/parity_1p3b.json" ;;
generation)
    # Each row prints as it completes, so a step that runs out of time still leaves its rows.
    step gen_fla 560 env FLA_FLASH_QLA=0 python3 bench/generate_throughput.py --configs fla_gdn_1.3b \
        --batches 1,16,64,256 --variants fused,loop --prefill 4096,32768 --iters 2 ;;
generation2)
    # S-NIAH, both paths in one process (the on-device one compiles once per prompt length since
    # da9d71b: predicted ~91 -> ~35 s the first time), then gdn_1.3b's rows still owed.
    step niah_walltime 300 python3 bench/niah_walltime.py --preset fla_gdn_1.3b \
        --out "$out/niah_walltime.json"
    step gen_gdn 250 python3 bench/generate_throughput.py --configs gdn_1.3b --batches 256 \
        --variants fused --prefill 32768 --iters 2 --no-fla ;;
cmdbuf)
    # B = 1 launches ~400 kernels per token: XLA's command buffers (CUDA graphs) for the whole
    # decode loop body, against the default, in two processes of this call; the default one is
    # profiled (GPU ops per token and where their time goes). Since 2.367 ms/token at B = 1 (run of
    # 2026-12-03), the conv steps are multiply-sums instead of batched dots: predicted -0.1 to -0.3 ms
    # if XLA had launched them as 63 GEMMs a token, nothing if it had already rewritten them.
    for cb in default "+WHILE,+CONDITIONAL"; do
        flags="" prof=""
        if [ "$cb" = default ]; then prof="--profile /tmp/prof_decode"
        else flags="--xla_gpu_enable_command_buffer=$cb --xla_gpu_graph_min_graph_size=1"; fi
        step "gen_cmdbuf_${cb//[^A-Za-z]/}" 170 env XLA_FLAGS="$flags" python3 bench/generate_throughput.py \
            --configs fla_gdn_1.3b --batches 1,16 --variants fused --prefill 4096 --iters 3 --no-fla $prof
    done ;;
decode)
    # The recurrence alone (checked against XLA's step, then 21 layers timed), then whole tokens:
    # fused (XLA's recurrence) against pdec (the Pallas kernel) in one process, profiled. Prediction
    # (docs/benchmarks.md): -0.3 to -0.4 ms a token at B = 1 (2.151), about -30% at B = 256 (15.7 ms).
    # Then B = 1 and 16 again with XLA's Triton GEMMs off, so every projection at one row goes to
    # cuBLAS (the B = 1 profile: 1.14 ms of matmuls against the weights' 0.72 ms floor, half of it in
    # XLA's Triton gemm fusions): predicted -0.2 to -0.3 ms at B = 1 if cuBLAS's GEMV reads near the
    # bandwidth, nothing at 16.
    step decode_step 150 python3 bench/bench_decode_step.py --iters 20
    step decode_gen 250 python3 bench/generate_throughput.py --configs fla_gdn_1.3b --batches 1,16,64,256 \
        --variants fused,pdec --prefill "" --iters 3 --no-fla --profile /tmp/prof_pdec
    step decode_gen_cublas 140 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 \
        bench/generate_throughput.py --configs fla_gdn_1.3b --batches 1,16 --variants fused,pdec \
        --prefill "" --iters 3 --no-fla ;;
multi2|multi2_ctx)
    # issue 15 on two GPUs of one host, every configuration beside its 1-GPU baseline in the same
    # call: one process per GPU through jax.distributed, each profiled (exposed communication).
    # multi2: data parallel and FSDP at 4 x 4096 per GPU; multi2_ctx: context parallel at 32K.
    two() {  # two NAME LIMIT ARGS...: the bench on GPUs 0 and 1, one process each; rank 0 logs
        local name=$1 limit=$2
        shift 2
        echo "== $name (limit ${limit}s, 2 processes): $*"
        for i in 0 1; do
            CUDA_VISIBLE_DEVICES=$i timeout "$limit" python3 bench/train_throughput.py "$@" \
                --coordinator_address localhost:12355 --num_processes 2 --process_id $i \
                > "$out/$name.$i.log" 2>&1 &
        done
        wait
        echo "== $name: done"
    }
    if [ "$part" = multi2 ]; then
        step mgpu_1 150 env CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --steps 8
        two mgpu_dp 200 --steps 8 --profile /tmp/prof_dp
        two mgpu_fsdp 200 --steps 8 --fsdp --profile /tmp/prof_fsdp
    else
        step mgpu_ctx1 200 env CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --batch 1 \
            --seq 32768 --steps 4
        two mgpu_ctx2 250 --batch 1 --seq 32768 --steps 4 --context 2 --profile /tmp/prof_ctx
    fi ;;
scale)
    # Three runs of ~150 s each (the 1.3B step's start-up and compile; 100 s per run was too short
    # on 2026-12-04): T = 8192 and 16384 draw the memory line, the third checks its prediction.
    # JAX may take 95% of the GPU here, not its default 75%.
    step longest_seq 540 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 bench/longest_seq.py \
        --timeout 170 --max_trials 3 ;;
train_profile)
    # issue 13: where the fla_gdn_1.3b step's time goes, by model scope (forward and backward), in
    # its preset's configuration (split_output + remat dots_gdn_mixer, 56.4 GiB; profiled
    # 2026-12-04); REMAT=<policy> profiles another.
    # The trace and the step's HLO come back (xz) so the op table can be read again here.
    step train_profile 400 python3 bench/train_throughput.py --config fla_gdn_1.3b --steps 4 \
        --remat "${REMAT:-dots_gdn_mixer}" --profile /tmp/prof
    xz -T8 -1 -c "$(find /tmp/prof -name '*.xplane.pb' | tail -1)" > "$out/train.xplane.pb.xz"
    xz -T8 -1 -c /tmp/prof/train_step.hlo.txt > "$out/train_step.hlo.txt.xz" ;;
lm_eval_a)
    # lm-eval's wheels travel in two calls on one warm machine (bench/lm_eval_wheels.sh): this one
    # carries .lmw_a (pyarrow) into .site_lm, which stays there for the next call.
    step lm_eval_wheels_a 120 bash bench/lm_eval_wheels.sh install .lmw_a ;;
lm_eval)
    # Right after lm_eval_a, carrying .whl and .lmw_b.
    step lm_eval_wheels_b 120 bash bench/lm_eval_wheels.sh install .lmw_b
    export PYTHONPATH=$PYTHONPATH:$PWD/.site_lm
    step lm_eval_import 60 python3 -c "import lm_eval.evaluator, lm_eval.models.huggingface, gdn_jax.lm_eval; print('lm-eval', lm_eval.__version__, 'imports')"
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
