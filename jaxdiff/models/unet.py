"""The conditional UNet of Stable Diffusion 1.x / 2.x (diffusers ``UNet2DConditionModel``), NHWC.

The denoiser ``eps_theta(x_t, t, c)`` of latent diffusion (Rombach et al.
2022, Sec. 3.3): a UNet (Ronneberger et al. 2015) of resnet blocks with a
sinusoidal timestep embedding added in every block, and spatial transformers
cross-attending to the text encoder's hidden states ``c`` in the
``CrossAttn*`` blocks.

Submodules are named as diffusers names its modules, list indices folded in
(``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``,
``mid_block/resnets_1/conv2``, ``up_blocks_2/upsamplers_0/conv``, ...), so
:func:`jaxdiff.weights.common.state_dict_to_params` loads a diffusers
``unet/`` state dict by a fixed rule and rejects anything that does not fit.

Unlike diffusers, the config says ``num_heads`` for the number of attention
heads per block. diffusers' ``attention_head_dim`` key holds that same number
(a naming mistake it kept for compatibility, diffusers#2011);
:meth:`UNetConfig.from_diffusers` and :meth:`UNetConfig.to_diffusers`
translate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import (
    MERGED,
    AttentionFn,
    Transformer2DModel,
    joined_cross_kv_weights,
    merged_self_attention_weights,
)
from jaxdiff.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv3x3,
    dense,
    tile_batch,
    timestep_embedding,
)

Dtype = Any

__all__ = [
    "UNetConfig",
    "UNet2DConditionModel",
    "fuse_projections",
    "init_unet",
    "merged_weights",
    "ohwi_kernels",
    "unet_abstract_params",
]

# Block type -> whether it has cross-attention transformers.
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCK = "UNetMidBlock2DCrossAttn"

# With merged weights, each resnet's time-embedding offset is a slice of one product,
# which XLA:GPU fuses into the resnet's norm2 (the offset is added inside the
# GroupNorm's reductions), except at the largest maps: deviceless (H200), at batch 16
# x 64 x 64 it wrote x + offset out in fp32 for the five full-resolution resnets (84 MB
# each; 0.27 ms of traffic per call). Held apart by an optimization barrier, those
# slices are read as plain arrays and the add stays in the reductions. From this many
# positions (batch x height x width of the sample); below it the barrier only adds the
# slices' copies (4 kernels at batch 2, and in the sampler's loop at batch 8).
_TEMB_APART_POSITIONS = 1 << 16

# diffusers' defaults for the keys this UNet reads: a config.json that omits a
# key means diffusers' default, which is not always Stable Diffusion's value
# (cross_attention_dim defaults to 1280, SD 1.x uses 768).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": _MID_BLOCK,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
}

# Keys whose non-default values select architectures this UNet does not build
# (SDXL's added embeddings, class conditioning, scale-shift resnets, ...).
# Each must be absent or hold the value here.
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Read by diffusers only for an addition_embed_type this UNet rejects anyway.
_IGNORED = frozenset({"addition_embed_type_num_heads"})


def _per_block(name: str, value: Any, n: int) -> tuple:
    """An int or a length-n sequence -> a length-n tuple."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def _uniform(name: str, value: Any) -> Any:
    """A per-block list that must hold one value (this UNet has one value for all blocks)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(set(value)) != 1:
            raise ValueError(f"UNet config: unsupported per-block {name} {list(value)}")
        return value[0]
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet2DConditionModel`; defaults are Stable Diffusion 1.5's.

    Attributes:
      in_channels: latent channels in (4; 9 for inpainting, 8 for instruct-pix2pix).
      out_channels: channels predicted.
      block_out_channels: channels per resolution level.
      layers_per_block: resnets per down block (up blocks have one more).
      down_block_types: "CrossAttnDownBlock2D" or "DownBlock2D" per level.
      up_block_types: "CrossAttnUpBlock2D" or "UpBlock2D" per level, coarse to fine.
      num_heads: attention heads per level (diffusers' ``attention_head_dim``);
        channels per head are ``block_out_channels[i] // num_heads[i]``.
      cross_attention_dim: D, the width of the text encoder's hidden states.
      transformer_layers_per_block: transformer blocks per spatial transformer.
      use_linear_projection: Dense (SD 2.x) instead of 1x1 conv (SD 1.x) around
        the transformers.
      upcast_attention: compute attention in fp32 (SD 2.1).
      flip_sin_to_cos: timestep features ordered [cos, sin].
      freq_shift: ``downscale_freq_shift`` of the timestep features.
      norm_num_groups: GroupNorm groups everywhere.
      norm_eps: GroupNorm epsilon of resnets and the output norm.
      downsample_padding: 1 (symmetric) or 0 (pad after only), see :class:`Downsample2D`.
      dropout: dropout rate inside resnets.
      sample_size: nominal latent size (metadata: the pipeline's default resolution / 8).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = _DIFFUSERS_DEFAULTS["down_block_types"]
    up_block_types: tuple[str, ...] = _DIFFUSERS_DEFAULTS["up_block_types"]
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    dropout: float = 0.0
    sample_size: int | tuple[int, int] | None = 64

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so the config stays hashable.
        for name in ("block_out_channels", "down_block_types", "up_block_types", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNet config: block_out_channels is empty")
        for name in ("down_block_types", "up_block_types", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNet config: {name} has {len(getattr(self, name))} entries but "
                    f"block_out_channels has {n}"
                )
        for kind, types, known in (
            ("down", self.down_block_types, _DOWN_BLOCKS),
            ("up", self.up_block_types, _UP_BLOCKS),
        ):
            for t in types:
                if t not in known:
                    raise ValueError(
                        f"UNet config: unsupported {kind} block type {t!r} "
                        f"(supported: {list(known)})"
                    )
        for name in (
            "in_channels",
            "out_channels",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "norm_num_groups",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNet config: {name} must be a positive int, got {v!r}")
        for c, heads in zip(self.block_out_channels, self.num_heads):
            if c % self.norm_num_groups != 0:
                raise ValueError(
                    f"UNet config: block_out_channels {c} is not divisible by "
                    f"norm_num_groups {self.norm_num_groups}"
                )
            if not isinstance(heads, int) or not 1 <= heads <= c:
                raise ValueError(f"UNet config: {heads!r} attention heads for {c} channels")
        if self.downsample_padding not in (0, 1):
            raise ValueError(
                f"UNet config: unsupported downsample_padding {self.downsample_padding} (0 or 1)"
            )

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding fed to every resnet: 4 x block_out_channels[0]."""
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Total spatial down-sampling, 2 ** (levels - 1); inputs need not be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Read diffusers' ``unet/config.json`` (as a dict) the way ``UNet2DConditionModel`` does.

        Missing keys take diffusers' defaults; keys starting with ``_`` are
        ignored. ``attention_head_dim`` (int or per-block list) is the number
        of heads, as in diffusers, and ``num_attention_heads`` must be unset
        (diffusers itself rejects it).

        Args:
          config: the parsed JSON.

        Returns:
          The config.

        Raises:
          ValueError: for unknown keys, and for any setting that selects an
            architecture this UNet does not build (naming the key and value).
        """
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(cfg) - set(_DIFFUSERS_DEFAULTS) - set(_FIXED) - _IGNORED)
        if unknown:
            raise ValueError(f"UNet config: unknown keys {unknown}")
        for key, want in _FIXED.items():
            got = cfg.get(key, want)
            if key == "only_cross_attention":
                got = _uniform(key, got)
            if key == "mid_block_only_cross_attention" and got is False:
                got = None
            if got != want:
                raise ValueError(f"UNet config: unsupported {key}={got!r} (only {want!r})")
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DIFFUSERS_DEFAULTS}}
        if c["mid_block_type"] != _MID_BLOCK:
            got = c["mid_block_type"]
            raise ValueError(f"UNet config: unsupported mid_block_type={got!r} (only {_MID_BLOCK})")
        if c["num_attention_heads"] is not None:
            raise ValueError(
                "UNet config: unsupported num_attention_heads (diffusers' UNet2DConditionModel "
                "rejects it too; attention_head_dim holds the number of heads)"
            )
        n = len(c["block_out_channels"])
        if c["attention_head_dim"] is None:
            raise ValueError("UNet config: attention_head_dim (the number of heads) is None")
        return cls(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=_uniform("layers_per_block", c["layers_per_block"]),
            down_block_types=tuple(c["down_block_types"]),
            up_block_types=tuple(c["up_block_types"]),
            num_heads=_per_block("attention_head_dim", c["attention_head_dim"], n),
            cross_attention_dim=_uniform("cross_attention_dim", c["cross_attention_dim"]),
            transformer_layers_per_block=_uniform(
                "transformer_layers_per_block", c["transformer_layers_per_block"]
            ),
            use_linear_projection=bool(c["use_linear_projection"]),
            upcast_attention=bool(c["upcast_attention"]),
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=c["freq_shift"],
            norm_num_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]),
            downsample_padding=c["downsample_padding"],
            dropout=float(c["dropout"]),
            sample_size=c["sample_size"],
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A config dict for diffusers: ``UNet2DConditionModel(**cfg.to_diffusers())``.

        JSON-ready (lists, not tuples); no private keys such as ``_class_name``.
        """
        heads = list(self.num_heads)
        sample_size = self.sample_size
        return {
            "sample_size": list(sample_size) if isinstance(sample_size, tuple) else sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": _MID_BLOCK,
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": 1,
            "dropout": self.dropout,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            # diffusers' name for the number of heads; a list only when it varies.
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "center_input_sample": False,
        }


