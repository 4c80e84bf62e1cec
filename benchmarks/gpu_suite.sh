#!/usr/bin/env bash
# The one-GPU benchmark suite at the headline settings (ResNet-50, 224 px, batch 256), ordered
# by value: the first minutes give the headline numbers, and a stage that fails or runs out of
# time costs only itself.
#
#   benchmarks/gpu_suite.sh              # one GPU (torch + torchvision; no ffcv/DALI/network
#                                        # needed): every stage, at most 450 s; results to
#                                        # $OUT, else benchmarks/results/
#   benchmarks/gpu_suite.sh --quick      # the headline only, at most 180 s
#   benchmarks/gpu_suite.sh --cpu-smoke  # the same stages with tiny settings on the CPU, in
#                                        # about a minute (CI runs it so the suite never rots;
#                                        # the test stages only collect: CI runs those tests);
#                                        # results to $OUT, else a temporary folder; combines
#                                        # with --quick
#   benchmarks/gpu_suite.sh --plan       # print the stages, their limits and the total; run
#                                        # nothing (combines with --quick, --cpu-smoke)
#
# It installs nothing and needs no `pip install -e .`: PYTHONPATH is the repository root, and
# the core needs only torch, torchvision, numpy, pyyaml, tqdm and Pillow; pytest for the test
# stages (skipped without it). $PYTHON picks the interpreter (default python3).
#
# Stages in run order, each under `timeout -k GRACE LIMIT` (SIGTERM at LIMIT, SIGKILL GRACE s
# later). step.py and loaders.py write their JSON after every row (a failed row, e.g. out of
# memory, is recorded and the next row runs); end_to_end.py writes what it measured on
# SIGTERM; so a timeout keeps what was measured. Q: also in --quick.
#
#   stage          limit + grace  Q  what
#   env              10 +  5      Q  python, torch, GPU, commit; no CUDA: stop (exit 2)
#   capture-tests    45 +  5      Q  pytest -m cuda -k "cuda_graph or fused": the real CUDA-graph
#                                    captures, the fused colour kernels against the plain ops and
#                                    the NVRTC crop-resize kernel against torchvision
#                                    (the fake-CUDA tests are CPU work: CI runs them)
#   step-headline    50 +  5      Q  step.py --only +cuda_graph,+augmentation,reference (the
#                                    ratio's baseline) -> step_headline-<gpu>.json
#   data             20 +  5      Q  end_to_end.py --prepare-only: toy ImageNet (512 images,
#                                    200-600 px) x16 links -> tar shards, 8,192 images, shared
#                                    by end-to-end and loaders
#   end-to-end      135 + 15         end_to_end.py --time-budget 105: step and loader ceilings,
#                                    pil_full + reference (the official recipe), then + fast
#                                    on pil_full, nvjpeg, pil_crop, synthetic, then the other
#                                    references
#   cuda-tests       35 +  5         pytest -m cuda: every other CUDA test
#   step             50 +  5         step.py: the whole table, reference -> ... -> +augmentation
#                                    (a timeout cuts the last rows, which step-headline has)
#   augment          20 +  5         augment.py --no-compile: 2 x 256 views, eager, graph, stages
#   loaders          20 +  5      Q  loaders.py --backends nvjpeg on the data stage's shards
#   summary           4 +  1      Q  stage table, headline images/s read from the JSON files
#   cleanup           4 +  1      Q  rm -rf the work folder (the data)
#
#   full:  15 + 50 + 55 + 25 + 150 + 40 + 55 + 25 + 25 + 5 + 5 = 450 s <= 450 s
#   quick: 15 + 50 + 55 + 25 + 25 + 5 + 5                      = 180 s <= 180 s
#
# The script adds the limits and graces up before it starts and refuses to run over budget.
# The torch.compile tests are left out (a cold Inductor compile alone can take a minute), as
# is augment.py's compiled row. Files written (at most 6): step_headline-, step-, augment-,
# loaders-, end_to_end-<gpu>.json and gpu_suite.log. Exit status: 0 if every stage passed.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
QUICK=0
PLAN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        --quick) QUICK=1 ;;
        --plan) PLAN=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$arg' (expected --quick, --cpu-smoke, --plan)" >&2; exit 2 ;;
    esac
done
BUDGET=450
[ "$QUICK" = 1 ] && BUDGET=180
SUMMARY_LIMIT=4
CLEANUP_LIMIT=4
FINAL_GRACE=1

PY=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then
    OUT_DIR=${OUT:-${TMPDIR:-/tmp}/fastsiam-gpu-suite-$$}
    export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    E2E=(--smoke --device cpu)
    E2E_BACKENDS=synthetic  # nvjpeg on the CPU is the loaders stage's
    STEP=(--smoke --device cpu --batch-size 2 --image-size 32 --iters 1 --repeats 1 --warmup 0
          --dim 64 --pred-dim 16)
    AUGMENT=(--smoke --device cpu --out "$OUT_DIR")
    LOADERS=(--smoke --batch-size 1)  # one epoch of the smoke data holds 24 batches of 1
    PYTEST=(--collect-only)
