"""The original (CompVis / Stability ``ldm``) single-file checkpoint layout.

Single-file Stable Diffusion checkpoints (``v1-5-pruned-emaonly.safetensors``,
``v2-1_768-ema-pruned.safetensors``) keep all three networks in one state dict
under the prefixes ``model.diffusion_model.`` (UNet), ``first_stage_model.``
(VAE) and ``cond_stage_model.`` (text encoder), with the module names of the
original ``ldm`` code. This module renames keys between that layout and the
diffusers layout explicitly, from the model configs:

- UNet: ``input_blocks``/``middle_block``/``output_blocks`` are flat lists whose
  positions follow from ``layers_per_block`` and which blocks have attention;
  resnets use ``in_layers``/``emb_layers``/``out_layers``/``skip_connection``.
- VAE: ``down.i.block.j`` / ``up.i.block.j`` with the decoder's up blocks in
  reverse order; the mid-block attention is 1x1 convolutions ``q, k, v,
  proj_out`` where diffusers has linear layers.
- Text encoder: SD 1.x embeds the transformers CLIP names under
  ``cond_stage_model.transformer.``; SD 2.x stores the OpenCLIP model under
  ``cond_stage_model.model.`` with fused ``in_proj`` attention weights and 24
  layers, of which SD 2.x uses the first 23.

Keys outside those three prefixes (EMA copies, noise-schedule buffers) are not
model parameters and are dropped by name; any other key under the prefixes
that the mapping does not produce is reported as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from jaxdiff.weights.common import WeightsMismatchError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_HF_PREFIX = "cond_stage_model.transformer."
CLIP_OPENCLIP_PREFIX = "cond_stage_model.model."

# Top-level keys of original checkpoints that are not network weights.
NON_MODEL_KEYS = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus|"
    r"posterior_|model_ema$|logvar$|lvlb_weights$)"
)

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _has_attn(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_prefixes(config) -> list[tuple[str, str, Mapping[str, str]]]:
    """(diffusers prefix, original prefix, inner renames) for every UNet submodule."""
    n = len(config.block_out_channels)
    per = config.layers_per_block
    out: list[tuple[str, str, Mapping[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i, kind in enumerate(config.down_block_types):
        for j in range(per):
            slot = 1 + i * (per + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0.", _UNET_RESNET))
            if _has_attn(kind):
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{slot}.1.", {}))
        if i < n - 1:
            slot = 1 + i * (per + 1) + per
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{slot}.0.op.", {}))
    for i, kind in enumerate(config.up_block_types):
        for j in range(per + 1):
            slot = i * (per + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot}.0.", _UNET_RESNET))
            if _has_attn(kind):
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{slot}.1.", {}))
        if i < n - 1:
            slot = i * (per + 1) + per
            pos = 2 if _has_attn(kind) else 1
            out.append(
                (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{slot}.{pos}.conv.", {})
            )
    return out


def vae_prefixes(config) -> list[tuple[str, str, Mapping[str, str]]]:
    """(diffusers prefix, original prefix, inner renames) for every VAE submodule."""
    n = len(config.block_out_channels)
    per = config.layers_per_block
    out: list[tuple[str, str, Mapping[str, str]]] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        out += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN),
        ]
    for i in range(n):
        for j in range(per):
            out.append(
                (
                    f"encoder.down_blocks.{i}.resnets.{j}.",
                    f"encoder.down.{i}.block.{j}.",
                    _VAE_RESNET,
                )
            )
        if i < n - 1:
            out.append(
                (
                    f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                    f"encoder.down.{i}.downsample.conv.",
                    {},
                )
            )
        k = n - 1 - i  # the original decoder counts its up blocks from the bottom
        for j in range(per + 1):
            out.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{k}.block.{j}.", _VAE_RESNET)
            )
        if i < n - 1:
            out.append(
                (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{k}.upsample.conv.", {})
            )
    return out


def _rename(key: str, prefixes, what: str) -> str:
    for new, old, inner in prefixes:
        if key.startswith(new):
            return old + _rename_inner(key[len(new) :], inner)
    raise KeyError(f"{what}: no original-layout name for {key!r}")


def _vae_attn_to_original(key: str, value: np.ndarray) -> np.ndarray:
    # diffusers' linear q/k/v/proj_out [C, C] are the original's 1x1 convs [C, C, 1, 1].
    if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _vae_attn_from_original(key: str, value: np.ndarray) -> np.ndarray:
    if ".mid_block.attentions.0." in key and key.endswith(".weight") and value.ndim == 4:
        return value[:, :, 0, 0]
    return value


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _clip_to_openclip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            layer, name, leaf = m.groups()
            base = f"transformer.resblocks.{layer}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((base, leaf), {})[name[10]] = value
            elif name in _OPENCLIP_LAYER:
                out[base + _OPENCLIP_LAYER[name] + "." + leaf] = value
            else:
                raise KeyError(f"text encoder: no OpenCLIP name for {key!r}")
        else:
            raise KeyError(f"text encoder: no OpenCLIP name for {key!r}")
    for (base, leaf), parts in qkv.items():
        out[f"{base}attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def _clip_from_openclip(sd: Mapping[str, np.ndarray], num_layers: int):
    """Returns (transformers-named state dict, unexpected keys)."""
    inverse = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.rsplit(".", 1)[1]] = value
        elif key in ("text_projection", "logit_scale"):
            continue  # CLIP's contrastive head: SD conditions on hidden states only
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            layer, leaf = int(m.group(1)), m.group(2)
            if layer < num_layers:  # SD 2.x uses the penultimate layer; deeper ones are unused
                base = f"text_model.encoder.layers.{layer}.self_attn."
                for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                    out[f"{base}{part}_proj.{leaf}"] = chunk
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            layer, name, leaf = int(m.group(1)), m.group(2), m.group(3)
            if layer >= num_layers:
                continue
            if name in inverse:
                out[f"text_model.encoder.layers.{layer}.{inverse[name]}.{leaf}"] = value
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    return out, unexpected


def to_original(
    unet: Mapping[str, np.ndarray],
    vae: Mapping[str, np.ndarray],
    text_encoder: Mapping[str, np.ndarray],
    *,
    unet_config,
    vae_config,
    text_encoder_format: str = "hf",
) -> dict[str, np.ndarray]:
    """Merge three diffusers-named state dicts into one original-layout state dict.

    Args:
      unet, vae, text_encoder: PyTorch-named numpy state dicts (diffusers /
        transformers names).
      unet_config, vae_config: the models' configs (block counts drive the names).
      text_encoder_format: ``"hf"`` (SD 1.x) or ``"openclip"`` (SD 2.x).
    """
    out: dict[str, np.ndarray] = {}
    up, vp = unet_prefixes(unet_config), vae_prefixes(vae_config)
    for key, value in unet.items():
        out[UNET_PREFIX + _rename(key, up, "unet")] = value
    for key, value in vae.items():
        new = _rename(key, vp, "vae")
        out[VAE_PREFIX + new] = _vae_attn_to_original(new, value)
    if text_encoder_format == "hf":
        out.update({CLIP_HF_PREFIX + k: v for k, v in text_encoder.items()})
    elif text_encoder_format == "openclip":
        out.update(
            {CLIP_OPENCLIP_PREFIX + k: v for k, v in _clip_to_openclip(text_encoder).items()}
        )
    else:
        raise ValueError(
            f"text_encoder_format must be 'hf' or 'openclip', got {text_encoder_format!r}"
        )
    return out


def from_original(
    state_dict: Mapping[str, np.ndarray],
    *,
    unet_keys: Iterable[str],
    vae_keys: Iterable[str],
    unet_config,
    vae_config,
    text_num_layers: int,
) -> tuple[dict, dict, dict, str]:
    """Split an original-layout checkpoint into diffusers-named state dicts.

    Args:
      state_dict: the single-file checkpoint as numpy arrays.
      unet_keys, vae_keys: the diffusers keys the target models expect (from
        their abstract params), used to build the exact inverse renaming.
      unet_config, vae_config: the target models' configs.
      text_num_layers: transformer layers of the target text encoder (SD 2.x
        checkpoints store 24 and use 23).

    Returns:
      ``(unet, vae, text_encoder, text_encoder_format)``; the text encoder dict
      uses transformers' CLIPTextModel names.

    Raises:
      WeightsMismatchError: keys under the model prefixes that map to nothing.
    """
    up, vp = unet_prefixes(unet_config), vae_prefixes(vae_config)
    unet_map = {_rename(k, up, "unet"): k for k in unet_keys}
    vae_map = {_rename(k, vp, "vae"): k for k in vae_keys}
    unet, vae, clip_hf, clip_oc = {}, {}, {}, {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            name = unet_map.get(key[len(UNET_PREFIX) :])
            if name is None:
                unexpected.append(key)
            else:
                unet[name] = value
        elif key.startswith(VAE_PREFIX):
            name = vae_map.get(key[len(VAE_PREFIX) :])
            if name is None:
                unexpected.append(key)
            else:
                vae[name] = _vae_attn_from_original(name, value)
        elif key.startswith(CLIP_HF_PREFIX):
            rest = key[len(CLIP_HF_PREFIX) :]
            # Very old SD 1.x files omit the ``text_model.`` level.
            clip_hf[rest if rest.startswith("text_model.") else "text_model." + rest] = value
        elif key.startswith(CLIP_OPENCLIP_PREFIX):
            clip_oc[key[len(CLIP_OPENCLIP_PREFIX) :]] = value
        elif NON_MODEL_KEYS.match(key):
            continue
        else:
            unexpected.append(key)
    if clip_hf and clip_oc:
        raise ValueError("checkpoint holds both a transformers CLIP and an OpenCLIP text encoder")
    if clip_oc:
        text, bad = _clip_from_openclip(clip_oc, text_num_layers)
        unexpected += [CLIP_OPENCLIP_PREFIX + k for k in bad]
        fmt = "openclip"
    else:
        text, fmt = clip_hf, "hf"
    if unexpected:
        raise WeightsMismatchError("single-file checkpoint", unexpected=unexpected)
    return unet, vae, text, fmt


def apply_to_values(sd: Mapping[str, np.ndarray], fn: Callable[[np.ndarray], np.ndarray]):
    """Map ``fn`` over a state dict's values (e.g. a dtype cast)."""
    return {k: fn(v) for k, v in sd.items()}