# What the blocks get for the time: the embedding [B, T], which each resnet projects,
# or every resnet's projection already made, by "block/resnet" name (merged weights).
TimeEmbedding = jax.Array | Mapping[str, jax.Array]


def _resnets(cfg: UNetConfig) -> list[tuple[str, int]]:
    """Every resnet's "block/resnet" name and output channels, in the UNet's order."""
    boc, per = cfg.block_out_channels, cfg.layers_per_block
    n = len(boc)
    out = [(f"down_blocks_{i}/resnets_{j}", c) for i, c in enumerate(boc) for j in range(per)]
    out += [(f"mid_block/resnets_{j}", boc[-1]) for j in range(2)]
    out += [
        (f"up_blocks_{i}/resnets_{j}", boc[n - 1 - i]) for i in range(n) for j in range(per + 1)
    ]
    return out


def merged_weights(params: Mapping, config: UNetConfig, cross_attention: bool = False) -> dict:
    """Weights the UNet can use joined, built once for many calls (a sampler's steps).

    XLA's GPU compiler merges the projections that read one input into one GEMM,
    and concatenates their weights in every call: inside a sampler's ``while`` loop,
    in every step (it moves no computation out of the loop). Built here once and given
    as the ``"merged"`` collection (``model.apply({"params": p, "merged": m}, ...)``,
    or ``apply_unet(..., merged=m)``), the UNet computes

    - every resnet's ``time_emb_proj(silu(temb))`` as one product (``time_emb_kernel``
      [T, sum of the resnets' channels], ``time_emb_bias``), and
    - each self-attention's q, k and v as one product
      (:func:`~jaxdiff.models.attention.merged_self_attention_weights`),
    - with ``cross_attention``, every cross-attention's keys and values as one product
      of the context (``"cross_kv"``: :func:`~jaxdiff.models.attention.joined_cross_kv_weights`,
      used by :func:`~jaxdiff.models.sd.apply_unet` when it is not given the keys and
      values themselves).

    The products are the same; the params are not changed.
    """
    parts = []
    for path, channels in _resnets(config):
        block, resnet = path.split("/")
        p = params[block][resnet]["time_emb_proj"]
        if p["kernel"].shape != (config.time_embed_dim, channels):
            raise ValueError(
                f"merged_weights: {path}/time_emb_proj kernel {p['kernel'].shape} does not "
                f"fit the config ({config.time_embed_dim}, {channels})"
            )
        parts.append(p)
    merged = merged_self_attention_weights(params)
    merged["time_emb_kernel"] = jnp.concatenate([p["kernel"] for p in parts], axis=-1)
    merged["time_emb_bias"] = jnp.concatenate([p["bias"] for p in parts], axis=-1)
    if cross_attention:
        merged["cross_kv"] = joined_cross_kv_weights(params)
    return merged