else
    OUT_DIR=${OUT:-$ROOT/benchmarks/results}
    E2E=(--iters 8)
    E2E_BACKENDS=nvjpeg,pil_crop,synthetic  # pil_full is always there: the official recipe
    STEP=(--iters 10 --repeats 3 --warmup 3)
    AUGMENT=(--no-compile --iters 10 --repeats 3)
    LOADERS=()
    PYTEST=()
fi
PYTEST=(-m pytest -q -p no:cacheprovider --continue-on-collection-errors "${PYTEST[@]}")
# The real captures first (tests named *cuda_graph*); the fake-CUDA tests are CPU work that CI
# runs, so they stay out of the device window (no cuda marker).
CAPTURE_K="(cuda_graph or fused) and not compile"

ENV_PY='import importlib.util, shutil, subprocess, sys
import torch, torchvision
from fastsiam.runtime import git_commit
cuda = torch.cuda.is_available()
print("fastsiam gpu suite, commit", git_commit(), "| python", sys.version.split()[0], "| torch",
      torch.__version__, "| torchvision", torchvision.__version__, "| cuda:", cuda and torch.cuda.get_device_name(0))
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader"], timeout=5, check=False)
print("pytest:", "available" if importlib.util.find_spec("pytest") else "missing")
if not (cuda or sys.argv[1] == "1"):
    sys.exit("gpu_suite.sh: no CUDA GPU visible to this python (--cpu-smoke: a dry run on the CPU)")'

# stage NAME LIMIT GRACE CMD...: the counting pass adds LIMIT + GRACE to TOTAL (--plan prints
# the stage); the run pass runs CMD under `timeout -k GRACE LIMIT` into the log (and the
# terminal when $ECHO is set) and records its status and seconds, or, when $SKIP says why it
# cannot run, records that (counted all the same).
stage() {
    local name=$1 limit=$2 grace=$3
    shift 3
    if [ "$PASS" = count ]; then
        TOTAL=$((TOTAL + limit + grace))
        [ "$PLAN" = 1 ] && printf '  %-14s %4s + %-3s %s\n' "$name" "$limit" "$grace" "${*//$'\n'*/...}"
        return 0
    fi
    if [ -n "${SKIP:-}" ]; then
        SUMMARY+=("$(printf '%-14s %-8s %5s s' "$name" skipped 0)  ($SKIP)")
        STATUS=skipped
        return 0
    fi
    echo "== $name (limit $limit + $grace s): ${*//$'\n'*/...}" | tee -a "$LOG"
    local t0=$SECONDS rc=0
    if [ -n "${ECHO:-}" ]; then
        timeout -s TERM -k "$grace" "$limit" "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
    else
        timeout -s TERM -k "$grace" "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    fi
    STATUS=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS=timeout
    elif [ "$rc" != 0 ]; then
        STATUS="rc=$rc"
    fi
    [ "$STATUS" = ok ] || FAILED=1
    SUMMARY+=("$(printf '%-14s %-8s %5s s' "$name" "$STATUS" $((SECONDS - t0)))  (limit $limit + $grace s)")
    echo "== $name: $STATUS after $((SECONDS - t0)) s" | tee -a "$LOG"
}

# The stages, in order (run twice: counted, then run). Later stages read what earlier ones
# printed into the log: pytest's presence (env), the prepared data's paths (data).
plan() {
    local no_pytest="" images="<imagefolder from data>" shards="<shards from data>"
    ECHO=1 stage env 10 5 "$PY" -c "$ENV_PY" "$SMOKE"
    if [ "$PASS" = run ]; then
        if [ "$STATUS" != ok ]; then
            echo "gpu_suite.sh: the env stage failed ($STATUS), see $LOG" >&2
            exit 2
        fi
        grep -q '^pytest: missing' "$LOG" && no_pytest="pytest is not installed"
    fi
    SKIP=$no_pytest stage capture-tests 45 5 "$PY" "${PYTEST[@]}" -m cuda -k "$CAPTURE_K" tests
    stage step-headline 50 5 "$PY" benchmarks/step.py "${STEP[@]}" \
        --only +cuda_graph,+augmentation,reference --name step_headline
    stage data 20 5 "$PY" benchmarks/end_to_end.py "${E2E[@]}" --backends nvjpeg \
        --data-cache "$WORK/data" --prepare-only
    if [ "$PASS" = run ]; then
        images=$(sed -n 's/^imagefolder=//p' "$LOG" | tail -n 1)
        shards=$(sed -n 's/^shards=//p' "$LOG" | tail -n 1)
    fi
    if [ "$QUICK" = 0 ]; then
        stage end-to-end 135 15 "$PY" benchmarks/end_to_end.py "${E2E[@]}" \
            --backends "$E2E_BACKENDS" --data-cache "$WORK/data" --time-budget 105 --out "$OUT_DIR"
        SKIP=$no_pytest stage cuda-tests 35 5 "$PY" "${PYTEST[@]}" -m cuda \
            -k "not compile and not ($CAPTURE_K)" tests
        stage step 50 5 "$PY" benchmarks/step.py "${STEP[@]}"
        stage augment 20 5 "$PY" benchmarks/augment.py "${AUGMENT[@]}"
    fi
    SKIP=$([ -n "$shards" ] || echo "the data stage prepared no shards") \
        stage loaders 20 5 "$PY" benchmarks/loaders.py "${LOADERS[@]}" --backends nvjpeg \
        --data "$images" --shards "$shards"
}

