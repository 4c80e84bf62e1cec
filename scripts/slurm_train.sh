#!/usr/bin/env bash
# SimSiam pretraining on several SLURM nodes: one srun task per node, each a torchrun agent that
# spawns that node's GPU workers and meets the others at a c10d rendezvous on the first node.
#
#   sbatch scripts/slurm_train.sh                           # from the repository root
#   sbatch --nodes 4 scripts/slurm_train.sh data.batch_size=16 --max-steps 100
#   DRY_RUN=1 bash scripts/slurm_train.sh                   # in an salloc: print the commands only
#
# Arguments go to `fastsiam train` after the config. Settings (environment, with defaults):
#   CONFIG         configs/simsiam_resnet50_8xb32-coslr-100e_in1k.yaml
#   GPUS_PER_NODE  the GPUs SLURM gave this node (SLURM_GPUS_ON_NODE), else 8
#   RDZV_PORT      29500, on the first node
#   MAX_RESTARTS   3: torchrun restarts a failed worker group this often within the job
#   SHUTDOWN_TIMEOUT  120: seconds torchrun lets workers checkpoint after SIGTERM (torch >= 2.12;
#                  older torchrun kills them after 30 s)
#   VENV           .venv: its torchrun, and so its python, when it has one; else torchrun on PATH
# The batch is nodes x GPUS_PER_NODE x data.batch_size and optim.lr is per 256 images, so the
# default config on 2 nodes of 8 GPUs trains at batch 512 (lr 0.1); data.batch_size=16 keeps
# the recipe's 256.
#
#SBATCH --job-name=fastsiam
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# --ntasks-per-node=1: one torchrun per node; it starts the GPU workers itself.
# --cpus-per-task: the whole node's cores go to that one task: 8 workers' loader threads
#   (data.workers each) and their decoding.
# --open-mode=append: a requeued job keeps writing to the same log instead of truncating it.
# --requeue: SLURM may put the job back in the queue (node failure, preemption, the time-limit
#   handler below); `--resume auto` makes the requeued run continue from its newest checkpoint.
# --signal=B:USR1@180: USR1 to this shell only, 180-240 s before the time limit (SLURM sends it
#   up to 60 s early); the handler stops the workers with SIGTERM, which makes fastsiam finish
#   the step, write a checkpoint and exit 0, then requeues the job unless the training had
#   finished. USR1 rather than TERM, so that a user's scancel (TERM) stops the job for good.
set -euo pipefail

die() { echo "slurm_train.sh: error: $*" >&2; exit 2; }

for var in SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST; do
  [ -n "${!var:-}" ] || die "$var is not set; submit this script with sbatch (DRY_RUN=1 still needs the SLURM_* variables)"
done

# Paths are relative to the job's working directory (sbatch's default: the one it was submitted
# from), not to this file: sbatch runs a copy of the script from its spool directory.
CONFIG=${CONFIG:-configs/simsiam_resnet50_8xb32-coslr-100e_in1k.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RDZV_PORT=${RDZV_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
VENV=${VENV:-.venv}
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG: no such file (run from the repository root or set CONFIG)"

# torchrun starts the workers with its own interpreter, so the venv's torchrun means the venv's
# python on every node (srun passes PATH on).
if [ -x "$VENV/bin/torchrun" ]; then
  PATH="$(cd "$VENV/bin" && pwd):$PATH"
  export PATH
fi
command -v torchrun >/dev/null || die "VENV=$VENV has no bin/torchrun and none is on PATH"

# The c10d rendezvous is hosted by the torchrun whose host name is the endpoint's: the first
# node of the allocation. Captured whole rather than piped to head, which under pipefail could
# fail on SIGPIPE for a long node list.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER=${hosts%%$'\n'*}
[ -n "$MASTER" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"

# A fresh TCP store for the workers of every rendezvous round. With the agent's shared store
# (the default since torch 2.4) fastsiam.dist prefixes the process group's keys by
# TORCHELASTIC_RESTART_COUNT, but an agent that restarts its workers because another node
# re-joined does not count that restart, so the nodes' prefixes can disagree or repeat stale
# ones; see fastsiam.dist._attempt_store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT

srun_cmd=(srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
# srun does not take --cpus-per-task over from sbatch in every SLURM release: pass it on.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_cmd+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
# --resume auto: a requeued job, or workers torchrun restarted, continue from the newest
# readable checkpoint in the work dir (a fresh run when there is none).
train_cmd=(torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID"
  --max-restarts "$MAX_RESTARTS"
  -m fastsiam train --config "$CONFIG" --resume auto "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  for var in TORCH_DISABLE_SHARE_RDZV_TCP_STORE TORCH_ELASTIC_SHUTDOWN_TIMEOUT; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  printf '%q ' "${srun_cmd[@]}" "${train_cmd[@]}"
  printf '\n'
  exit 0
fi

echo "slurm_train.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES nodes, rendezvous $MASTER:$RDZV_PORT"

stopping=0
# shellcheck disable=SC2317  # called by the USR1 trap, which shellcheck does not follow
on_time_limit() {
  stopping=1
  echo "slurm_train.sh: time limit near: SIGTERM to the workers, then requeue"
  # scancel --signal reaches the job's steps (torchrun and its workers), not this shell.
  scancel --signal=TERM "$SLURM_JOB_ID" || echo "slurm_train.sh: scancel failed" >&2
}
trap on_time_limit USR1

# In the background: bash runs a trap only once a foreground command ends, but interrupts wait.
"${srun_cmd[@]}" "${train_cmd[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
if [ "$stopping" = 1 ]; then
  # USR1 cut the first wait short: now wait for the workers' checkpoint and exit. torchrun
  # exits 1 when a signal stopped it (even though its workers exited 0); 0 means the training
  # finished before the SIGTERM came, and a requeued run would find nothing left to do.
  status=0
  wait "$srun_pid" || status=$?
  if [ "$status" != 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
exit "$status"