def fuse_projections(params: Mapping, config: UNetConfig) -> tuple[dict, dict]:
    """The UNet's weights for many calls of one network: ``(params, merged)`` for
    ``apply_unet(params, ..., merged=merged)``.

    ``merged`` is ``merged_weights(params, config, cross_attention=True)``, and the
    returned params are the given ones without what it replaces: every self-attention's
    ``to_q``/``to_k``/``to_v``, every cross-attention's ``to_k``/``to_v`` and every
    resnet's ``time_emb_proj``. The same products as the plain params (diffusers'
    ``fuse_qkv_projections`` does the like), built once: XLA's GPU compiler would
    otherwise join those weights in every call (the time embedding's alone is 52 MB at
    SD 1.5's sizes), and a call passes 105 fewer arrays (SD 1.5: 581 against 686
    parameter arrays), which is host time in every call. For inference only: the
    params to train, save or convert are the plain ones.
    """
    merged = merged_weights(params, config, cross_attention=True)
    drop = {"attn1": ("to_q", "to_k", "to_v"), "attn2": ("to_k", "to_v")}

    def strip(tree: Mapping) -> dict:
        out = {}
        for name, sub in tree.items():
            if name == "time_emb_proj":
                continue
            if isinstance(sub, Mapping):
                sub = strip({k: v for k, v in sub.items() if k not in drop.get(name, ())})
            out[name] = sub
        return out

    return strip(params), merged


