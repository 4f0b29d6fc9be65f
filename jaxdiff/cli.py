"""The ``jaxdiff`` command: ``jaxdiff <subcommand> ...``.

    jaxdiff train --config configs/digits.py:tiny --workdir runs/tiny --config.total_steps=100

Each subcommand is a function taking the parsed arguments (and the arguments
argparse did not recognise); :data:`SUBCOMMANDS` maps names to
``(add_arguments, run)`` pairs, so new subcommands (``sample``, ``convert``)
are one entry each. The work itself lives in the library.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

CONFIG_PREFIX = "--config."


def config_overrides(extra: Sequence[str]) -> list[str]:
    """``--config.a.b=1`` / ``--config.a.b 1`` arguments -> ``["a.b=1", ...]``.

    Raises:
      ValueError: for any other argument, or an override without a value.
    """
    out, i = [], 0
    extra = list(extra)
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith(CONFIG_PREFIX) or len(arg) == len(CONFIG_PREFIX):
            raise ValueError(f"unrecognised argument {arg!r}")
        key, sep, value = arg[len(CONFIG_PREFIX) :].partition("=")
        if not sep:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ValueError(f"{arg} needs a value ({arg}=VALUE)")
            value, i = extra[i + 1], i + 1
        out.append(f"{key}={value}")
        i += 1
    return out


# ------------------------------------------------------------------ train


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "jaxdiff train --config FILE.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]"
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")


def train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Train from a config file; rerun the same command to resume.

    Loads ``--config``, applies the ``--config.KEY=VALUE`` overrides, checks the
    result and calls :func:`jaxdiff.train.loop.train_and_evaluate`.

    Returns:
      The exit code: 0 when training finished or was stopped by a signal (after
      saving), 2 for a bad config.
    """
    from jaxdiff.configs import apply_overrides, load_config
    from jaxdiff.train.setup import check_config

    try:
        config = load_config(args.config)
        apply_overrides(config, config_overrides(extra))
        check_config(config)
    except (ValueError, FileNotFoundError) as e:
        # A config mistake (unknown key, bad value, missing file) is one line, not a trace.
        print(f"jaxdiff train: error: {e}", file=sys.stderr)
        return 2
    from jaxdiff.train.loop import train_and_evaluate  # imports jax: after the config is valid

    summary = train_and_evaluate(config, args.workdir)
    if summary.get("preempted"):
        print("training stopped by a signal; checkpoint saved")
    elif summary.get("export"):
        print(f"done: model exported to {summary['export']}")
    return 0


# name -> (add its arguments, run it with (args, unrecognised args) -> exit code)
def _lazy(module: str) -> tuple[Callable, Callable]:
    """(add_arguments, run) of a subcommand living in its own module."""
    import importlib

    mod = importlib.import_module(module)
    return mod.add_arguments, mod.run


SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_train_arguments, train),
    "sample": _lazy("jaxdiff.cli_sample"),
    "convert": _lazy("jaxdiff.cli_convert"),
}
# Subcommands whose extra arguments are config overrides.
_ACCEPTS_OVERRIDES = {"train"}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Stable Diffusion in JAX.")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="on a CPU host, run as N XLA devices (e.g. one per core) so batches split "
        "over the cores; must come before the subcommand",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in SUBCOMMANDS.items():
        doc = (run.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None)
        add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxdiff`` command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _ACCEPTS_OVERRIDES:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.cpu_devices is not None:
        try:
            flags = cpu_devices_flags(os.environ.get("XLA_FLAGS", ""), args.cpu_devices)
        except ValueError as e:
            parser.error(str(e))
        _check_backend_not_started()
        os.environ["XLA_FLAGS"] = flags
    _enable_compile_cache()
    _, run = SUBCOMMANDS[args.command]
    return run(args, extra)


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_flags(xla_flags: str, n: int) -> str:
    """``XLA_FLAGS`` with the host platform's device count set to ``n`` (any old count dropped).

    XLA:CPU runs many of the UNet's convolutions and matmuls on one thread at
    small batches; as N devices the batch (and a single image's guidance pair)
    splits over the cores: benchmarks/NOTES.md measured -16 % on a batch-2 UNet
    and -19 % on 20-step text-to-image with 2 devices on 2 cores.
    """
    if n < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={n}"])


def _check_backend_not_started() -> None:
    """XLA reads XLA_FLAGS once, when the first backend starts: too late after that."""
    if "jax" not in sys.modules:
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "--cpu-devices needs a fresh process: JAX's backend already started in this one "
            "(set XLA_FLAGS=" + DEVICE_COUNT_FLAG + "=N before importing jax instead)"
        )


def _enable_compile_cache() -> None:
    """A persistent XLA compilation cache, so a second ``jaxdiff`` run skips compiling
    (:func:`jaxdiff.compile_cache.enable_compile_cache`: ``JAXDIFF_COMPILE_CACHE``
    picks the directory, default ``~/.cache/jaxdiff/xla``; an empty value turns the
    cache off; one the caller set already is kept)."""
    from jaxdiff.compile_cache import enable_compile_cache

    enable_compile_cache()


if __name__ == "__main__":
    sys.exit(main())
