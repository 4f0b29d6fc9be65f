"""A persistent XLA compilation cache for jaxdiff's programs (on by default in the CLI).

A Stable Diffusion sampler or train step takes tens of seconds to compile on a GPU
(most of it XLA's: benchmarks/NOTES.md); with the cache, a later process that
compiles the same program with the same shapes, options and jaxlib reads it back.
"""

from __future__ import annotations

import os

ENV_CACHE = "JAXDIFF_COMPILE_CACHE"
# Programs that compile faster than this are not written (JAX's own threshold).
MIN_COMPILE_SECS = 1.0


def default_cache_dir() -> str:
    """``$JAXDIFF_COMPILE_CACHE`` if set (an empty value: no cache), else
    ``~/.cache/jaxdiff/xla``."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "jaxdiff", "xla")
    return os.environ.get(ENV_CACHE, default)


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None: off).

    Args:
      path: the cache directory. None: :func:`default_cache_dir`, unless the process
        already set ``jax_compilation_cache_dir`` (that one is kept and returned).

    Call it before the first compile (any time before is fine; JAX reads the setting
    when it compiles). JAX also keeps XLA's per-fusion autotuning results there.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if path is None:
        if current:  # the caller (or a test harness) chose one already
            return current
        path = default_cache_dir()
    path = os.fspath(path)
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
