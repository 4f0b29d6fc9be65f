"""Stable Diffusion text-to-image, image-to-image and inpainting.

``StableDiffusion`` is a thin object holding configs, params and a tokenizer;
all the work happens in one pure function, :func:`generate`, made of three
(:func:`encode_conditions`, :func:`denoise`, :func:`decode_images`) that the
pipeline compiles as separate programs, at the same time. Each is jitted with the
shapes, sampler and step count static and everything a user changes between
calls (prompts, guidance scale, strength, eta, seeds) traced, so changing
those never recompiles. The batch is sharded over every local device with
``jax.jit`` + ``NamedSharding``; a batch that does not divide by the device
count is padded (:func:`batch_padding`) and the padding dropped. The UNet's
guidance batch [uncond; cond] is split over the devices on its own, so one
image on two devices runs one half of the pair on each, and a batch smaller
than the device count decodes split by rows.

Semantics follow diffusers' ``StableDiffusionPipeline``,
``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline``:
same prompt encoding (pad to ``model_max_length``, last hidden state), same
guidance (none when ``guidance_scale <= 1``), same ``strength`` rule, same
latent-mask blending for 4-channel UNets and masked-image conditioning for
9-channel inpainting UNets.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import layouts, samplers
from jaxdiff.denoisers import classifier_free_guidance, guidance_context
from jaxdiff.models.attention import cross_attention_kv
from jaxdiff.models.autoencoder import scale_latents, vae_encode
from jaxdiff.models.sd import SDConfig, apply_unet, decode_latents, encode_text
from jaxdiff.models.unet import merged_weights
from jaxdiff.weights import pretrained

MODES = ("text_to_image", "image_to_image", "inpaint")
# Cross-attention keys and values computed once per call, outside the sampling loop
# (XLA leaves loop-invariant matmuls inside a while loop: on the GPU, SD 1.5's 16 context
# projections ran every step as one merged GEMM [1232, 768] x [768, 24960] with a copy
# of the concatenated weights and 44 slices, transposes and pads after it). An
# experiment switch (benchmarks/gpu.py's "no_cross_kv").
_PRECOMPUTE_CROSS_KV = True
# The UNet's joined weights (self-attention q/k/v, the resnets' time-embedding
# projections) built once per call: XLA:GPU's dot merger concatenated them in every
# step (13 concatenations, ~0.1 GB of copies, per step of SD 1.5). An experiment
# switch (benchmarks/gpu.py's "invariants_in_loop").
_MERGE_WEIGHTS = True
# The normalisation layers' params kept in float32 by a half-precision pipeline (see
# inference_param_dtype). An experiment switch (gpu.py's "invariants_in_loop").
_FP32_NORM_PARAMS = True
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    """The static part of a generation call (hashable: the jit cache key).

    Attributes:
      config: the model configs.
      mode: one of MODES.
      sampler, steps, schedule: the sampling plan (``samplers.make_plan``).
      latent_hw: (h, w) of the latents.
      dtype: compute dtype of the networks.
      progress: tick a progress bar per step.
      mesh: the 1-D ``("data",)`` mesh the batch runs on, or None (no constraints).
    """

    config: SDConfig
    mode: str
    sampler: str
    steps: int
    schedule: str | None
    latent_hw: tuple[int, int]
    dtype: Any = jnp.float32
    progress: bool = False
    mesh: Mesh | None = None

    @functools.cached_property
    def plan(self) -> samplers.SamplerPlan:
        return samplers.make_plan(self.sampler, self.steps, self.config.scheduler, self.schedule)


def _per_example_normal(keys: jax.Array, salt: int, shape: tuple[int, ...]) -> jax.Array:
    """One standard normal draw per example from its own key: batch-independent noise."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape))(keys)


def _encode_image_latents(params, image, keys, config: SDConfig, dtype, salt: int):
    """VAE posterior sample (diffusers' ``retrieve_latents(..., "sample")``), scaled."""
    posterior = vae_encode(params["vae"], image, config.vae, dtype)
    eps = _per_example_normal(keys, salt, posterior.mean.shape[1:])
    return scale_latents(posterior.mean + posterior.std * eps, config.vae)


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """Pixel mask [B, H, W] -> latent mask [B, H/f, W/f, 1], binarised at 0.5.

    diffusers binarises the mask (``>= 0.5``) and resizes it with PyTorch's
    default nearest interpolation, which for an integer factor picks pixel
    ``(f*i, f*j)``.
    """
    binary = (mask >= 0.5).astype(jnp.float32)
    return binary[:, ::factor, ::factor, None]


