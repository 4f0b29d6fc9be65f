#!/usr/bin/env bash
# Build the venv that benchmarks/gpu_hlo.py compiles in: this machine's Python
# packages (jax, jaxdiff, flax: --system-site-packages) plus jax's CUDA PJRT plugin
# and the CUDA libraries it compiles with (ptxas, libdevice, cuDNN, cuBLAS; ~3 GB),
# pinned to the installed jax. Kept apart so that nothing else here finds a CUDA
# backend. No GPU or driver is needed: gpu_hlo.py compiles for a described target.
#
# Usage: bash benchmarks/setup_gpu_hlo.sh [VENV_DIR]   (default .bench/venv-cuda)
# Idempotent: a venv whose plugin already matches jax is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.bench/venv-cuda}"
PY="${PYTHON:-python3}"
JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)')"

check() {
  "$VENV/bin/python" - "$JAX_VERSION" <<'PYEOF'
import sys
from importlib.metadata import version
assert version("jax-cuda13-plugin") == sys.argv[1], version("jax-cuda13-plugin")
assert version("jax-cuda13-pjrt") == sys.argv[1], version("jax-cuda13-pjrt")
PYEOF
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
  echo "$VENV: CUDA plugin $JAX_VERSION already installed"
  exit 0
fi
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q \
  "jax-cuda13-plugin[with-cuda]==$JAX_VERSION" "jax-cuda13-pjrt==$JAX_VERSION" \
  2> >(grep -v "is ignored" >&2)
check
echo "$VENV: CUDA plugin $JAX_VERSION installed"
