"""The KL-regularised autoencoder of latent diffusion (``AutoencoderKL``), NHWC.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3 and App. G: an encoder maps an image ``x`` in [-1, 1] to the
moments of a diagonal Gaussian posterior ``q(z | x) = N(mean, exp(logvar))``
over latents with ``2 ** (len(block_out_channels) - 1)`` times less
resolution; a decoder maps ``z`` back to pixels. Stable Diffusion 1.x/2.x use
block_out_channels (128, 256, 512, 512), 2 resnets per block, 4 latent
channels, a factor 8 down-sampling and ``scaling_factor`` 0.18215 between
``z`` and the latents the UNet sees.

Submodules are named exactly as diffusers' ``AutoencoderKL`` names its modules,
with list indices folded in (``encoder/down_blocks_0/resnets_1/conv1``,
``decoder/mid_block/attentions_0/to_out_0``, ``quant_conv``), so that
:func:`jaxdiff.weights.common.state_dict_to_params` loads a diffusers ``vae/``
state dict by a fixed rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import Conv, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

Dtype = Any

_ENCODER_BLOCK = "DownEncoderBlock2D"
_DECODER_BLOCK = "UpDecoderBlock2D"
# diffusers builds every VAE norm and resnet with eps=1e-6 (not torch's 1e-5 default).
_EPS = 1e-6
# diffusers clamps the posterior log-variance to this range before exponentiating.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Hyper-parameters of :class:`AutoencoderKL`, named as diffusers' ``vae/config.json``.

    Defaults are the Stable Diffusion 1.x/2.x VAE. Only the encoder/decoder
    block types of the plain KL autoencoder and the SiLU activation exist here;
    anything else is rejected with a ``ValueError`` at construction.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_ENCODER_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (_DECODER_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # Normalise sequences to tuples so the config stays hashable (usable as a jit static).
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("AutoencoderConfig: block_out_channels must not be empty")
        bad = [t for t in self.down_block_types if t != _ENCODER_BLOCK]
        if bad:
            raise ValueError(
                f"AutoencoderConfig: unsupported down_block_types {bad}; only {_ENCODER_BLOCK!r}"
            )
        bad = [t for t in self.up_block_types if t != _DECODER_BLOCK]
        if bad:
            raise ValueError(
                f"AutoencoderConfig: unsupported up_block_types {bad}; only {_DECODER_BLOCK!r}"
            )
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "AutoencoderConfig: down_block_types, up_block_types and block_out_channels "
                f"must have the same length, got {len(self.down_block_types)}, "
                f"{len(self.up_block_types)} and {n}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderConfig: unsupported act_fn {self.act_fn!r}; only 'silu'")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"AutoencoderConfig: {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.norm_num_groups < 1:
            raise ValueError(
                f"AutoencoderConfig: norm_num_groups must be >= 1, got {self.norm_num_groups}"
            )
        bad_ch = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad_ch:
            raise ValueError(
                f"AutoencoderConfig: block_out_channels {list(self.block_out_channels)} must be "
                f"positive multiples of norm_num_groups={self.norm_num_groups} "
                f"(offending: {bad_ch})"
            )
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(
                    f"AutoencoderConfig: {name} has {len(v)} entries, "
                    f"expected latent_channels={self.latent_channels}"
                )

    @property
    def downsample_factor(self) -> int:
        """Ratio between image and latent resolution, ``2 ** (num_blocks - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> AutoencoderConfig:
        """Build from a diffusers ``vae/config.json`` dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are
        ignored. Any other key this class does not know is an error: it would mean a
        different model than the one implemented here.

        Args:
          config: the parsed JSON dict.

        Returns:
          The config.

        Raises:
          ValueError: naming unknown keys or unsupported values.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        public = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(public) - fields)
        if unknown:
            raise ValueError(f"AutoencoderConfig.from_diffusers: unsupported keys {unknown}")
        # JSON null means "the default" (diffusers writes e.g. shift_factor: null).
        return cls(**{k: v for k, v in public.items() if v is not None})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``vae/config.json`` dict (``AutoencoderKL.from_config`` accepts it)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian(NamedTuple):
    """``q(z | x) = N(mean, diag(exp(logvar)))``, the encoder's posterior (a pytree).

    Attributes:
      mean: [B, h, w, latent_channels].
      logvar: [B, h, w, latent_channels], already clipped to [-30, 20].
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split [B, h, w, 2C] moments into (mean, logvar) halves along channels, clip logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised draw ``z = mean + std * eps``, ``eps ~ N(0, I)``; shape of ``mean``."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The posterior mode (= mean)."""
        return self.mean

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I))`` summed over h, w, C: [B]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# --------------------------------------------------------------------------- blocks


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None, padding: int = 1) -> nn.Conv:
    # Explicit symmetric padding, as PyTorch's Conv2d(padding=p).
    pad = ((padding, padding), (padding, padding))
    return Conv(features, (kernel, kernel), padding=pad, dtype=dtype, name=name)