def encode_conditions(
    params: dict, inputs: dict, *, config: SDConfig, mode: str, dtype: Any, mesh: Mesh | None
) -> dict[str, jax.Array]:
    """The first part of :func:`generate`: the prompts (and images) encoded.

    Args:
      params: ``{"text_encoder"}``, and ``"vae"`` for image_to_image / inpaint.
      inputs: as :func:`generate`'s (``input_ids``, ``negative_ids``; ``keys``,
        ``image`` and ``mask`` for the image modes).
      config, mode, dtype, mesh: as :class:`GenerateSpec`'s.

    Returns:
      ``{"uncond", "cond"}`` text embeddings [B, L, D]; for the image modes
      ``"image_latents"`` (a VAE posterior sample, scaled), and for 9-channel
      inpainting UNets ``"masked_latents"`` (of the image outside the mask).
    """
    # Negative and positive prompts in one [2B, L] call, laid out like the UNet's
    # guidance batch in denoise(), so it shards the same way.
    ids = _split_over_mesh(
        jnp.concatenate([inputs["negative_ids"], inputs["input_ids"]], axis=0), mesh, 0
    )
    uncond, cond = jnp.split(encode_text(params["text_encoder"], ids, config, dtype), 2, axis=0)
    out = {"uncond": uncond, "cond": cond}
    if mode in ("image_to_image", "inpaint"):
        image, keys = inputs["image"].astype(jnp.float32), inputs["keys"]
        out["image_latents"] = _encode_image_latents(params, image, keys, config, dtype, salt=1)
        if mode == "inpaint" and _masked_image_unet(config):
            keep = (inputs["mask"] < 0.5).astype(jnp.float32)[..., None]
            out["masked_latents"] = _encode_image_latents(
                params, image * keep, keys, config, dtype, salt=2
            )
    return out


def _masked_image_unet(config: SDConfig) -> bool:
    """A 9-channel inpainting UNet: [latents, mask, masked-image latents] in."""
    return config.unet.in_channels == 2 * config.vae.latent_channels + 1


def denoise(params: dict, conditions: dict, inputs: dict, spec: GenerateSpec) -> jax.Array:
    """The second part of :func:`generate`: the sampling loop, from the start noise
    (or the noised image latents) to the final latents.

    Args:
      params: ``{"unet"}``.
      conditions: :func:`encode_conditions`' result.
      inputs: as :func:`generate`'s.
      spec: the static choices.

    Returns:
      float32 latents [B, h, w, C] (scaled, as the UNet sees them).
    """
    cfg, dtype, plan = spec.config, spec.dtype, spec.plan
    keys = inputs["keys"]
    noise = inputs["noise"].astype(jnp.float32)
    uncond, cond = conditions["uncond"], conditions["cond"]

    extra = None  # 9-channel inpainting: [mask, masked-image latents] beside x
    start = 0
    step_hook = None
    x_init = samplers.initial_latents(plan, noise)
    if spec.mode in ("image_to_image", "inpaint"):
        strength = inputs["strength"]
        start = inputs["start_index"]
        image_latents = conditions["image_latents"]
        noised = samplers.noise_latents(plan, image_latents, noise, start)
        if spec.mode == "image_to_image":
            x_init = noised
        else:
            # diffusers: strength 1 starts from pure noise, below 1 from the noised image.
            x_init = jnp.where(strength >= 1.0, x_init, noised)
            mask = latent_mask(inputs["mask"].astype(jnp.float32), cfg.latent_factor)
            if _masked_image_unet(cfg):
                extra = jnp.concatenate([mask, conditions["masked_latents"]], axis=-1)
            else:

                def step_hook(x, next_index):
                    # Re-impose the known region at the next step's noise level.
                    known = samplers.noise_latents(plan, image_latents, noise, next_index)
                    return (1.0 - mask) * known + mask * x

    # On one device the UNet gets each latent once with both contexts and runs its
    # layers before the first cross-attention once (same numbers; UNet b2 of the CPU
    # benchmark -4 %). Over a mesh the guidance batch [uncond; cond] is 2B: split over
    # the devices even when B alone does not divide (one image on two devices: one
    # half each).
    shared = spec.mesh is None or spec.mesh.devices.size == 1
    # The cross-attentions' keys and values of the guidance batch's context, once for
    # all steps.
    cross_kv = None
    if _PRECOMPUTE_CROSS_KV:
        cross_kv = cross_attention_kv(params["unet"], guidance_context(cond, uncond), dtype)
        cross_kv = jax.tree.map(lambda a: _split_over_mesh(a, spec.mesh, 0), cross_kv)
    merged = merged_weights(params["unet"], cfg.unet) if _MERGE_WEIGHTS else None

    def net_fn(x, t, context):
        if extra is not None:
            x = jnp.concatenate([x, extra if shared else jnp.concatenate([extra, extra])], -1)
        x, context = (_split_over_mesh(a, spec.mesh, 0) for a in (x, context))
        return apply_unet(
            params["unet"], x, t, context, cfg, dtype, cross_kv=cross_kv, merged=merged
        )

    # diffusers runs no guidance when guidance_scale <= 1: the result is the conditional
    # prediction, which is what w = 1 gives.
    w = jnp.asarray(inputs["guidance_scale"], jnp.float32)
    model_fn = classifier_free_guidance(
        net_fn,
        cond,
        uncond,
        jnp.where(w > 1.0, w, 1.0),
        inputs["guidance_rescale"],
        shared_sample=shared,
    )
    return samplers.sample(
        model_fn,
        x_init,
        plan,
        rng=keys,
        eta=inputs["eta"],
        start_index=start,
        step_hook=step_hook,
        progress=spec.progress,
    )


