"""Whole Stable Diffusion models: diffusers-format directories and single files.

``load_pretrained(dir)`` reads ``model_index.json``, each component's
``config.json`` and weights, and converts them to a params dict
``{"unet", "vae", "text_encoder"}`` checked key by key and shape by shape
against ``jax.eval_shape`` of our modules. ``save_pretrained`` writes the
inverse, which both ``load_pretrained`` and diffusers' PyTorch
``StableDiffusionPipeline.from_pretrained`` read. ``load_single_file`` reads an
original-layout checkpoint given the model configs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdiff.models.autoencoder import AutoencoderConfig
from jaxdiff.models.clip import CLIPTextConfig, canonical_clip_state_dict
from jaxdiff.models.sd import SDConfig, abstract_params
from jaxdiff.models.unet import UNetConfig
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights import files, original
from jaxdiff.weights.common import params_to_state_dict, state_dict_to_params

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
_IGNORE = {"text_encoder": [r"(^|\.)position_ids$"]}


def load_config(path: str | os.PathLike) -> SDConfig:
    """Read the four component configs of a diffusers-format directory."""
    root = Path(path)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a diffusers-format model directory (no model_index.json)"
        )
    index = json.loads((root / "model_index.json").read_text())
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ValueError(
            f"{root}: pipeline class {cls!r} is not supported; valid: {PIPELINE_CLASSES}"
        )
    missing = [
        c
        for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        if not (root / c).is_dir()
    ]
    if missing:
        raise FileNotFoundError(f"{root}: missing component directories {missing}")
    return SDConfig(
        unet=UNetConfig.from_diffusers(files.read_config(root / "unet")),
        vae=AutoencoderConfig.from_diffusers(files.read_config(root / "vae")),
        text_encoder=CLIPTextConfig.from_transformers(files.read_config(root / "text_encoder")),
        scheduler=SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
    )


def _to_params(name: str, state_dict: dict, abstract: Any, dtype: Any) -> dict:
    if name == "text_encoder":
        state_dict = canonical_clip_state_dict(state_dict)
    return state_dict_to_params(
        state_dict, abstract, what=name, ignore=_IGNORE.get(name, ()), dtype=dtype
    )


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[SDConfig, dict]:
    """Load a diffusers-format Stable Diffusion directory.

    Args:
      path: directory with ``model_index.json``, ``unet/``, ``vae/``,
        ``text_encoder/``, ``tokenizer/`` and ``scheduler/``.
      dtype: storage dtype of the returned params (numpy arrays).
      variant: weights variant, e.g. ``"fp16"``.
      allow_pickle: permit legacy ``.bin`` weights (``torch.load(weights_only=True)``).

    Returns:
      ``(config, params)``; params is ``{"unet", "vae", "text_encoder"}`` of numpy arrays.

    Raises:
      WeightsMismatchError: a component's weights do not match its config (all
        missing, unexpected and mis-shaped keys are listed).
    """
    root = Path(path)
    config = load_config(root)
    abstract = abstract_params(config)
    params = {}
    for name in ("unet", "vae", "text_encoder"):
        sd = files.read_state_dict(root / name, variant=variant, allow_pickle=allow_pickle)
        params[name] = _to_params(name, sd, abstract[name], dtype)
    return config, params


def save_pretrained(
    path: str | os.PathLike,
    config: SDConfig,
    params: dict,
    tokenizer_dir: str | os.PathLike,
    *,
    sampler: str | None = None,
) -> Path:
    """Write a diffusers-format directory (fp32 safetensors) that diffusers also loads.

    Args:
      path: output directory (created; existing component folders are replaced).
      config: the model configs.
      params: ``{"unet", "vae", "text_encoder"}``.
      tokenizer_dir: a CLIP tokenizer directory to copy into ``tokenizer/``.
      sampler: scheduler class to record (default: the config's own).

    Returns:
      The output directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    host = jax.device_get(params)

    def f32(sd):
        return {k: np.asarray(v, np.float32) for k, v in sd.items()}

    unet_cfg = {"_class_name": "UNet2DConditionModel", **config.unet.to_diffusers()}
    files.write_component(root / "unet", f32(params_to_state_dict(host["unet"])), unet_cfg)
    files.write_component(
        root / "vae", f32(params_to_state_dict(host["vae"])), config.vae.to_diffusers()
    )
    files.write_component(
        root / "text_encoder",
        f32(params_to_state_dict(host["text_encoder"])),
        config.text_encoder.to_transformers(),
        weights_name="model.safetensors",
    )
    tok_out = root / "tokenizer"
    if tok_out.exists():
        shutil.rmtree(tok_out)
    shutil.copytree(tokenizer_dir, tok_out)
    (root / "scheduler").mkdir(exist_ok=True)
    sched = config.scheduler.to_dict(sampler)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    inpaint = config.unet.in_channels == 2 * config.vae.latent_channels + 1
    index = {
        "_class_name": PIPELINE_CLASSES[1] if inpaint else PIPELINE_CLASSES[0],
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def load_single_file(
    path: str | os.PathLike,
    config: SDConfig,
    *,
    dtype: Any = np.float32,
    allow_pickle: bool = False,
) -> dict:
    """Load an original-layout (CompVis / Stability) single-file checkpoint.

    The file carries no configs, so ``config`` says what the networks are
    (e.g. ``load_config`` of a diffusers directory of the same family).

    Args:
      path: a ``.safetensors`` file (or ``.ckpt`` with ``allow_pickle=True``).
      config: the model configs.
      dtype: storage dtype of the returned params.
      allow_pickle: permit a pickled ``.ckpt`` (``torch.load(weights_only=True)``).

    Returns:
      ``{"unet", "vae", "text_encoder"}`` params.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = files.safetensors_io.load_file(path)
    elif allow_pickle:
        sd = files._torch_load(path)
    else:
        raise ValueError(
            f"{path} is not a .safetensors file; a pickled checkpoint can run code: "
            "pass allow_pickle=True to load it with torch.load(weights_only=True)"
        )
    abstract = abstract_params(config)
    flat_names = {n: params_to_state_dict(_zeros_like(abstract[n])) for n in ("unet", "vae")}
    unet, vae, text, _ = original.from_original(
        sd,
        unet_keys=flat_names["unet"],
        vae_keys=flat_names["vae"],
        unet_config=config.unet,
        vae_config=config.vae,
        text_num_layers=config.text_encoder.num_hidden_layers,
    )
    return {
        "unet": _to_params("unet", unet, abstract["unet"], dtype),
        "vae": _to_params("vae", vae, abstract["vae"], dtype),
        "text_encoder": _to_params("text_encoder", text, abstract["text_encoder"], dtype),
    }


def _zeros_like(abstract: Any) -> Any:
    # Zero-size stand-ins: only the key names are needed, not the values.
    return jax.tree.map(lambda a: np.zeros((0,) * len(a.shape), np.float32), abstract)
