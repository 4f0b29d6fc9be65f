"""Sample grids during training: ``workdir/samples/step_N.png``.

A small text-to-image function over the same pure pieces the pipeline uses
(CLIP context, classifier-free guidance around the UNet, one sampler scan,
VAE decode), jitted once per run with the params as an argument, so the
training params (or their EMA) are sampled without leaving the devices.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdiff import samplers
from jaxdiff.denoisers import classifier_free_guidance, guidance_context
from jaxdiff.models.attention import cross_attention_kv
from jaxdiff.models.sd import SDConfig, apply_unet, decode_latents, encode_text
from jaxdiff.models.unet import merged_weights


def text_to_image(
    params: dict,
    input_ids: jax.Array,
    uncond_ids: jax.Array,
    rng: jax.Array,
    guidance_scale: jax.Array,
    *,
    config: SDConfig,
    plan: samplers.SamplerPlan,
    latent_size: tuple[int, int],
) -> jax.Array:
    """Guided sampling from noise, decoded to pixels.

    Args:
      params: ``{"unet", "vae", "text_encoder"}``.
      input_ids, uncond_ids: int32 [B, L] prompt and empty-prompt ids.
      rng: key for the initial noise (and stochastic samplers).
      guidance_scale: classifier-free guidance weight (traced).
      config: model configs (static).
      plan: the sampler's static plan.
      latent_size: (h, w) of the latents.

    Returns:
      uint8 [B, H, W, 3].
    """
    cond = encode_text(params["text_encoder"], input_ids, config)
    uncond = encode_text(params["text_encoder"], uncond_ids, config)

    # The cross-attentions' keys and values of the guidance batch, and the UNet's joined
    # weights, once rather than at every step (see jaxdiff.pipeline.denoise).
    cross_kv = cross_attention_kv(params["unet"], guidance_context(cond, uncond))
    merged = merged_weights(params["unet"], config.unet)

    def net(x, t, context):
        t = jnp.broadcast_to(t, (x.shape[0],))
        return apply_unet(params["unet"], x, t, context, config, cross_kv=cross_kv, merged=merged)

    # shared_sample: the UNet's layers before its first cross-attention run once.
    model_fn = classifier_free_guidance(net, cond, uncond, guidance_scale, shared_sample=True)
    k_init, k_steps = jax.random.split(rng)
    shape = (input_ids.shape[0], *latent_size, config.vae.latent_channels)
    x = samplers.initial_latents(plan, jax.random.normal(k_init, shape, jnp.float32))
    latents = samplers.sample(model_fn, x, plan, rng=k_steps)
    images = decode_latents(params["vae"], latents, config)
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def make_sampler(config: SDConfig, sampler: str, steps: int, resolution: int):
    """A jitted ``fn(params, input_ids, uncond_ids, rng, guidance_scale) -> uint8 images``."""
    f = config.latent_factor
    if resolution % f:
        raise ValueError(f"sample resolution {resolution} is not a multiple of the VAE factor {f}")
    plan = samplers.make_plan(sampler, steps, config.scheduler)
    fn = functools.partial(
        text_to_image, config=config, plan=plan, latent_size=(resolution // f, resolution // f)
    )
    return jax.jit(fn)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 image [rows * H, columns * W, C] (row-major)."""
    b, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(b)))
    rows = -(-b // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes a PNG grid of uint8 images [B, H, W, 3]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(np.asarray(images))).save(path)
    return path