def _resnet(out_channels: int, groups: int, dtype: Dtype, name: str) -> ResnetBlock2D:
    # The VAE's resnet: no time embedding, eps 1e-6.
    return ResnetBlock2D(out_channels, groups=groups, eps=_EPS, dtype=dtype, name=name)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual.

    diffusers ``Attention`` as the VAE mid-block builds it (heads = 1, ``group_norm``
    on the input, biased ``to_q``/``to_k``/``to_v``/``to_out_0``), through the UNet's
    :func:`~jaxdiff.models.attention.dot_product_attention` (on CPU its fused
    kernel: one 1024-token head 5.7 -> 4.1 ms, 4096 tokens 112 -> 74 ms against
    ``jax.nn.dot_product_attention``; on GPU XLA's path, as the head is wider
    than cuDNN's flash kernel takes).
    """

    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.num_groups, _EPS, dtype=self.dtype, name="group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        # [B, T, heads=1, C]; dot_product_attention scales logits by 1/sqrt(C).
        q, k, v = (
            nn.Dense(c, dtype=self.dtype, name=n)(h)[:, :, None, :]
            for n in ("to_q", "to_k", "to_v")
        )
        h = dot_product_attention(q, k, v)[:, :, 0, :]
        h = nn.Dense(c, dtype=self.dtype, name="to_out_0")(h)
        return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without temb: resnet, (attention, resnet)."""

    channels: int
    num_groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _resnet(self.channels, self.num_groups, self.dtype, "resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.num_groups, self.dtype, name="attentions_0")(x)
        return _resnet(self.channels, self.num_groups, self.dtype, "resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """``layers_per_block`` resnets, then a ``Downsample2D`` unless it is the last block."""

    out_channels: int
    num_layers: int
    num_groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.out_channels, self.num_groups, self.dtype, f"resnets_{i}")(x)
        if self.add_downsample:
            # VAE-style asymmetric padding: zero row/column after H and W only.
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(
                x
            )
        return x


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` resnets, then an ``Upsample2D`` unless it is the last block."""

    out_channels: int
    num_layers: int
    num_groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.out_channels, self.num_groups, self.dtype, f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> posterior moments [B, H/f, W/f, 2 * latent_channels]."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, self.dtype, "conv_in")(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock(
                c,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                add_downsample=i < len(chans) - 1,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(
            chans[-1],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            self.dtype,
            name="mid_block",
        )(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, dtype=self.dtype, name="conv_norm_out")(x)
        # "double_z": mean and log-variance for every latent channel.
        return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(nn.silu(x))


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(
            chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block"
        )(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock(
                c,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                add_upsample=i < len(chans) - 1,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, dtype=self.dtype, name="conv_norm_out")(x)
        return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(nn.silu(x))


# --------------------------------------------------------------------------- model


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` images to a :class:`DiagonalGaussian`, ``decode`` latents.

    Attributes:
      config: the :class:`AutoencoderConfig`.
      dtype: computation dtype (params stay float32; GroupNorm and softmax run in fp32).

    Usage::

        model = AutoencoderKL(config)
        posterior = model.apply({"params": p}, x, method=model.encode)
        image = model.apply({"params": p}, posterior.mode(), method=model.decode)
    """

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        c2 = 2 * cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = _conv(c2, 1, self.dtype, None, padding=0)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, None, padding=0)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Image to posterior.

        Args:
          x: [B, H, W, in_channels] in [-1, 1]; H and W multiples of the down-sampling factor.

        Returns:
          :class:`DiagonalGaussian` with float32 mean/logvar [B, H/f, W/f, latent_channels].
        """
        cfg = self.config
        _check_input("encode x", x, cfg.in_channels, cfg.downsample_factor)
        moments = self.encoder(x.astype(self.dtype))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        # Latents feed the (fp32) diffusion maths, so the small posterior is kept in fp32.
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent to image.

        Args:
          z: [B, h, w, latent_channels] (unscaled: divide UNet latents by ``scaling_factor``
            first, see :func:`unscale_latents`).

        Returns:
          [B, h*f, w*f, out_channels] in ``dtype``, roughly in [-1, 1] (not clipped).
        """
        cfg = self.config
        _check_input("decode z", z, cfg.latent_channels, 1)
        z = z.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        """Reconstruct: encode, take the posterior mode (or a sample), decode.

        Args:
          x: [B, H, W, in_channels] in [-1, 1].
          sample_posterior: draw ``z`` from the posterior instead of using its mode.
          rng: PRNG key, required when ``sample_posterior``.

        Returns:
          [B, H, W, out_channels].
        """
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs an rng key")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z)


def _check_input(what: str, x: jax.Array, channels: int, multiple: int) -> None:
    # Shapes are static under jit, so this raises at trace time with a readable message.
    if x.ndim != 4:
        raise ValueError(f"AutoencoderKL {what}: expected [B, H, W, C], got shape {x.shape}")
    if x.shape[-1] != channels:
        raise ValueError(
            f"AutoencoderKL {what}: expected {channels} channels (NHWC, last axis), "
            f"got shape {x.shape}"
        )
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(
            f"AutoencoderKL {what}: height and width must be multiples of {multiple}, "
            f"got {x.shape[1]}x{x.shape[2]}"
        )


# --------------------------------------------------------------------------- functions


def _dummy_image(config: AutoencoderConfig) -> jax.Array:
    # Params do not depend on resolution: init on the smallest valid image.
    f = config.downsample_factor
    return jnp.zeros((1, f, f, config.in_channels), jnp.float32)


def init_autoencoder(config: AutoencoderConfig, rng: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Randomly initialised params (float32) of :class:`AutoencoderKL`.

    Args:
      config: model config.
      rng: PRNG key.
      dtype: computation dtype of the module used for init (params are fp32 either way).

    Returns:
      The ``params`` pytree (nested dict).
    """
    return AutoencoderKL(config, dtype).init(rng, _dummy_image(config))["params"]


def abstract_autoencoder_params(config: AutoencoderConfig, dtype: Dtype = jnp.float32) -> Any:
    """Params tree of ``jax.ShapeDtypeStruct`` (no compute, no memory), via ``jax.eval_shape``."""
    return jax.eval_shape(lambda: init_autoencoder(config, jax.random.key(0), dtype))


def vae_encode(
    params: Any, x: jax.Array, config: AutoencoderConfig, dtype: Dtype = jnp.float32
) -> DiagonalGaussian:
    """Pure-function form of :meth:`AutoencoderKL.encode` (jit with ``config`` static).

    Args:
      params: the VAE params pytree.
      x: [B, H, W, in_channels] in [-1, 1].
      config: model config.
      dtype: computation dtype.

    Returns:
      :class:`DiagonalGaussian` over [B, H/f, W/f, latent_channels].
    """
    model = AutoencoderKL(config, dtype)
    return model.apply({"params": params}, x, method=AutoencoderKL.encode)


def vae_decode(
    params: Any, z: jax.Array, config: AutoencoderConfig, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Pure-function form of :meth:`AutoencoderKL.decode` (jit with ``config`` static).

    Args:
      params: the VAE params pytree.
      z: [B, h, w, latent_channels], unscaled latents.
      config: model config.
      dtype: computation dtype.

    Returns:
      [B, h*f, w*f, out_channels].
    """
    model = AutoencoderKL(config, dtype)
    return model.apply({"params": params}, z, method=AutoencoderKL.decode)


def scale_latents(z: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """VAE latent ``z`` -> diffusion latent: ``(z - shift_factor) * scaling_factor``."""
    shift = 0.0 if config.shift_factor is None else config.shift_factor
    return (z - shift) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """Inverse of :func:`scale_latents`: ``latents / scaling_factor + shift_factor``."""
    shift = 0.0 if config.shift_factor is None else config.shift_factor
    return latents / config.scaling_factor + shift
