"""Find, read and write the weight files of one model component directory.

A diffusers-format component directory (``unet/``, ``vae/``, ``text_encoder/``)
holds ``config.json`` and one of:

- ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``
  (optionally with a variant: ``diffusion_pytorch_model.fp16.safetensors``);
- a sharded set with ``*.safetensors.index.json`` naming the shard of each key;
- legacy pickled ``*.bin`` files, read only with ``allow_pickle=True`` and then
  through ``torch.load(weights_only=True)`` (checkpoints from strangers are
  data, not code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxdiff.weights import safetensors_io

_STEMS = ("diffusion_pytorch_model", "model")


def _candidates(directory: Path, suffix: str, variant: str | None) -> list[Path]:
    mid = f".{variant}" if variant else ""
    return [directory / f"{stem}{mid}{suffix}" for stem in _STEMS]


def read_state_dict(
    directory: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Read a component's weights as PyTorch-named numpy arrays.

    Args:
      directory: the component directory (holding ``config.json``).
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
      allow_pickle: permit legacy ``.bin`` files (loaded with ``weights_only=True``).

    Returns:
      key -> numpy array, in the dtype stored on disk.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such model component directory: {directory}")
    for path in _candidates(directory, ".safetensors", variant):
        if path.is_file():
            return safetensors_io.load_file(path)
    for index in _candidates(directory, ".safetensors.index.json", variant):
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            out: dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                out.update(safetensors_io.load_file(directory / shard))
            return out
    bins = [p for p in _candidates(directory, ".bin", variant) if p.is_file()]
    if bins:
        if not allow_pickle:
            raise ValueError(
                f"{bins[0]} is a pickled PyTorch checkpoint; pickles can run code. "
                "Convert it to safetensors, or pass allow_pickle=True to load it with "
                "torch.load(weights_only=True)."
            )
        return _torch_load(bins[0])
    present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    looked = ", ".join(p.name for p in _candidates(directory, ".safetensors", variant))
    raise FileNotFoundError(f"no weights in {directory} (looked for {looked}; found: {present})")


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"loading {path} needs torch; convert it to safetensors instead") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        if hasattr(v, "detach"):
            v = v.detach()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def read_config(directory: str | os.PathLike, name: str = "config.json") -> dict:
    """Read a component's JSON config, with a clear error when it is missing."""
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"missing {name} in {directory}")
    return json.loads(path.read_text())


def write_component(
    directory: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    config: Mapping,
    *,
    weights_name: str = "diffusion_pytorch_model.safetensors",
) -> None:
    """Write ``config.json`` and a safetensors file, the diffusers layout of one component."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    safetensors_io.save_file(state_dict, directory / weights_name, metadata={"format": "pt"})
