"""Mapping between PyTorch state dicts and Flax params pytrees.

The Flax modules in :mod:`jaxdiff.models` are named after the diffusers /
transformers modules they mirror, with list indices folded into the name
(``down_blocks.0.resnets.1.conv1.weight`` <-> ``down_blocks_0/resnets_1/conv1/kernel``).
The mapping is therefore a fixed rule, not a heuristic: only the containers in
:data:`LIST_CONTAINERS` may carry an index, the leaf name is decided by what
the target tree (from ``jax.eval_shape(init)``) holds at that path, and every
key must land on exactly one expected parameter with exactly the expected
shape. Anything missing, unexpected or mis-shaped is reported in one error.

Layouts: PyTorch convolutions are OIHW, Flax's are HWIO; PyTorch linear
weights are [out, in], Flax Dense kernels are [in, out].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

# Module names that are Python lists in the PyTorch models (ModuleList /
# Sequential). Only these may be followed by an integer index.
LIST_CONTAINERS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "transformer_blocks",
        "layers",
        "downsamplers",
        "upsamplers",
        "to_out",
        "net",
        "mid_block_attentions",
    }
)

_INDEXED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every offending key."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.misshaped = sorted(misshaped)
        lines = [f"{what}: checkpoint does not match the model."]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.misshaped:
            lines.append(
                f"  mis-shaped ({len(self.misshaped)}): "
                + ", ".join(f"{k} {got} (expected {want})" for k, got, want in self.misshaped)
            )
        super().__init__("\n".join(lines))


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """Split ``a.b.0.c.weight`` into the module path ``(a, b_0, c)`` and the leaf ``weight``."""
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            if not path or path[-1] not in LIST_CONTAINERS:
                raise KeyError(f"index {part!r} in {key!r} follows a non-list module")
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), parts[-1]


def module_path_to_torch_prefix(path: Iterable[str]) -> str:
    """Inverse of :func:`torch_key_to_module_path` for the module part."""
    out = []
    for seg in path:
        m = _INDEXED.match(seg)
        if m and m.group("name") in LIST_CONTAINERS:
            out.extend([m.group("name"), m.group("index")])
        else:
            out.append(seg)
    return ".".join(out)


def _to_flax_leaf(leaf: str, value: np.ndarray, expected: Mapping[str, Any]):
    """Pick the Flax leaf name and layout for a PyTorch tensor at one module."""
    if leaf == "bias":
        return "bias", value
    if leaf != "weight":
        return leaf, value  # e.g. a raw nn.Parameter; must match by name
    if "embedding" in expected:
        return "embedding", value
    if "scale" in expected and value.ndim == 1:
        return "scale", value
    if "kernel" in expected:
        if value.ndim == 4:  # OIHW -> HWIO
            return "kernel", np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:  # [out, in] -> [in, out]
            return "kernel", value.T
    return leaf, value


def _from_flax_leaf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "kernel":
        if value.ndim == 4:  # HWIO -> OIHW
            return "weight", np.transpose(value, (3, 2, 0, 1))
        return "weight", value.T
    if leaf in ("scale", "embedding"):
        return "weight", value
    return leaf, value


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Any,
    *,
    what: str = "model",
    ignore: Iterable[str] = (),
    dtype: Any = None,
) -> dict:
    """Convert a PyTorch-layout state dict into a params pytree.

    Args:
      state_dict: key -> numpy array, PyTorch names and layouts.
      abstract_params: the target tree, e.g. ``jax.eval_shape(model.init, ...)["params"]``;
        only ``.shape`` of each leaf is used.
      what: name used in error messages.
      ignore: regular expressions of keys that are known non-parameters
        (buffers such as ``position_ids``) and are dropped.
      dtype: cast every array to this dtype (default: keep).

    Returns:
      A nested dict of C-contiguous numpy arrays with exactly the structure of
      ``abstract_params``.

    Raises:
      WeightsMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    expected = traverse_util.flatten_dict(_unfreeze(abstract_params))
    by_module: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in expected.items():
        by_module.setdefault(path[:-1], {})[path[-1]] = leaf
    ignore_re = [re.compile(p) for p in ignore]

    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    misshaped_paths = set()
    for key, value in state_dict.items():
        if any(r.search(key) for r in ignore_re):
            continue
        value = np.asarray(value)
        try:
            module, leaf = torch_key_to_module_path(key)
        except KeyError:
            unexpected.append(key)
            continue
        slots = by_module.get(module)
        if slots is None:
            unexpected.append(key)
            continue
        name, arr = _to_flax_leaf(leaf, value, slots)
        if name not in slots:
            unexpected.append(key)
            continue
        want = tuple(slots[name].shape)
        if tuple(arr.shape) != want:
            misshaped.append((key, tuple(arr.shape), want))
            misshaped_paths.add(module + (name,))
            continue
        # Contiguous copies: a transposed view would be re-laid-out on every transfer
        # (each call of a jitted function that takes the params as numpy arrays).
        arr = arr.astype(dtype) if dtype is not None else arr
        flat[module + (name,)] = np.ascontiguousarray(arr)
    missing = [
        module_path_to_torch_prefix(p[:-1]) + "." + _from_flax_leaf(p[-1], np.zeros((1,) * 2))[0]
        for p in expected
        if p not in flat and p not in misshaped_paths
    ]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(what, missing, unexpected, misshaped)
    return traverse_util.unflatten_dict(flat)


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_params`: PyTorch names and layouts, numpy arrays."""
    out = {}
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        leaf, arr = _from_flax_leaf(path[-1], np.asarray(value))
        out[module_path_to_torch_prefix(path[:-1]) + "." + leaf] = np.ascontiguousarray(arr)
    return out


def _unfreeze(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
