"""The two training phases as data: init, abstract state, jitted step, batch conversion.

``vae_phase`` trains the KL autoencoder of a from-scratch model;
``diffusion_phase`` trains the networks in ``train.trainable`` (UNet, text
encoder) against the frozen VAE (from phase 1 or ``model.pretrained``). Both
return a :class:`Phase` that :func:`jaxdiff.train.loop.run_phase` runs: params,
EMA and optimizer state are born sharded (``jax.jit`` with ``out_shardings``
from ``jax.eval_shape``), and the step is jitted once with those shardings and
the state donated, but for the frozen networks' params, which the step only reads
(:func:`jaxdiff.train.step.jit_train_step`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff import parallel
from jaxdiff.models.autoencoder import init_autoencoder
from jaxdiff.models.clip import init_clip
from jaxdiff.models.sd import SDConfig, encode_images
from jaxdiff.models.unet import init_unet
from jaxdiff.train import optim, setup
from jaxdiff.train.data import HostBatches, tokenize
from jaxdiff.train.latent_cache import LatentCache, build_latent_cache
from jaxdiff.train.step import (
    StepConfig,
    TrainState,
    init_state,
    jit_train_step,
    make_train_step,
)
from jaxdiff.train.vae_step import VAEStepConfig, make_vae_train_step

VAE, DIFFUSION = "vae", "diffusion"
# Keys folded into the seed so the two phases draw independent noise.
_PHASE_SEED = {VAE: 1, DIFFUSION: 2}


def _is_main() -> bool:
    return jax.process_index() == 0


@dataclasses.dataclass
class Phase:
    """One training loop's pieces.

    Attributes:
      name: "vae" or "diffusion" (checkpoint sub-directory, metrics tag).
      total_steps: train until ``state.step`` reaches this.
      init: () -> a fresh, sharded TrainState.
      abstract_state: its shapes, dtypes and shardings (the restore target).
      build_step: (state) -> the jitted step; called after init/restore, so the
        step may depend on restored values (the latent scaling factor).
      make_batch: host batch -> dict of numeric numpy arrays for the step.
      on_step: (step, state) -> None, called after each step (sample grids).
      trainable: the top-level networks that train (None: all of ``state.params``),
        whose norm the loop logs as ``param_norm``.
    """

    name: str
    total_steps: int
    init: Callable[[], TrainState]
    abstract_state: TrainState
    build_step: Callable[[TrainState], Callable]
    make_batch: Callable[[dict], dict]
    on_step: Callable[[int, TrainState], None] | None = None
    trainable: tuple[str, ...] | None = None


def host_copy(x: jax.Array) -> np.ndarray:
    """A replicated array's value (works when it spans processes)."""
    return np.asarray(x.addressable_data(0))


def _place(tree: Any, shardings: Any) -> Any:
    """Numpy arrays (the same full value on every host) -> arrays with ``shardings``.

    Each device receives only its slice, so a large model never lands whole on one device.
    """
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a)[idx]),
        tree,
        shardings,
    )


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _make_tx(
    labels_tree: Any,
    trainable: tuple[str, ...],
    lr: float,
    warmup: int,
    steps: int,
    opt: Any,
    fsdp_min_size: int,
):
    """AdamW over ``trainable`` with the config's schedule, clipping and accumulation."""
    accumulation = int(opt.accumulation_steps)
    if accumulation < 1:
        raise ValueError(f"optimizer.accumulation_steps={accumulation} must be >= 1")
    schedule = optim.learning_rate_schedule(
        lr, int(warmup), max(steps // accumulation, 1), str(opt.schedule)
    )
    labels = optim.trainable_labels(labels_tree, trainable)
    clip = float(opt.clip_norm) or None
    tx = optim.make_optimizer(
        labels,
        schedule,
        weight_decay=float(opt.weight_decay),
        clip_norm=clip,
        accumulation_steps=accumulation,
        fsdp_min_size=fsdp_min_size,
        mu_dtype=_mu_dtype(opt),
    )
    return tx, schedule


def _mu_dtype(opt: Any) -> Any:
    """``optimizer.mu_dtype``: "float32" (or absent: the fp32 params' own dtype, None)
    or "bfloat16"."""
    name = str(opt.get("mu_dtype", "float32"))
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"optimizer.mu_dtype={name!r}: expected 'float32' or 'bfloat16'")
    return None if name == "float32" else jnp.bfloat16


