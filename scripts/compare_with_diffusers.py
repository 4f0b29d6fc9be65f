"""Does an export generate the same images in diffusers' PyTorch pipeline as in jaxdiff?

    python scripts/compare_with_diffusers.py --model runs/digits/export \
        --prompt "a handwritten digit 3" --steps 20 --guidance 2 --out compare.png

Prints the mean and max |difference| in uint8 levels (per image and overall);
exits 1 if the mean exceeds ``--tolerance`` (default 1 level). ``--out`` writes
a two-row grid: jaxdiff on top, diffusers below. Needs the ``test`` extra
(torch, diffusers).
"""

import argparse
import sys

from jaxdiff.diffusers_check import compare_with_diffusers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers-format directory")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1.0, help="max mean |diff| (uint8)")
    p.add_argument("--out", help="PNG grid: jaxdiff row, then diffusers row")
    args = p.parse_args(argv)
    r = compare_with_diffusers(
        args.model,
        args.prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    for prompt, d in zip(args.prompt, r["per_image_mean_abs_diff"], strict=True):
        print(f"{d:8.4f}  {prompt}")
    print(f"mean |diff| {r['mean_abs_diff']:.4f} uint8 levels, max {r['max_abs_diff']}")
    if args.out:
        import numpy as np

        from jaxdiff.images import make_grid, save_png

        save_png(make_grid(np.concatenate([r["jaxdiff"], r["diffusers"]]), rows=2), args.out)
        print(f"grid: {args.out}")
    return 0 if r["mean_abs_diff"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
