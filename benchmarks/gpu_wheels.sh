#!/usr/bin/env bash
# Save the wheels that benchmarks/gpu.py's peers need on the device machine, whose
# image (Python 3.12, jax 0.11, torch 2.11, transformers 5) has no diffusers:
#   .bench/wheels/torch/    diffusers 0.42.1                      (the PyTorch peer)
#   .bench/wheels/flax039/  diffusers 0.39.0, transformers 4.57.6 (FlaxCLIPTextModel),
#                           huggingface_hub 0.36.2 and tokenizers 0.22.x (4.57's pins)
# gpu.py installs each folder into its own --target dir and puts it on that peer's
# PYTHONPATH only. Carry the folder: run(..., carry=[".bench/wheels"]). .bench/ must be
# git-ignored, or the venv under it would travel with the working tree.
# Idempotent: a folder that already holds its wheels is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.bench/wheels
PLATFORMS=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
)

fetch() {  # fetch DIR SPEC...
  local dir="$DEST/$1"
  shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$dir" "$@" 2> >(grep -v "is ignored" >&2)
}

[ -n "$(ls "$DEST/torch"/diffusers-0.42.1-*.whl 2>/dev/null)" ] || fetch torch "diffusers==0.42.1"
if [ -z "$(ls "$DEST/flax039"/transformers-4.57.6-*.whl 2>/dev/null)" ]; then
  fetch flax039 "diffusers==0.39.0" "transformers==4.57.6" "huggingface-hub==0.36.2" \
    "tokenizers>=0.22,<0.23"
fi
echo "wheels under $DEST:"
find "$DEST" -name '*.whl' -printf '  %P (%s bytes)\n' | sort
du -sh "$DEST"