def _fsdp_min_size(config: Any) -> int:
    return int(config.mesh.get("fsdp_min_size", parallel.DEFAULT_MIN_FSDP_SIZE))


def _state_shardings(abstract: TrainState, mesh: Mesh, config: Any) -> Any:
    return parallel.param_shardings(abstract, mesh, _fsdp_min_size(config))


def _jit_step(fn: Callable, state_sh: Any, mesh: Mesh, trainable: tuple[str, ...]) -> Callable:
    # The state donated, the frozen networks' params only read (see jit_train_step).
    return jit_train_step(
        fn,
        trainable,
        state_shardings=state_sh,
        batch_sharding=parallel.batch_sharding(mesh),
        replicated=parallel.replicated(mesh),
    )


def vae_phase(config: Any, model: setup.Model, mesh: Mesh) -> Phase:
    """The autoencoder phase of a from-scratch run."""
    vcfg = config.vae_train
    step_cfg: VAEStepConfig = setup.vae_step_config(config)
    vae_config = model.config.vae
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _PHASE_SEED[VAE])
    abstract_params = {"vae": jax.eval_shape(lambda k: init_autoencoder(vae_config, k), key)}
    tx, schedule = _make_tx(
        abstract_params,
        ("vae",),
        float(vcfg.lr),
        vcfg.warmup_steps,
        int(vcfg.steps),
        config.optimizer,
        _fsdp_min_size(config),
    )

    def init(rng):
        k_params, k_state = jax.random.split(rng)
        params = {"vae": init_autoencoder(vae_config, k_params)}
        return init_state(params, tx, step_cfg, k_state)

    abstract = jax.eval_shape(init, key)
    state_sh = _state_shardings(abstract, mesh, config)
    step = _jit_step(
        make_vae_train_step(vae_config, step_cfg, tx, schedule), state_sh, mesh, ("vae",)
    )
    return Phase(
        name=VAE,
        total_steps=int(vcfg.steps),
        init=lambda: jax.jit(init, out_shardings=state_sh)(key),
        abstract_state=_with_shardings(abstract, state_sh),
        build_step=lambda _state: step,
        make_batch=lambda b: {"pixels": np.asarray(b["image"], np.float32)},
    )


def estimate_latent_std(config: Any, sd_config: SDConfig, vae_params: Any, mesh: Mesh) -> float:
    """Std of the VAE posterior means over the first global batch of a fresh data iterator.

    Deterministic for given params and data, so a resumed run finds the same value.
    """
    data = HostBatches(config)
    try:
        host = {"pixels": np.asarray(next(data)["image"], np.float32)}
    finally:
        data.close()
    batch = parallel.host_batch_to_global(host, mesh)
    fn = jax.jit(
        lambda p, x: jnp.std(
            encode_images(p, x, dataclasses.replace(sd_config, vae=_unit(sd_config)))
        ),
        out_shardings=parallel.replicated(mesh),
    )
    return float(host_copy(fn(vae_params, batch["pixels"])))


def _unit(sd_config: SDConfig):
    # Latents with scaling 1 (and no shift): the raw posterior mode.
    return dataclasses.replace(sd_config.vae, scaling_factor=1.0, shift_factor=None)


