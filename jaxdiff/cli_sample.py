"""``jaxdiff sample``: generate images from a diffusers-format model directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers-format model directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--init-image", default=None, help="image-to-image / inpainting source image")
    p.add_argument("--mask", default=None, help="inpainting mask image (white = repaint)")
    p.add_argument("--strength", type=float, default=None, help="img2img / inpaint strength")
    p.add_argument("--sampler", default=None, help="default: the model's scheduler_config.json")
    p.add_argument("--schedule", default=None, choices=["karras", "exponential"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bfloat16 params and compute")
    p.add_argument("--out", default="grid.png", help="grid PNG; images go beside it")


def run(args: argparse.Namespace, extra=()) -> int:
    """Generate images (text-to-image, image-to-image, inpainting) as a PNG grid."""
    import jax.numpy as jnp

    from jaxdiff.images import load_image, make_grid, save_png
    from jaxdiff.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(
        args.model, dtype=jnp.bfloat16 if args.bf16 else jnp.float32
    )
    common = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        schedule=args.schedule,
        eta=args.eta,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
    )
    if args.mask and not args.init_image:
        raise SystemExit("--mask needs --init-image")
    if args.init_image:
        size = (args.width, args.height) if args.width and args.height else None
        image = load_image(args.init_image, size)
        if args.mask:
            mask = load_image(args.mask, (image.shape[1], image.shape[0]))[..., 0]
            strength = 1.0 if args.strength is None else args.strength
            images = pipe.inpaint(image, mask, args.prompt, strength=strength, **common)
        else:
            strength = 0.8 if args.strength is None else args.strength
            images = pipe.image_to_image(image, args.prompt, strength=strength, **common)
    else:
        images = pipe.text_to_image(args.prompt, **common)
    out = Path(args.out)
    save_png(make_grid(images, rows=len(args.prompt)), out)
    for i, im in enumerate(images):
        save_png(im, out.with_name(f"{out.stem}_{i:03d}.png"))
    n_dev = pipe.mesh.devices.size
    print(
        f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, "
        f"{images.shape[1]}x{images.shape[2]}, "
        f"on {n_dev} device{'s' if n_dev > 1 else ''})"
    )
    hint = cpu_devices_hint(pipe.mesh.devices.flat[0].platform, n_dev, _cores(), len(images))
    if hint:
        print(hint)
    return 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_devices_hint(platform: str, devices: int, cores: int, images: int) -> str | None:
    """The tip printed after a CPU run on one device when more cores are available.

    XLA:CPU runs many of the UNet's kernels on one thread; one host device per core
    (``jaxdiff --cpu-devices N``) was faster on the 2-core benchmark machine in
    every run (README, "Speed", has the latest numbers). The guidance batch (2 per
    image) bounds the useful count.
    """
    useful = min(cores, 2 * images)
    if platform != "cpu" or devices != 1 or useful < 2:
        return None
    return (
        f"tip: this ran on one CPU device with {cores} cores available; "
        f"`jaxdiff --cpu-devices {useful} sample ...` runs one XLA device per core, "
        "which was faster on a 2-core machine (README, Speed)"
    )
