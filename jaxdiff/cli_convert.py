"""``jaxdiff convert``: an original-layout single-file checkpoint -> a diffusers directory."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--single-file", required=True, help="original-layout .safetensors checkpoint")
    p.add_argument(
        "--config-dir",
        required=True,
        help="a diffusers-format directory of the same model family (configs + tokenizer)",
    )
    p.add_argument("--out", required=True, help="output diffusers-format directory")
    p.add_argument("--allow-pickle", action="store_true", help="permit a pickled .ckpt file")


def run(args: argparse.Namespace, extra=()) -> int:
    """Convert an original single-file checkpoint to a diffusers-format directory."""
    from jaxdiff.weights.pretrained import load_config, load_single_file, save_pretrained

    config = load_config(args.config_dir)
    params = load_single_file(args.single_file, config, allow_pickle=args.allow_pickle)
    from pathlib import Path

    out = save_pretrained(args.out, config, params, Path(args.config_dir) / "tokenizer")
    print(f"wrote {out}")
    return 0