def diffusion_phase(
    config: Any,
    model: setup.Model,
    mesh: Mesh,
    vae_params: Any | None,
    on_config: Callable[[SDConfig], None],
) -> Phase:
    """The diffusion phase: trainable networks against the frozen VAE.

    With ``train.cache_latents`` the step gets ``"latents"`` looked up by example
    index in a cache that ``build_step`` encodes once (:mod:`jaxdiff.train.latent_cache`)
    instead of ``"pixels"`` to encode every step.

    Args:
      config: the run's config.
      model: configs, tokenizer and (fine-tuning) pretrained params.
      mesh: the device mesh.
      vae_params: trained VAE params from phase 1 (device arrays), or None.
      on_config: receives the final model configs (the latent scaling factor is
        only known once the VAE params are).
    """
    step_cfg: StepConfig = setup.step_config(config, model)
    sd_config = model.config
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _PHASE_SEED[DIFFUSION])
    trainable = step_cfg.trainable

    def make_params(rng, vae):
        # Same key split as jaxdiff.models.sd.init_params.
        k_unet, k_vae, k_text = jax.random.split(rng, 3)
        return {
            "unet": init_unet(sd_config.unet, k_unet),
            "vae": init_autoencoder(sd_config.vae, k_vae) if vae is None else vae,
            "text_encoder": init_clip(sd_config.text_encoder, k_text),
        }

    if model.params is not None:
        abstract_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params
        )
    else:
        abstract_params = jax.eval_shape(make_params, key, vae_params)
    tx, schedule = _make_tx(
        optim.select(abstract_params, trainable),
        trainable,
        float(config.optimizer.lr),
        config.optimizer.warmup_steps,
        int(config.total_steps),
        config.optimizer,
        _fsdp_min_size(config),
    )

    def init_from(params, rng):
        return init_state(params, tx, step_cfg, rng)

    abstract = jax.eval_shape(init_from, abstract_params, key)
    state_sh = _state_shardings(abstract, mesh, config)

    def init():
        k_params, k_state = jax.random.split(key)
        if model.params is not None:
            params = _place(model.params, state_sh.params)
            return jax.jit(init_from, out_shardings=state_sh, donate_argnums=0)(params, k_state)
        fn = lambda k, vae: init_from(make_params(k, vae), k_state)  # noqa: E731
        return jax.jit(fn, out_shardings=state_sh)(k_params, vae_params)

    cache_latents = bool(config.train.get("cache_latents", False))
    cache: dict[str, LatentCache] = {}

    def build_step(state: TrainState) -> Callable:
        final = sd_config
        if model.params is None and bool(config.vae_train.get("auto_scaling_factor", False)):
            std = estimate_latent_std(config, sd_config, state.params["vae"], mesh)
            final = setup.with_scaling_factor(sd_config, std)
            if _is_main():
                factor = final.vae.scaling_factor
                print(f"[diffusion] latent std {std:.4g}: vae.scaling_factor = {factor}")
        on_config(final)
        if cache_latents:
            # Once, before the first step (the step reads the VAE params, never donates them).
            start = time.perf_counter()
            cache["latents"] = build_latent_cache(config, state.params["vae"], final, mesh)
            if _is_main():
                shape = "x".join(str(d) for d in cache["latents"].latents.shape[1:])
                print(
                    f"[diffusion] cached the {shape} latents of {len(cache['latents'])} examples "
                    f"in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
        fn = make_train_step(final, step_cfg, tx, schedule)
        return _jit_step(fn, state_sh, mesh, tuple(trainable))

    max_length = model.max_length

    def make_batch(b: dict) -> dict:
        out = {"input_ids": tokenize(model.tokenizer, b["caption"], max_length)}
        if not cache_latents:
            out["pixels"] = np.asarray(b["image"], np.float32)
        elif "latents" not in cache:
            raise RuntimeError("train.cache_latents: build_step must run before make_batch")
        else:
            out["latents"] = cache["latents"].lookup(b["index"])
        return out

    return Phase(
        name=DIFFUSION,
        total_steps=int(config.total_steps),
        init=init,
        abstract_state=_with_shardings(abstract, state_sh),
        build_step=build_step,
        make_batch=make_batch,
        trainable=tuple(trainable),
    )