def inference_params(params: Any, dtype: Any) -> Any:
    """``params`` as numpy arrays in ``dtype``, except the normalisation layers' scales
    and biases (see :func:`inference_param_dtype`), kept in float32."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(a).astype(inference_param_dtype(path, dtype)), params
    )


def inference_param_dtype(path: tuple, dtype: Any) -> Any:
    """The dtype the pipeline keeps the param at ``path`` (a key path) in: float32 for
    any under a "norm" module (GroupNorm, LayerNorm), ``dtype`` for the rest.

    The norms compute in fp32 whatever the dtype, so half-precision copies of their
    params were converted back in every call, and inside a sampler's loop in every
    step (16 conversion kernels per step of SD 1.5 on the GPU); in fp32 they are also
    the exact values. They are ~0.05 % of SD 1.5's UNet in bf16 (200k of 860M params).
    """
    names = [str(getattr(k, "key", k)) for k in path]
    norm = _FP32_NORM_PARAMS and any("norm" in name for name in names[:-1])
    return np.float32 if norm else dtype


def decode_images(
    params: dict, latents: jax.Array, *, config: SDConfig, dtype: Any, mesh: Mesh | None
) -> jax.Array:
    """The last part of :func:`generate`: latents [B, h, w, C] -> uint8 images
    [B, H, W, 3] through the VAE decoder (``params``: ``{"vae"}``)."""
    if mesh is not None and latents.shape[0] % mesh.devices.size:
        # Fewer images than devices: split the decoder's rows instead (XLA exchanges
        # the convolutions' halo rows), rather than every device decoding every image.
        latents = _split_over_mesh(latents, mesh, 1)
    images = decode_latents(params["vae"], latents, config, dtype)
    images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8)


def generate(params: dict, inputs: dict, spec: GenerateSpec) -> jax.Array:
    """Sample images: the pure function behind every pipeline call, as one program
    (:func:`encode_conditions`, then :func:`denoise`, then :func:`decode_images`;
    the pipeline compiles the three as separate programs by default, see
    :class:`StableDiffusion`'s ``split_programs``).

    Args:
      params: ``{"unet", "vae", "text_encoder"}``.
      inputs: arrays, batch B first:
        ``input_ids``, ``negative_ids`` [B, L] int32; ``keys`` [B] PRNG keys;
        ``noise`` [B, h, w, C] start noise; ``guidance_scale``, ``guidance_rescale``,
        ``eta``, ``strength`` scalars; ``start_index`` int32 scalar (first step, from
        ``samplers.start_index_for_strength``); for image_to_image / inpaint ``image``
        [B, H, W, 3] in [-1, 1]; for inpaint ``mask`` [B, H, W] (1 = repaint).
      spec: the static choices.

    Returns:
      uint8 images [B, H, W, 3].
    """
    statics = {"config": spec.config, "dtype": spec.dtype, "mesh": spec.mesh}
    conditions = encode_conditions(params, inputs, mode=spec.mode, **statics)
    latents = denoise(params, conditions, inputs, spec)
    return decode_images(params, latents, **statics)


_generate_jit = jax.jit(generate, static_argnames=("spec",))

# XLA compiler options for generate() per backend (jax.default_backend()), used when a
# pipeline is built with compiler_options=None. Empty until a GPU run measures one:
# benchmarks/gpu.py's t2i_cold_* experiments time the sampler's first compile with
# candidates such as {"xla_gpu_enable_llvm_module_compilation_parallelism": True}.
DEFAULT_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {}


def _check_compiler_options(options: Any) -> tuple[tuple[str, Any], ...]:
    """``options`` (a mapping of XLA option name -> bool / int / float / str) as a
    sorted, hashable tuple of items; a clear error for anything else."""
    if not isinstance(options, dict):
        raise ValueError(
            f"compiler_options must be a dict of XLA option name -> value; got {options!r}"
        )
    for name, value in options.items():
        if not isinstance(name, str) or not isinstance(value, bool | int | float | str):
            raise ValueError(
                "compiler_options must map option names (str) to bool, int, float or str "
                f"values; got {name!r}: {value!r}"
            )
    return tuple(sorted(options.items()))


@functools.cache
def _generate_jit_with(options: tuple[tuple[str, Any], ...]) -> Any:
    """generate() jitted with these XLA compiler options (the plain jit for none)."""
    if not options:
        return _generate_jit
    return jax.jit(generate, static_argnames=("spec",), compiler_options=dict(options))


# generate()'s three parts as the split pipeline compiles them (see StableDiffusion's
# split_programs): the inputs each one reads, and its jit.
_CONDITION_INPUTS = {
    "text_to_image": ("input_ids", "negative_ids"),
    "image_to_image": ("input_ids", "negative_ids", "keys", "image"),
    "inpaint": ("input_ids", "negative_ids", "keys", "image", "mask"),
}
_NOT_DENOISE_INPUTS = ("input_ids", "negative_ids", "image")
PARTS = ("condition", "denoise", "decode")


@functools.cache
def _part_jits(options: tuple[tuple[str, Any], ...], mesh: Mesh) -> dict[str, Any]:
    """encode_conditions / denoise / decode_images jitted for ``mesh`` with these XLA
    options. The first two return their results replicated, so that the next part
    can be lowered (its input shardings known) before this one has compiled."""
    replicated = NamedSharding(mesh, PartitionSpec())
    kw = {"compiler_options": dict(options)} if options else {}
    return {
        "condition": jax.jit(
            encode_conditions,
            static_argnames=("config", "mode", "dtype", "mesh"),
            out_shardings=replicated,
            **kw,
        ),
        "denoise": jax.jit(denoise, static_argnames=("spec",), out_shardings=replicated, **kw),
        "decode": jax.jit(decode_images, static_argnames=("config", "dtype", "mesh"), **kw),
    }


def _clear_program_caches() -> None:
    """Forget every traced and compiled generate() program of this module (tests that
    patch what the programs call use it to see them traced again). Pipelines keep
    the split programs they compiled; build a new one after this."""
    _generate_jit.clear_cache()
    _part_jits.cache_clear()
    for fn in (encode_conditions, denoise, decode_images):
        jax.jit(fn).clear_cache()  # evicts the function's traces, whichever jit made them


@dataclasses.dataclass(frozen=True)
class CompiledParts:
    """A call's three compiled programs (``split_programs=True``): ``condition``
    (prompts and images encoded), ``denoise`` (the sampling loop) and ``decode`` (the
    VAE decoder to uint8), each a ``jax.stages.Compiled``."""

    condition: jax.stages.Compiled
    denoise: jax.stages.Compiled
    decode: jax.stages.Compiled

    def as_text(self) -> str:
        """The three optimized programs' text, one after the other."""
        return "\n".join(f"// {name}\n{getattr(self, name).as_text()}" for name in PARTS)


def _avals(arrays: dict[str, jax.Array]) -> tuple:
    """Name, shape, dtype and sharding of each array: what a compiled program is keyed
    on besides its static choices."""
    return tuple((k, v.shape, v.dtype, v.sharding) for k, v in sorted(arrays.items()))


def _part_args(params: dict, spec: GenerateSpec, inputs: dict[str, Any]) -> dict[str, tuple]:
    """Each split program's (cache key, params, inputs) for a call: a part's key
    holds only what changes its program, so calls share the parts they can."""
    condition_params = {"text_encoder": params["text_encoder"]}
    if spec.mode != "text_to_image":
        condition_params["vae"] = params["vae"]  # its encoder
    condition_inputs = {k: inputs[k] for k in _CONDITION_INPUTS[spec.mode]}
    denoise_inputs = {k: v for k, v in inputs.items() if k not in _NOT_DENOISE_INPUTS}
    return {
        "condition": (
            ("condition", spec.mode, _avals(condition_inputs)),
            condition_params,
            condition_inputs,
        ),
        "denoise": (
            ("denoise", spec, _avals(denoise_inputs)),
            {"unet": params["unet"]},
            denoise_inputs,
        ),
        "decode": (("decode", inputs["noise"].shape), {"vae": params["vae"]}, None),
    }


def _lower_parts(
    args: dict[str, tuple],
    spec: GenerateSpec,
    options: tuple[tuple[str, Any], ...],
    compiled: dict[tuple, jax.stages.Compiled],
) -> dict[str, Any]:
    """Lower the parts of a call (``_part_args``) that ``compiled`` (keyed as the parts'
    keys) lacks, in order: each part's inputs are the one before's outputs, replicated,
    so each can be lowered before the one before has compiled. ``spec.mesh`` must be
    set. Returns ``{part: jax.stages.Lowered}``."""
    jits = _part_jits(options, spec.mesh)
    statics = {"config": spec.config, "dtype": spec.dtype, "mesh": spec.mesh}
    lowered: dict[str, Any] = {}

    def out_info(name: str) -> Any:
        return (lowered[name] if name in lowered else compiled[args[name][0]]).out_info

    key, params, part_inputs = args["condition"]
    if key not in compiled:
        lowered["condition"] = jits["condition"].lower(
            params, part_inputs, mode=spec.mode, **statics
        )
    key, params, part_inputs = args["denoise"]
    if key not in compiled:
        lowered["denoise"] = jits["denoise"].lower(
            params, out_info("condition"), part_inputs, spec=spec
        )
    key, params, _ = args["decode"]
    if key not in compiled:
        lowered["decode"] = jits["decode"].lower(params, out_info("denoise"), **statics)
    return lowered


def _compile_all(lowered: dict[str, Any]) -> dict[str, jax.stages.Compiled]:
    """Compile lowered programs, at the same time when there are several: XLA's
    compile releases the GIL, and on a GPU host most of it (passes, code generation)
    runs on one core, so the parts' compiles overlap."""
    if len(lowered) < 2:
        return {name: low.compile() for name, low in lowered.items()}
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        concurrent.futures.wait(futures.values())
    failed = [name for name, future in futures.items() if future.exception() is not None]
    if len(failed) in (0, len(futures)):  # all compiled, or all refused (e.g. an option)
        return {name: future.result() for name, future in futures.items()}
    # Some compiled and some failed, as on a backend that cannot compile two programs
    # at once: the failed ones again, one at a time (an error that is not about that
    # comes back the same, and is raised).
    warnings.warn(
        f"compiling the sampling programs at the same time failed ({failed[0]}: "
        f"{futures[failed[0]].exception()!r:.300}); compiling them one at a time",
        RuntimeWarning,
        stacklevel=3,
    )
    return {
        name: lowered[name].compile() if name in failed else future.result()
        for name, future in futures.items()
    }


def _layout_warning(error: str) -> None:
    warnings.warn(
        f"could not compile with compiler-chosen parameter layouts ({error}); "
        "using the default layouts",
        RuntimeWarning,
        stacklevel=4,
    )


def _split_over_mesh(x: jax.Array, mesh: Mesh | None, axis: int) -> jax.Array:
    """Constrain ``x``'s ``axis`` to be split over ``mesh``'s devices where it divides.

    Returns ``x`` unchanged without a mesh, on one device, or when the axis's
    length is not a multiple of the device count.
    """
    n = 1 if mesh is None else mesh.devices.size
    if n == 1 or x.shape[axis] % n:
        return x
    spec = PartitionSpec(*([None] * axis), mesh.axis_names[0])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_padding(batch: int, devices: int) -> int:
    """Dummy images to add so a batch of ``batch`` images runs on ``devices`` devices.

    Every step runs the UNet on the doubled guidance batch (2 x images), so with an
    even device count the images need only fill half the devices: one image on two
    devices needs no padding (each device runs one half of the guidance pair), two
    images on eight devices are padded to four, not eight.
    """
    if batch < 1 or devices < 1:
        raise ValueError(f"batch and devices must be >= 1; got {batch}, {devices}")
    unit = devices // 2 if devices % 2 == 0 else devices
    return (-batch) % unit


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not out:
        raise ValueError(f"{name} is an empty list")
    if not all(isinstance(v, str) for v in out):
        raise ValueError(f"{name} must be a string or a list of strings")
    return out


def _images_to_array(images: Any, name: str) -> np.ndarray:
    """PIL image(s), uint8 or float [0, 1] arrays -> float32 [B, H, W, 3] in [-1, 1]."""
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    elif hasattr(images, "convert"):
        images = np.asarray(images.convert("RGB"))
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be [B, H, W, 3] or [H, W, 3] (RGB, NHWC); got {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(
                f"float {name} must be in [0, 1]; got range [{arr.min()}, {arr.max()}]"
            )
    else:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    return arr * 2.0 - 1.0


def _mask_to_array(mask: Any) -> np.ndarray:
    """PIL / uint8 / float / bool mask -> float32 [B, H, W] in [0, 1] (1 = repaint)."""
    if isinstance(mask, (list, tuple)) and mask and hasattr(mask[0], "convert"):
        mask = np.stack([np.asarray(m.convert("L")) for m in mask])
    elif hasattr(mask, "convert"):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"mask must be [B, H, W] or [H, W]; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


class StableDiffusion:
    """A Stable Diffusion model ready to sample.

    Attributes:
      config: the :class:`~jaxdiff.models.sd.SDConfig`.
      params: ``{"unet", "vae", "text_encoder"}`` on the devices (replicated).
      tokenizer: a transformers ``CLIPTokenizer``.
      dtype: compute and parameter dtype (float32, bfloat16 or float16); the
        normalisation layers keep float32 params (see :func:`inference_params`).
      mesh: the 1-D device mesh ``("data",)`` batches are sharded over.

    ``param_layouts``: True lets XLA choose the parameters' memory layouts at the first
    call and moves them there (:mod:`jaxdiff.layouts`: no per-call kernel transposes
    on GPU), False keeps the default row-major ones, None (default) does the first on
    the backends in ``layouts.AUTO_BACKENDS`` (none at present: on an H200 it took
    GPU time off but no wall time).

    ``compiler_options``: XLA options (name -> value) the sampling program is compiled
    with, e.g. ``{"xla_gpu_enable_llvm_module_compilation_parallelism": True}``; None
    (default) takes ``DEFAULT_COMPILER_OPTIONS`` for the backend, ``{}`` none at all.
    An option this jaxlib does not know fails at the first call, naming it. Options
    change the executable, not the results' meaning; the persistent compilation cache
    keys on them.

    ``split_programs``: True (default) compiles each call as three programs, the
    prompts' (and images') encoding, the sampling loop and the VAE decoder
    (:func:`encode_conditions`, :func:`denoise`, :func:`decode_images`), compiled
    concurrently at the first call; a new step count or sampler then recompiles only
    the loop, a new mode only the encoding and the loop. False compiles
    :func:`generate` as one program (what ``param_layouts=True`` always does). The
    images are the same either way.
    """

    def __init__(
        self,
        config: SDConfig,
        params: dict,
        tokenizer: Any,
        *,
        dtype: Any = jnp.float32,
        devices: Sequence[Any] | None = None,
        param_layouts: bool | None = None,
        compiler_options: dict[str, Any] | None = None,
        split_programs: bool | None = None,
    ):
        dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(inference_params(params, dtype), replicated)
        if compiler_options is None:
            compiler_options = DEFAULT_COMPILER_OPTIONS.get(jax.default_backend(), {})
        # Checked once, kept as the hashable key the jitted generate() is cached under.
        self._compiler_options = _check_compiler_options(compiler_options)
        if param_layouts is None:  # (split programs asked for win over a backend default)
            auto = jax.default_backend() in layouts.AUTO_BACKENDS
            param_layouts = auto and not split_programs
        self._layouts = (
            layouts.LayoutCache(0, _layout_warning, compiler_options=self.compiler_options)
            if param_layouts
            else None
        )
        if split_programs and param_layouts:
            raise ValueError(
                "split_programs=True cannot be combined with param_layouts=True (the "
                "parameters' chosen layouts are kept for one program)"
            )
        self._split_programs = bool(not param_layouts if split_programs is None else split_programs)
        self._parts: dict[tuple, jax.stages.Compiled] = {}  # split programs by call shape

    # -- loading and saving ----------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        variant: str | None = None,
        allow_pickle: bool = False,
        **options: Any,
    ) -> StableDiffusion:
        """Load a diffusers-format directory (no torch needed for safetensors weights).
        ``options``: the constructor's (``dtype``, ``devices``, ``param_layouts``,
        ``compiler_options``, ``split_programs``)."""
        from transformers import CLIPTokenizer

        config, params = pretrained.load_pretrained(
            path, variant=variant, allow_pickle=allow_pickle
        )
        tokenizer = CLIPTokenizer.from_pretrained(Path(path) / "tokenizer")
        return cls(config, params, tokenizer, **options)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config_dir: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        **options: Any,
    ) -> StableDiffusion:
        """Load an original-layout checkpoint; configs and tokenizer come from ``config_dir``
        (a diffusers-format directory of the same model family). ``options``: the
        constructor's, as :meth:`from_pretrained`'s."""
        from transformers import CLIPTokenizer

        config = pretrained.load_config(config_dir)
        params = pretrained.load_single_file(path, config, allow_pickle=allow_pickle)
        tokenizer = CLIPTokenizer.from_pretrained(Path(config_dir) / "tokenizer")
        return cls(config, params, tokenizer, **options)

    def save_pretrained(self, path: str | os.PathLike, sampler: str | None = None) -> Path:
        """Write a diffusers-format directory (fp32 weights)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return pretrained.save_pretrained(path, self.config, self.params, tmp, sampler=sampler)

    # -- generation ------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> [B, L] int32 ids, padded/truncated to the tokenizer's max length."""
        length = min(
            self.tokenizer.model_max_length, self.config.text_encoder.max_position_embeddings
        )
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True
        ).input_ids
        return np.asarray(ids, np.int32)

    def _prepare(
        self,
        mode: str,
        prompt,
        *,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        sampler: str | None = None,
        schedule: str | None = None,
        eta: float = 0.0,
        seed: int | Sequence[int] = 0,
        latents: Any = None,
        num_images_per_prompt: int = 1,
        strength: float = 1.0,
        image: Any = None,
        mask: Any = None,
        progress: bool = True,
    ) -> tuple[GenerateSpec, dict[str, Any], int]:
        """Check a call's arguments and build its static spec, its device inputs (the
        batch padded to the mesh) and its real batch size."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if mode != "text_to_image" and image is None:
            raise ValueError(f"{mode} needs an image")
        if mode == "inpaint" and mask is None:
            raise ValueError("inpaint needs a mask")
        cfg = self.config
        prompts = _as_list(prompt, "prompt")
        if prompts is None:
            raise ValueError("prompt is required (a string or a list of strings)")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        negatives = _as_list(negative_prompt, "negative_prompt") or [""] * len(prompts)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts"
            )
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        b = len(prompts)

        f = cfg.latent_factor
        image_arr = mask_arr = None
        if image is not None:
            image_arr = _images_to_array(image, "image")
            if image_arr.shape[0] == 1 and b > 1:
                image_arr = np.repeat(image_arr, b, axis=0)
            if image_arr.shape[0] != b:
                raise ValueError(f"got {image_arr.shape[0]} images for {b} prompts x images")
            height = height or image_arr.shape[1]
            width = width or image_arr.shape[2]
            if image_arr.shape[1:3] != (height, width):
                raise ValueError(
                    f"image is {image_arr.shape[1]}x{image_arr.shape[2]} but height x width "
                    f"is {height}x{width}"
                )
        if mask is not None:
            mask_arr = _mask_to_array(mask)
            if mask_arr.shape[0] == 1 and b > 1:
                mask_arr = np.repeat(mask_arr, b, axis=0)
            if mask_arr.shape != (b, height, width):
                raise ValueError(
                    f"mask shape {mask_arr.shape} does not match the image's "
                    f"[{b}, {height}, {width}]"
                )
        default = cfg.unet.sample_size
        default = default if isinstance(default, int) else (default or 64)
        height = height or default * f
        width = width or default * f
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {f}; got {height}x{width}"
            )
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        hw = (height // f, width // f)
        shape = (b, *hw, cfg.vae.latent_channels)

        seeds = np.asarray(seed, np.uint32).reshape(-1)
        if seeds.size == 1:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(seeds[0])), i))(
                jnp.arange(b)
            )
        elif seeds.size == b:
            keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        else:
            raise ValueError(f"seed must be an int or one per image ({b}); got {seeds.size}")
        if latents is None:
            noise = _per_example_normal(keys, 0, shape[1:])
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != shape:
                raise ValueError(f"latents must be NHWC {list(shape)}; got {list(noise.shape)}")

        sampler = sampler or cfg.scheduler.default_sampler
        spec = GenerateSpec(
            cfg, mode, sampler, int(steps), schedule, hw, self.dtype, progress, self.mesh
        )
        spec.plan  # noqa: B018 - validates sampler / steps / schedule before any device work
        inputs = {
            "input_ids": self.tokenize(prompts),
            "negative_ids": self.tokenize(negatives),
            "keys": keys,
            "noise": noise,
        }
        if image_arr is not None:
            inputs["image"] = image_arr
        if mask_arr is not None:
            inputs["mask"] = mask_arr
        n_dev = self.mesh.devices.size
        pad = batch_padding(b, n_dev)
        inputs = {k: _pad(v, pad) for k, v in inputs.items()}
        # A batch that fills only half the devices goes in whole; generate() splits the
        # guidance batch, which does divide.
        split = (b + pad) % n_dev == 0
        batch_sharding = NamedSharding(self.mesh, PartitionSpec("data" if split else None))
        inputs = jax.device_put(inputs, batch_sharding)
        scalars = {
            "guidance_scale": np.float32(guidance_scale),
            "guidance_rescale": np.float32(guidance_rescale),
            "eta": np.float32(eta),
            "strength": np.float32(strength),
            # diffusers computes int(steps * strength) in float64 on the host; doing the
            # same here keeps the step count identical (still a traced value: no recompile).
            "start_index": np.int32(samplers.start_index_for_strength(spec.plan, float(strength))),
        }
        inputs.update(jax.device_put(scalars, NamedSharding(self.mesh, PartitionSpec())))
        return spec, inputs, b

    @staticmethod
    def _layout_key(spec: GenerateSpec, inputs: dict[str, Any]) -> tuple:
        return (spec, _avals(inputs))

    @property
    def compiler_options(self) -> dict[str, Any]:
        """The XLA options the sampling program is compiled with (a copy)."""
        return dict(self._compiler_options)

    @property
    def split_programs(self) -> bool:
        """Whether calls run as three programs (see the class docstring)."""
        return self._split_programs

    def _jitted(self) -> Any:
        return _generate_jit_with(self._compiler_options)

    def _compiled_parts(self, spec: GenerateSpec, inputs: dict[str, Any]) -> tuple:
        """The call's three programs (:class:`CompiledParts`) and :func:`_part_args`;
        the ones not compiled yet are lowered here, in order (each part's inputs are
        the one before's outputs, replicated), then compiled at the same time."""
        args = _part_args(self.params, spec, inputs)
        missing = [name for name in PARTS if args[name][0] not in self._parts]
        if missing:
            start = time.perf_counter()
            if spec.progress:  # a first call's pause, explained
                print(f"jaxdiff: compiling {', '.join(missing)} ...", file=sys.stderr, flush=True)
            lowered = _lower_parts(args, spec, self._compiler_options, self._parts)
            for name, compiled in _compile_all(lowered).items():
                self._parts[args[name][0]] = compiled
            if spec.progress:
                took = time.perf_counter() - start
                print(f"jaxdiff: compiled in {took:.1f} s", file=sys.stderr, flush=True)
        parts = CompiledParts(*(self._parts[args[name][0]] for name in PARTS))
        return parts, args

    def _run(self, mode: str, prompt, **kwargs) -> np.ndarray:
        spec, inputs, b = self._prepare(mode, prompt, **kwargs)
        done = None
        if self.split_programs:
            parts, args = self._compiled_parts(spec, inputs)
            conditions = parts.condition(*args["condition"][1:])
            latents = parts.denoise(args["denoise"][1], conditions, args["denoise"][2])
            images = parts.decode(args["decode"][1], latents)
            return np.asarray(jax.device_get(images))[:b]
        if self._layouts is not None:
            fn = functools.partial(generate, spec=spec)
            done = self._layouts.call(self._layout_key(spec, inputs), fn, (self.params, inputs))
        if done is None:
            images = self._jitted()(self.params, inputs, spec=spec)
        else:
            images, (self.params, _) = done
        return np.asarray(jax.device_get(images))[:b]

    def executable(self, mode: str, prompt, **kwargs) -> jax.stages.Compiled | CompiledParts:
        """The compiled program(s) a call would run, compiled now if they are not yet
        (ahead of time: nothing is generated): a :class:`CompiledParts` with
        ``split_programs``, else one ``jax.stages.Compiled``. ``mode`` is one of
        :data:`MODES`; the other arguments are those of :meth:`text_to_image`,
        :meth:`image_to_image` or :meth:`inpaint` (only their shapes and static
        choices matter). Use it to compile before the first request, or to read the
        optimized program (``.as_text()``; ``.cost_analysis()`` of one program)."""
        spec, inputs, _ = self._prepare(mode, prompt, **kwargs)
        if self.split_programs:
            return self._compiled_parts(spec, inputs)[0]
        if self._layouts is not None:
            key = self._layout_key(spec, inputs)
            fn = functools.partial(generate, spec=spec)
            placed = self._layouts.compile(key, fn, (self.params, inputs))
            if placed is not None:
                self.params = placed[0]
                return self._layouts.executable(key)
        return self._jitted().lower(self.params, inputs, spec=spec).compile()

    def text_to_image(self, prompt, **kwargs) -> np.ndarray:
        """Generate images from text.

        Args:
          prompt: a string or a list of strings.
          negative_prompt: str | list[str] | None (None: the empty prompt).
          height, width: pixels, multiples of 8 (default: the UNet's sample_size * 8).
          steps: inference steps.
          guidance_scale: classifier-free guidance weight (<= 1: no guidance).
          guidance_rescale: Lin et al. 2023 rescale, in [0, 1].
          sampler: one of ``samplers.SAMPLERS`` (default: the scheduler config's).
          schedule: None (as the scheduler config says) or "karras" / "exponential".
          eta: DDIM eta.
          seed: an int (image i uses fold_in(key(seed), i)) or one int per image.
          latents: optional start noise, NHWC [B, H/8, W/8, C] (scaled by the sampler's
            init_noise_sigma, as diffusers does).
          num_images_per_prompt: images for each prompt.
          progress: show a progress bar.

        Returns:
          uint8 [B, H, W, 3].
        """
        return self._run("text_to_image", prompt, **kwargs)

    def image_to_image(self, image, prompt, strength: float = 0.8, **kwargs) -> np.ndarray:
        """Re-imagine ``image`` under ``prompt``: noise it to ``strength`` and denoise.

        ``strength`` follows diffusers: ``int(steps * strength)`` steps are run,
        starting from the image's latents noised to that step's level; 0 returns the
        VAE reconstruction, 1 ignores the image. ``image``: PIL, uint8 or float [0, 1]
        [B, H, W, 3]. Other keywords as :meth:`text_to_image`.
        """
        return self._run("image_to_image", prompt, image=image, strength=strength, **kwargs)

    def inpaint(self, image, mask, prompt, strength: float = 1.0, **kwargs) -> np.ndarray:
        """Repaint the region of ``image`` where ``mask`` is 1.

        9-channel inpainting UNets get the mask and masked-image latents as extra
        input channels; ordinary 4-channel UNets keep the unmasked latents pinned to
        the (noised) original after every step. ``mask``: [B, H, W] (or PIL / [H, W]),
        binarised at 0.5. Other keywords as :meth:`image_to_image`.
        """
        return self._run("inpaint", prompt, image=image, mask=mask, strength=strength, **kwargs)


def _pad(x: Any, pad: int) -> Any:
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
