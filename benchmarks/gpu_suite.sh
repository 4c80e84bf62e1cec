#!/usr/bin/env bash
# The one-GPU benchmark suite: the CUDA tests, then the step, augment, loader and end-to-end
# benchmarks at their headline settings (ResNet-50, 224 px, batch 256), in under 8 minutes.
#
#   benchmarks/gpu_suite.sh              # on a machine with one GPU (torch + torchvision, no
#                                        # ffcv/DALI, no network): results to $OUT, else
#                                        # benchmarks/results/
#   benchmarks/gpu_suite.sh --cpu-smoke  # every stage with tiny settings on the CPU, in about a
#                                        # minute (CI runs it so the suite never rots); results
#                                        # to $OUT, else a temporary folder
#
# It installs nothing and needs no `pip install -e .`: PYTHONPATH is the repository root, and
# the core needs only torch, torchvision, numpy, pyyaml, tqdm and Pillow. $PYTHON picks the
# interpreter (default python3).
#
# Stages, each under `timeout` (SIGTERM, then SIGKILL 15 s later; end_to_end.py writes what it
# measured when terminated) and skipped when the total budget is spent:
#
#   stage       limit (s)  what
#   cuda-tests      75     pytest -m cuda
#   data            40     toy ImageNet (512 images, 200-600 px) x16 links -> tar shards
#   step           100     benchmarks/step.py: reference -> +channels_last -> +bf16 -> +fused
#                          -> +cuda_graph -> +augmentation, 10 steps x 3 repeats each
#   augment         50     benchmarks/augment.py: 2 x 256 views, eager and CUDA graph, stages
#                          (--no-compile: torch.compile alone can take a minute)
#   loaders         60     benchmarks/loaders.py: pil_full, pil_crop, nvjpeg, synthetic at
#                          224 px, batch 256, every core (shares the toy images)
#   end-to-end     140     benchmarks/end_to_end.py: pil_full, pil_crop, nvjpeg, synthetic x
#                          reference, fast, with both ceilings (its own budget: 125 s; the
#                          official row and the fast rows first)
#   total          465     + start-up: under 8 minutes
#
# Files written (at most 8): step-, augment-, loaders-, end_to_end-<gpu>.json and gpu_suite.log.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$arg' (expected --cpu-smoke)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then
    OUT_DIR=${OUT:-$(mktemp -d -t fastsiam-gpu-suite-XXXXXX)}
    TOTAL_BUDGET=300
    export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
else
    OUT_DIR=${OUT:-$ROOT/benchmarks/results}
    TOTAL_BUDGET=465
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d -t fastsiam-suite-work-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OUT="$OUT_DIR" PYTHONUNBUFFERED=1
LOG="$OUT_DIR/gpu_suite.log"
: > "$LOG"
START=$SECONDS
SUMMARY=()
FAILED=0

# run_stage NAME LIMIT CMD...: run CMD under min(LIMIT, budget left), log it, record the outcome.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("$(printf '%-11s %-8s %5s s' "$name" skipped 0) (total budget spent)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0=$SECONDS rc=0
    timeout -s TERM -k 15 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
    elif [ "$rc" != 0 ]; then
        status="rc=$rc"
    fi
    [ "$status" = ok ] || FAILED=1
    SUMMARY+=("$(printf '%-11s %-8s %5s s' "$name" "$status" $((SECONDS - t0))) (limit $limit s)")
    echo "== $name: $status after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    echo "fastsiam gpu suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
} 2>&1 | tee -a "$LOG"

if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_suite.sh: no CUDA GPU visible to $PY (use --cpu-smoke for a dry run on the CPU)" | tee -a "$LOG" >&2
    exit 2
fi

if [ "$SMOKE" = 1 ]; then
    E2E=(--smoke --device cpu --data-cache "$WORK/data")
    STEP=(--smoke --device cpu --batch-size 2 --image-size 32 --iters 1 --repeats 1 --warmup 0
          --dim 64 --pred-dim 16)
    AUGMENT=(--smoke --device cpu --out "$OUT_DIR")
    LOADERS=(--smoke --backends pil_full,pil_crop,nvjpeg,synthetic --data-cache "$WORK/data")
else
    E2E=(--backends pil_full,pil_crop,nvjpeg,synthetic --iters 8 --data-cache "$WORK/data")
    STEP=(--iters 10 --repeats 3 --warmup 3)
    AUGMENT=(--no-compile --iters 10 --repeats 3)
    LOADERS=(--backends pil_full,pil_crop,nvjpeg,synthetic --classes 8 --distinct 512
             --data-cache "$WORK/data")
fi

if "$PY" -c "import pytest" 2>/dev/null; then
    # Modules of optional backends may fail to import here (no ffcv/DALI): run the rest.
    run_stage cuda-tests 75 "$PY" -m pytest -m cuda -q -p no:cacheprovider \
        --continue-on-collection-errors tests
else
    SUMMARY+=("$(printf '%-11s %-8s %5s s' cuda-tests skipped 0) (pytest is not installed)")
fi
run_stage data 40 "$PY" benchmarks/end_to_end.py "${E2E[@]}" --prepare-only
run_stage step 100 "$PY" benchmarks/step.py "${STEP[@]}"
run_stage augment 50 "$PY" benchmarks/augment.py "${AUGMENT[@]}"
if [ -f benchmarks/loaders.py ]; then
    run_stage loaders 60 "$PY" benchmarks/loaders.py "${LOADERS[@]}"
else
    SUMMARY+=("$(printf '%-11s %-8s %5s s' loaders skipped 0) (benchmarks/loaders.py does not exist yet)")
fi
run_stage end-to-end 140 "$PY" benchmarks/end_to_end.py "${E2E[@]}" --time-budget 125 --out "$OUT_DIR"

{
    echo "== summary ($((SECONDS - START)) s of $TOTAL_BUDGET s; results in $OUT_DIR)"
    printf '%s\n' "${SUMMARY[@]}"
    ls -1 "$OUT_DIR"
} | tee -a "$LOG"
exit $FAILED
