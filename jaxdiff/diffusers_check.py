"""Check an exported model against diffusers' PyTorch ``StableDiffusionPipeline``.

Both pipelines load the same diffusers-format directory and start from the
same initial latents (drawn here, NHWC for jaxdiff and NCHW for diffusers);
both use the scheduler that the directory's ``scheduler_config.json`` names.
The result is the mean and max absolute difference of the uint8 images.

Needs ``torch`` and ``diffusers`` (the ``test`` extra); nothing else in
jaxdiff imports this module.

    python scripts/compare_with_diffusers.py --model runs/digits/export \
        --prompt "a handwritten digit 3" --prompt "the number seven"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["compare_with_diffusers"]


def compare_with_diffusers(
    model: str | Path,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    guidance_scale: float = 2.0,
    negative_prompt: str | None = None,
    seed: int = 0,
) -> dict:
    """Generate ``prompts`` with jaxdiff and with diffusers from the same latents.

    Args:
      model: a diffusers-format StableDiffusionPipeline directory.
      prompts: one image per prompt.
      steps, guidance_scale, negative_prompt: as both pipelines take them.
      seed: seeds the shared initial latents (standard normal).

    Returns:
      ``{"jaxdiff", "diffusers"}`` (uint8 [B, H, W, 3] each), ``"mean_abs_diff"``
      and ``"max_abs_diff"`` (uint8 levels, over all pixels) and
      ``"per_image_mean_abs_diff"`` (a list).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from jaxdiff.pipeline import StableDiffusion

    if not prompts:
        raise ValueError("compare_with_diffusers: give at least one prompt")
    prompts = list(prompts)
    ours_pipe = StableDiffusion.from_pretrained(model)
    theirs_pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False
    )
    unet = theirs_pipe.unet.config
    size = int(unet.sample_size)
    latents = np.random.RandomState(seed).randn(len(prompts), size, size, unet.in_channels)
    latents = latents.astype(np.float32)
    # diffusers wants the negative prompt in the prompt's type: a list here.
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    ours = ours_pipe.text_to_image(
        prompts,
        negative_prompt=negative,
        steps=steps,
        guidance_scale=guidance_scale,
        latents=latents,
        progress=False,
    )
    with torch.no_grad():
        theirs = theirs_pipe(
            prompts,
            negative_prompt=negative,
            height=size * theirs_pipe.vae_scale_factor,
            width=size * theirs_pipe.vae_scale_factor,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images
    theirs = (theirs * 255).round().astype(np.uint8)
    if ours.shape != theirs.shape:
        raise AssertionError(f"image shapes differ: jaxdiff {ours.shape}, diffusers {theirs.shape}")
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    return {
        "jaxdiff": ours,
        "diffusers": theirs,
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": int(diff.max()),
        "per_image_mean_abs_diff": [float(d.mean()) for d in diff],
    }
