"""Python config files (``ml_collections``) and command-line overrides.

``--config configs/digits.py:tiny`` imports the file and calls
``get_config("tiny")``; ``--config.optimizer.lr=1e-4`` then overrides one
field, parsed to the type the field already has.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:variant]`` by calling its ``get_config(variant)``."""
    path, _, variant = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_jaxdiff_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    config = module.get_config(variant) if variant else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    return config


def _parse(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"cannot parse {text!r}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply ``key.sub=value`` overrides in place; unknown keys are a ValueError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            if part not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        if leaf not in node:
            valid = ", ".join(sorted(node.keys()))
            raise ValueError(f"unknown config key {key!r} (valid here: {valid})")
        try:
            value = _parse(text, node[leaf])
        except ValueError as e:
            raise ValueError(f"--config.{key}: {e}") from None
        node[leaf] = value
