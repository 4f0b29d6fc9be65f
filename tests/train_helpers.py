"""Shared pieces of the training tests: the tiny digits run, CLI subprocesses, tree checks.

The tiny digits run (``configs/digits.py:tiny``) is trained once per session
(``tiny_run``); its export is the pretrained model that the sharding,
multi-host and data-source tests fine-tune, so they all reuse its compiled steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import numpy as np

from jaxdiff.configs import apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = f"{ROOT / 'configs' / 'digits.py'}:tiny"
CACHE = ROOT / ".jax_cache"


def tiny_config(*overrides: str):
    """``configs/digits.py:tiny`` with ``key=value`` overrides."""
    config = load_config(TINY)
    apply_overrides(config, overrides)
    return config


_STRAIGHT: dict[str, tuple] = {}


def straight_tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """The straight tiny digits run, trained once per session: (workdir, summary).

    Logs a digest of every batch. Test modules wrap it in their own session
    fixture; the cache here makes them share one run.
    """
    if "run" not in _STRAIGHT:
        from jaxdiff.train.loop import train_and_evaluate

        workdir = tmp_path_factory.mktemp("tiny_straight")
        summary = train_and_evaluate(tiny_config("debug.log_batch_hashes=True"), workdir)
        _STRAIGHT["run"] = (workdir, summary)
    return _STRAIGHT["run"]


def compile_cache_env() -> dict[str, str]:
    """Environment variables that point a subprocess's jax at the suite's compile cache
    (``tests/conftest.py`` sets the same for this process)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def cli_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment of a ``jaxdiff`` subprocess: fake CPU devices and the shared compile cache.

    The suite's other XLA flags (``tests/conftest.py``) go along: the subprocess must
    compile the same machine code as this process for its runs to match bit for bit.
    """
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env.update(
        XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        **compile_cache_env(),
    )
    env.update(extra)
    return env


def cli_command(workdir: Path, *overrides: str, config: str = TINY) -> list[str]:
    """``python -m jaxdiff.cli train --config ... --workdir ... --config.k=v ...``."""
    cmd = [sys.executable, "-m", "jaxdiff.cli", "train", "--config", config]
    return cmd + ["--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]


def load_export(path: Path) -> dict:
    """Params of an exported diffusers directory, as numpy."""
    from jaxdiff.weights.pretrained import load_pretrained

    return load_pretrained(path)[1]


def flat(tree) -> dict[str, np.ndarray]:
    """{path: numpy array} of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


# The attention key bias adds q . b_k to every score of a query, which softmax ignores:
# its true gradient is zero, the computed one is rounding noise, and Adam scales that
# noise up to lr-sized steps. Its value therefore depends on summation order (devices).
SHIFT_INVARIANT = ("['k_proj']['bias']", "['to_k']['bias']")


def max_relative_error(a, b, skip: tuple[str, ...] = ()) -> float:
    """Largest per-leaf ||a - b|| / ||b|| over two pytrees of the same structure.

    Leaves whose path contains one of ``skip`` are left out.
    """
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    worst = 0.0
    for k in fa:
        if any(s in k for s in skip):
            continue
        x, y = fa[k].astype(np.float64), fb[k].astype(np.float64)
        worst = max(worst, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return worst


def global_relative_error(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees taken as one vector."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    diff = sum(float(np.sum((fa[k].astype(np.float64) - fb[k]) ** 2)) for k in fa)
    norm = sum(float(np.sum(fb[k].astype(np.float64) ** 2)) for k in fb)
    return float(np.sqrt(diff / norm))


def assert_trees_equal(a, b) -> None:
    """Bitwise-equal pytrees of arrays."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
