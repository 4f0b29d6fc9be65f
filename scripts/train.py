"""Thin entry point: ``python scripts/train.py --config configs/digits.py:tiny --workdir DIR``."""

import sys

from jaxdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