# The headline images/s from the JSON files this run wrote (any may be missing or partial).
SUMMARY_PY='import json, sys
from pathlib import Path

out, since = Path(sys.argv[1]), Path(sys.argv[2]).stat().st_mtime


def load(stem):
    files = sorted(p for p in out.glob(f"{stem}-*.json") if p.stat().st_mtime >= since)
    if not files:
        print(f"  {stem}: no {stem}-*.json from this run")
        return None
    try:
        data = json.loads(files[-1].read_text())
        rows = {r["variant"]: r for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"  {files[-1].name}: unreadable ({type(e).__name__})")
        return None
    print(f"  {files[-1].name}")
    return data, rows


def show(result, variant, label=None):
    """Print one row: its images/s, else its error or why it is missing; return the rate."""
    rate, text = None, "not measured"
    if result is not None:
        data, rows = result
        settings = data.get("settings") or {}
        skipped = settings.get("skipped") if isinstance(settings.get("skipped"), dict) else {}
        errors = [e for e in settings.get("errors") or [] if str(e).startswith(f"{variant}: ")]
        row = rows.get(variant, {})
        if "error" in row:
            text = row["error"]
        elif isinstance(row.get("items_per_s"), (int, float)):
            rate = row["items_per_s"]
            text = f"{rate:10,.1f}" + "".join(f"  {k} {row[k]}" for k in ("of_ceiling", "bound") if k in row)
        elif errors:
            text = errors[0].split(": ", 1)[1]
        elif variant in skipped:
            text = f"skipped: {skipped[variant]}"
    print(f"    {label or variant:<34} {text}")
    return rate


def ratio(label, a, b):
    print(f"    {label:<34} " + (f"{a / b:9.2f}x" if a and b else "-"))


print("headline images/s (median of the repeats), from the JSON files this run wrote:")
step = load("step_headline")
graph = show(step, "+cuda_graph")
aug = show(step, "+augmentation")
ref = show(step, "reference")
ratio("+augmentation / reference", aug, ref)
e2e = load("end_to_end")
fast = show(e2e, "nvjpeg + fast")
official = show(e2e, "pil_full + reference", "pil_full + reference (official)")
ratio("nvjpeg + fast / official", fast, official)
show(load("loaders"), "nvjpeg", "nvjpeg (loader alone)")'

PASS=count
TOTAL=0
WORK='<work folder>'
plan
TOTAL=$((TOTAL + SUMMARY_LIMIT + CLEANUP_LIMIT + 2 * FINAL_GRACE))
if [ "$PLAN" = 1 ]; then
    printf '  %-14s %4s + %-3s %s\n' summary "$SUMMARY_LIMIT" "$FINAL_GRACE" "headline images/s from the JSON files" \
        cleanup "$CLEANUP_LIMIT" "$FINAL_GRACE" "rm -rf the work folder"
    echo "worst case $TOTAL s of a $BUDGET s budget"
fi
if [ "$TOTAL" -gt "$BUDGET" ]; then
    echo "gpu_suite.sh: the stage limits and graces add up to $TOTAL s, over the $BUDGET s budget" >&2
    exit 2
fi
[ "$PLAN" = 1 ] && exit 0

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d -t fastsiam-suite-work-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OUT="$OUT_DIR" PYTHONUNBUFFERED=1
LOG="$OUT_DIR/gpu_suite.log"
: > "$LOG"
touch "$WORK/started"  # the summary reads only the JSON files written after this
START=$SECONDS
SUMMARY=()
FAILED=0
PASS=run
plan

{
    echo "== summary ($((SECONDS - START)) s, at most $TOTAL s; results in $OUT_DIR)"
    printf '%s\n' "${SUMMARY[@]}"
    timeout -k "$FINAL_GRACE" "$SUMMARY_LIMIT" "$PY" -c "$SUMMARY_PY" "$OUT_DIR" "$WORK/started" \
        || echo "(the headline could not be read)"
} | tee -a "$LOG"
timeout -k "$FINAL_GRACE" "$CLEANUP_LIMIT" rm -rf "$WORK"
exit $FAILED
