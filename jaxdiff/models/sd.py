"""The three Stable Diffusion networks as one bundle of configs and pure functions.

``SDConfig`` holds the UNet, VAE, text-encoder and scheduler configs; params
are a plain dict ``{"unet": ..., "vae": ..., "text_encoder": ...}``. The
functions below are what the pipeline and the trainer call, with configs and
dtypes static and everything else traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.models.attention import CROSS_KV, MERGED, cross_attention_kv
from jaxdiff.models.autoencoder import (
    AutoencoderConfig,
    abstract_autoencoder_params,
    init_autoencoder,
    scale_latents,
    unscale_latents,
    vae_decode,
    vae_encode,
)
from jaxdiff.models.clip import CLIPTextConfig, abstract_clip_params, clip_encode, init_clip
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig, init_unet, unet_abstract_params
from jaxdiff.models.unet import ohwi_kernels as unet_ohwi_kernels
from jaxdiff.schedules import SchedulerConfig

Dtype = Any
COMPONENTS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class SDConfig:
    """Configs of a whole latent diffusion model (hashable: usable as a jit static)."""

    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoder: CLIPTextConfig
    scheduler: SchedulerConfig

    def __post_init__(self):
        if self.text_encoder.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(
                f"text encoder width {self.text_encoder.hidden_size} != UNet "
                f"cross_attention_dim {self.unet.cross_attention_dim}"
            )
        lat = self.vae.latent_channels
        if self.unet.out_channels != lat or self.unet.in_channels not in (
            lat,
            2 * lat,
            2 * lat + 1,
        ):
            raise ValueError(
                f"UNet channels in={self.unet.in_channels} out={self.unet.out_channels} do not "
                f"fit the VAE's {lat} latent channels (in must be {lat}, {2 * lat} or "
                f"{2 * lat + 1}; out must be {lat})"
            )

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.downsample_factor


def init_params(config: SDConfig, rng: jax.Array) -> dict:
    """Random params for all three networks."""
    k1, k2, k3 = jax.random.split(rng, 3)
    return {
        "unet": init_unet(config.unet, k1),
        "vae": jax.jit(lambda k: init_autoencoder(config.vae, k))(k2),
        "text_encoder": jax.jit(lambda k: init_clip(config.text_encoder, k))(k3),
    }


def abstract_params(config: SDConfig) -> dict:
    """Param shapes of all three networks (``jax.ShapeDtypeStruct`` leaves), no allocation."""
    return {
        "unet": unet_abstract_params(config.unet),
        "vae": abstract_autoencoder_params(config.vae),
        "text_encoder": abstract_clip_params(config.text_encoder),
    }


def encode_text(params: Any, input_ids: jax.Array, config: SDConfig, dtype: Dtype = jnp.float32):
    """Token ids [B, L] -> the UNet's cross-attention context [B, L, D] (CLIP last hidden state)."""
    return clip_encode(params, input_ids, config.text_encoder, dtype)[0]


def apply_unet(
    params: Any,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    config: SDConfig,
    dtype: Dtype = jnp.float32,
    remat: bool = False,
    cross_kv: dict | None = None,
    temb_in_norm: bool | None = None,
    merged: dict | None = None,
    ohwi_kernels: bool = False,
) -> jax.Array:
    """The network output (eps, v or x0 per the scheduler config) in float32.

    ``context``'s batch may be a multiple k of ``x``'s: the output is then that of
    ``x`` tiled k times (see :class:`UNet2DConditionModel`), computed with the layers
    before the first cross-attention run once. ``cross_kv``: the cross-attention keys
    and values of this ``context`` from
    :func:`jaxdiff.models.attention.cross_attention_kv`, computed once for
    many calls (a sampler's steps) instead of in each. ``merged``: the UNet's joined
    weights from :func:`jaxdiff.models.unet.merged_weights`, likewise built once; with
    its cross-attention part (``"cross_kv"``) and no ``cross_kv``, the keys and values
    are computed from it, as one product (see
    :func:`jaxdiff.models.unet.fuse_projections`).
    ``temb_in_norm``: see :class:`~jaxdiff.models.layers.ResnetBlock2D` (the train
    step passes False). ``ohwi_kernels``: ``params``' convolution kernels are
    [O, H, W, I] (:func:`jaxdiff.models.unet.ohwi_kernels`; for GPUs).
    """
    model = UNet2DConditionModel(config.unet, dtype=dtype, remat=remat, temb_in_norm=temb_in_norm)
    if ohwi_kernels:
        params = unet_ohwi_kernels(params, inverse=True)
    variables = {"params": params}
    if cross_kv is not None:
        variables[CROSS_KV] = cross_kv
    if merged is not None:
        merged = dict(merged)
        joined = merged.pop("cross_kv", None)
        if joined is not None and cross_kv is None:
            variables[CROSS_KV] = cross_attention_kv(params, context, dtype, joined=joined)
        variables[MERGED] = merged
    return model.apply(variables, x, t, context).astype(jnp.float32)


def encode_images(
    params: Any,
    images: jax.Array,
    config: SDConfig,
    rng: jax.Array | None = None,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> scaled diffusion latents (a posterior sample, or its
    mode when ``rng`` is None)."""
    posterior = vae_encode(params, images, config.vae, dtype)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return scale_latents(z, config.vae)


def decode_latents(params: Any, latents: jax.Array, config: SDConfig, dtype: Dtype = jnp.float32):
    """Scaled diffusion latents -> images [B, H, W, 3] in [-1, 1] (float32, unclipped)."""
    z = unscale_latents(latents.astype(jnp.float32), config.vae)
    return vae_decode(params, z, config.vae, dtype).astype(jnp.float32)
