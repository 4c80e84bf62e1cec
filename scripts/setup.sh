#!/usr/bin/env bash
# One setup path for the README's two commands (make demo, make test).
# Creates .venv, installs the system libraries ffcv builds against (apt-get), torch, and the
# project with all extras. Idempotent: a stamp keyed on this script and pyproject.toml makes a
# second run take a fraction of a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.fastsiam-setup
KEY=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi

# --- system packages ffcv compiles against (g++ also builds the fused kernels' host test) ---
need=()
for pkg in pkg-config libopencv-dev libturbojpeg0-dev g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing system packages for ffcv: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: cannot install ${need[*]} (needs apt-get as root); ffcv will be skipped." >&2
    echo "setup: install them yourself, e.g. 'sudo apt-get install ${need[*]}', then rerun." >&2
    SKIP_FFCV=1
  fi
fi

# --- python environment -----------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel

# torch: this machine kind (x86_64, no GPU) takes the 2.14.1 build that lies on disk. A user with
# GPUs may pre-install any recent CUDA build (torch >= 2.5) into .venv; it is then kept.
if ! $VENV/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  $PIP install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi

extras="dev,dali"
[ "${SKIP_FFCV:-0}" = 1 ] || extras="$extras,ffcv"
# ffcv's setup.py imports numpy/pkgconfig at build time: build it without isolation.
$PIP install -q numpy pkgconfig "Cython<3.1" 
$PIP install -q --no-build-isolation -e ".[$extras]"

echo "$KEY" > "$STAMP"
echo "setup: done ($( $VENV/bin/python -c 'import torch; print("torch", torch.__version__)'))"
