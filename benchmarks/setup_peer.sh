#!/usr/bin/env bash
# Build the venv that runs the peer "diffusers-Flax 0.39" for benchmarks/cpu.py.
#
# diffusers 0.39.0 is the last release with Flax classes (FlaxUNet2DConditionModel,
# FlaxAutoencoderKL, FlaxStableDiffusionPipeline); its pipeline needs transformers'
# FlaxCLIPTextModel, which transformers v5 removed, so transformers stays on 4.57.
# jax/flax are pinned to the system python's versions so the compiler under both
# contenders is the same XLA. No torch here: cpu.py converts the weights itself.
#
# Usage: bash benchmarks/setup_peer.sh [VENV_DIR]   (default .bench/venv-flax039)
# Idempotent: an existing venv that already imports the pinned stack is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.bench/venv-flax039}"
PY="${PYTHON:-python3}"

PINS=(
  "diffusers==0.39.0"
  "transformers==4.57.6"
  "huggingface-hub>=0.34,<1.0"
  "jax==0.10.2"
  "jaxlib==0.10.2"
  "flax==0.12.8"
  "numpy<2.5"
  "safetensors>=0.8.0"
  "Pillow"
)

check() {
  "$VENV/bin/python" - <<'EOF'
import diffusers, flax, jax, transformers
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: F401
from transformers import FlaxCLIPTextModel  # noqa: F401
assert diffusers.__version__ == "0.39.0", diffusers.__version__
assert jax.__version__ == "0.10.2", jax.__version__
assert flax.__version__ == "0.12.8", flax.__version__
assert transformers.__version__.startswith("4.57"), transformers.__version__
try:
    import torch  # noqa: F401
    has_torch = "yes"
except ImportError:
    has_torch = "no"
print(
    f"peer venv ok: diffusers {diffusers.__version__}, jax {jax.__version__}, "
    f"flax {flax.__version__}, transformers {transformers.__version__}, torch: {has_torch}"
)
EOF
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
  exit 0
fi

echo "creating $VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
check
echo "installed:"
"$VENV/bin/python" -m pip list --format=freeze | grep -iE \
  '^(diffusers|transformers|huggingface.hub|jax|jaxlib|flax|numpy|safetensors|ml.dtypes|optax|torch)=='