def ohwi_kernels(params: Any, inverse: bool = False) -> Any:
    """Every convolution kernel of ``params`` (the 4-D arrays, [H, W, I, O] in Flax)
    as [O, H, W, I], the order cuDNN's NHWC convolution reads; ``inverse`` turns them
    back.

    For a GPU program that calls the UNet many times: keep the params this way and
    pass ``apply_unet(..., ohwi_kernels=True)``, which turns them back inside the
    program. XLA then makes that transpose a relabelling of the same bytes, where with
    Flax's order it transposes every kernel in every call (SD 1.5: 98 kernels, 0.49 ms
    of memory traffic per call on an H200; deviceless, ``benchmarks/NOTES.md``,
    session 20). The effect of :func:`jaxdiff.layouts.compile_with_layouts` on the
    kernels, with a plain ``jax.jit``. XLA:CPU reads Flax's order, so not for CPUs.
    """
    order = (1, 2, 3, 0) if inverse else (3, 0, 1, 2)
    return jax.tree.map(lambda a: jnp.transpose(a, order) if a.ndim == 4 else a, params)


# Rematerialised variants: same params, activations recomputed in the backward pass.
_RematResnet = nn.remat(ResnetBlock2D)
_RematTransformer = nn.remat(Transformer2DModel)


class _Block(nn.Module):
    """Shared fields and constructors of the UNet's down, mid and up blocks."""

    config: UNetConfig
    index: int = 0
    remat: bool = False
    deterministic: bool = True
    attention_fn: AttentionFn | None = None
    temb_in_norm: bool | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(
        self, out_channels: int, name: str
    ) -> Callable[[jax.Array, TimeEmbedding], jax.Array]:
        """The resnet ``name`` of this block, as ``fn(x, temb)``. (Called by the caller,
        not in here: a module called inside this method would get its name in its
        ops' names.)"""
        cls = _RematResnet if self.remat else ResnetBlock2D
        cfg = self.config
        module = cls(
            out_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            dropout=cfg.dropout,
            deterministic=self.deterministic,
            temb_in_norm=self.temb_in_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

        def run(x: jax.Array, temb: TimeEmbedding, skip: jax.Array | None = None) -> jax.Array:
            if isinstance(temb, Mapping):  # projected for every resnet (merged weights)
                return module(x, None, temb[f"{self.name}/{name}"], skip)
            return module(x, temb, None, skip)

        return run

    def transformer(self, channels: int, heads: int, name: str) -> nn.Module:
        cls = _RematTransformer if self.remat else Transformer2DModel
        cfg = self.config
        # diffusers: Transformer2DModel(heads, channels // heads, in_channels=channels, ...).
        return cls(
            heads,
            channels // heads,
            depth=cfg.transformer_layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=cfg.upcast_attention,
            attention_fn=self.attention_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class DownBlock(_Block):
    """diffusers ``CrossAttnDownBlock2D`` / ``DownBlock2D`` at level ``index``.

    ``layers_per_block`` x (resnet [, transformer]), then a stride-2
    ``downsamplers_0`` except at the last level.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: TimeEmbedding, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Args: x [B, H, W, C]; temb [B, T] (see :data:`TimeEmbedding`); context [B, S, D].

        Returns:
          The output [B, H', W', C_i] and the skip tensors for the up path, one
          per resnet plus the down-sampled output.
        """
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        cross = _DOWN_BLOCKS[cfg.down_block_types[i]]
        skips = []
        for j in range(cfg.layers_per_block):
            x = self.resnet(out, f"resnets_{j}")(x, temb)
            if cross:
                x = self.transformer(out, cfg.num_heads[i], f"attentions_{j}")(x, context)
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(
                out,
                padding=cfg.downsample_padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """diffusers ``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet at the coarsest level."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: TimeEmbedding, context: jax.Array) -> jax.Array:
        """Args: x [B, H, W, C]; temb [B, T] (see :data:`TimeEmbedding`); context [B, S, D].
        Returns [B, H, W, C]."""
        cfg = self.config
        c = cfg.block_out_channels[-1]
        x = self.resnet(c, "resnets_0")(x, temb)
        x = self.transformer(c, cfg.num_heads[-1], "attentions_0")(x, context)
        return self.resnet(c, "resnets_1")(x, temb)


class UpBlock(_Block):
    """diffusers ``CrossAttnUpBlock2D`` / ``UpBlock2D`` at up level ``index`` (0 = coarsest).

    ``layers_per_block + 1`` x (concat a skip, resnet [, transformer]), then a
    nearest x2 ``upsamplers_0`` except at the last level.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: TimeEmbedding,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Args:
          x: [B, H, W, C].
          skips: the skip tensors of this level, consumed last first.
          temb: [B, T] (see :data:`TimeEmbedding`); context: [B, S, D].
          upsample_size: spatial size after up-sampling (the next skip's size).

        Returns:
          [B, H', W', C_i].
        """
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        out = cfg.block_out_channels[n - 1 - i]
        heads = cfg.num_heads[n - 1 - i]
        cross = _UP_BLOCKS[cfg.up_block_types[i]]
        for j, skip in enumerate(reversed(skips)):
            # Skips from before the first cross-attention may still have a shared
            # sample's batch (see UNet2DConditionModel).
            skip = tile_batch(skip.astype(x.dtype), x.shape[0])
            x = self.resnet(out, f"resnets_{j}")(x, temb, skip)
            if cross:
                x = self.transformer(out, heads, f"attentions_{j}")(x, context)
        if i < n - 1:
            x = Upsample2D(
                out, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0"
            )(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """Conditional UNet ``eps_theta(x_t, t, c)`` (diffusers ``UNet2DConditionModel``), NHWC.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); GroupNorm statistics stay fp32.
      param_dtype: params' storage dtype.
      remat: wrap every resnet and spatial transformer in ``nn.remat`` to trade
        compute for activation memory in training; params are unchanged.
      attention_fn: the attention hook of :mod:`jaxdiff.models.attention`,
        passed to every attention layer.
      temb_in_norm: where the resnets add the time embedding (see
        :class:`~jaxdiff.models.layers.ResnetBlock2D`; the same result either way).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_fn: AttentionFn | None = None
    temb_in_norm: bool | None = None

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Predict the model output (noise or v) for noisy latents.

        Args:
          sample: x_t, [B, H, W, in_channels]. H and W need not be multiples of
            ``config.downsample_factor`` (the up path resizes to the skips).
          timesteps: t, a scalar or [B] (or [1]), integer or fractional.
          encoder_hidden_states: c, [B, L, cross_attention_dim], or [k B, L, ...]
            for a sample shared by k contexts: the output is then the same as
            for the tiled sample [x; x; ...] (k times, with its timesteps), i.e.
            classifier-free guidance's [uncond; cond] batch for k = 2, but the
            layers before the first cross-attention (``conv_in``, the first
            resnets and self-attention) run once, at batch B.
          train: enable dropout (needs an rng named ``"dropout"`` when
            ``config.dropout > 0``).

        Returns:
          [B, H, W, out_channels] (the context's batch) in ``dtype``.
        """
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet: sample must be NHWC [B, H, W, {cfg.in_channels}], got shape {sample.shape}"
            )
        b = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != (
            cfg.cross_attention_dim
        ):
            raise ValueError(
                f"UNet: encoder_hidden_states must be [B, L, {cfg.cross_attention_dim}], "
                f"got shape {encoder_hidden_states.shape}"
            )
        n_ctx = encoder_hidden_states.shape[0]
        if b == 0 or n_ctx % b:
            raise ValueError(
                f"UNet: batch of encoder_hidden_states ({n_ctx}) must equal the sample's "
                f"({b}) or be a multiple of it (a sample shared by several contexts)"
            )
        t = jnp.asarray(timesteps)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"UNet: timesteps must be a scalar, [1] or [{b}], got {t.shape}")
        t = jnp.broadcast_to(t, (b,))

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(
            config=cfg,
            remat=self.remat,
            deterministic=not train,
            attention_fn=self.attention_fn,
            temb_in_norm=self.temb_in_norm,
            **kw,
        )
        context = encoder_hidden_states.astype(self.dtype)

        # Timestep embedding: sinusoidal features of t (fp32), then an MLP.
        c0 = cfg.block_out_channels[0]
        t_feat = timestep_embedding(
            t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(
            t_feat.astype(self.dtype)
        )
        if self.has_variable(MERGED, "time_emb_kernel"):
            # Every resnet's projection in one product (see merged_weights).
            joined = {
                "kernel": self.get_variable(MERGED, "time_emb_kernel"),
                "bias": self.get_variable(MERGED, "time_emb_bias"),
            }
            resnets = _resnets(cfg)
            if joined["kernel"].shape != (cfg.time_embed_dim, sum(c for _, c in resnets)):
                raise ValueError(
                    f"UNet: merged time-embedding kernel {joined['kernel'].shape} does not "
                    "fit the config"
                )
            proj = dense(joined, nn.silu(temb.astype(self.dtype)), self.dtype)
            ends = np.cumsum([c for _, c in resnets])
            temb = {
                path: proj[:, end - c : end] for (path, c), end in zip(resnets, ends, strict=True)
            }
            if b * sample.shape[1] * sample.shape[2] >= _TEMB_APART_POSITIONS:
                n = len(cfg.block_out_channels)
                top = ("down_blocks_0/", f"up_blocks_{n - 1}/")  # the full-resolution level
                apart = {path: e for path, e in temb.items() if path.startswith(top)}
                temb.update(jax.lax.optimization_barrier(apart))

        x = conv3x3(c0, name="conv_in", **kw)(sample.astype(self.dtype))
        skips: list[jax.Array] = [x]
        for i in range(len(cfg.block_out_channels)):
            x, s = DownBlock(index=i, name=f"down_blocks_{i}", **blk)(x, temb, context)
            skips.extend(s)

        # ControlNet hook (Zhang et al. 2023; not built): a ControlNet returns one
        # residual per entry of `skips` (same shapes) and one for the mid-block
        # output. They are added here, `skips[k] += down_residuals[k]`, and right
        # after the mid block, `x += mid_residual` (diffusers'
        # down_block_additional_residuals / mid_block_additional_residual).
        x = MidBlock(name="mid_block", **blk)(x, temb, context)

        n_res = cfg.layers_per_block + 1
        n = len(cfg.block_out_channels)
        for i in range(n):
            res, skips = skips[-n_res:], skips[:-n_res]
            # Up-sample to the next skip's size: exactly 2x when H, W are multiples of
            # the down-sampling factor, the odd size otherwise (diffusers' upsample_size).
            size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x = UpBlock(index=i, name=f"up_blocks_{i}", **blk)(x, res, temb, context, size)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        # The mid block always reads the context: x has the context's batch by now.
        return conv3x3(cfg.out_channels, name="conv_out", **kw)(nn.silu(x))


def _init_inputs(config: UNetConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The smallest inputs that build every param (params do not depend on H, W or L)."""
    s = config.downsample_factor
    return (
        jnp.zeros((1, s, s, config.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32),
    )


def _init_fn(config: UNetConfig, param_dtype: Dtype):
    model = UNet2DConditionModel(config, param_dtype=param_dtype)
    return lambda rng: model.init({"params": rng}, *_init_inputs(config))["params"]


def init_unet(config: UNetConfig, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> dict:
    """Randomly initialised UNet params, built inside one ``jax.jit``.

    Args:
      config: the architecture.
      rng: a PRNG key.
      param_dtype: storage dtype of the params (the compute dtype is chosen
        when applying, by ``UNet2DConditionModel(config, dtype=...)``).

    Returns:
      The params pytree (nested dict of arrays).
    """
    return jax.jit(_init_fn(config, param_dtype))(rng)


def unet_abstract_params(config: UNetConfig, *, param_dtype: Dtype = jnp.float32) -> dict:
    """Param shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) without allocating anything.

    The target tree for :func:`jaxdiff.weights.common.state_dict_to_params` and
    the input for deriving shardings before a sharded init.
    """
    return jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))
