"""The training state and one pure training step of latent diffusion.

``train_step(state, batch, rng) -> (state, metrics)``: VAE-encode pixels (or
take cached latents), draw timesteps and noise, form x_t with ``add_noise``,
predict with the UNet under the (possibly dropped) text condition, regress
onto the epsilon / v / x0 target with optional min-SNR-gamma weights, and
apply an optax update to the trainable networks, then the EMA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxdiff import schedules
from jaxdiff.models.sd import SDConfig, apply_unet, encode_images, encode_text
from jaxdiff.train import optim


class TrainState(struct.PyTreeNode):
    """Everything a run carries from step to step (all arrays: checkpointable as is).

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: ``{"unet", "vae", "text_encoder"}`` fp32 master weights.
      ema_params: EMA of the trainable networks (``{}`` when EMA is off).
      opt_state: optax state over the trainable networks.
      rng: the run's base PRNG key; each step folds in ``step``.
    """

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static choices of the training step (hashable).

    Attributes:
      trainable: top-level networks that train, e.g. ``("unet",)``.
      compute_dtype: activations' dtype (params stay fp32), e.g. ``jnp.bfloat16``.
      snr_gamma: min-SNR-gamma weighting (None: plain MSE).
      noise_offset: offset-noise strength (0: off).
      cond_dropout: probability of replacing the caption by the empty prompt.
      null_ids: token ids of the empty prompt, used for dropped captions.
      ema_decay: max EMA decay (None: no EMA).
      ema_warmup: ramp the EMA decay up as (1 + step) / (10 + step).
      remat: rematerialise UNet blocks in the backward pass.
      sample_posterior: sample the VAE posterior (diffusers' training) instead of its mode.
      ohwi_kernels: the UNet params' convolution kernels are [O, H, W, I]
        (:func:`jaxdiff.models.unet.ohwi_kernels`), the order cuDNN reads them and
        writes their gradients in: a GPU step then transposes none of them. The state
        (checkpoints, EMA) holds that order too; the training loop does not set this
        (an experiment of ``benchmarks/gpu.py`` so far: ``train_ohwi_kernels``).
    """

    trainable: tuple[str, ...] = ("unet",)
    compute_dtype: Any = jnp.float32
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    cond_dropout: float = 0.0
    null_ids: tuple[int, ...] = ()
    ema_decay: float | None = 0.9999
    ema_warmup: bool = True
    remat: bool = False
    sample_posterior: bool = True
    ohwi_kernels: bool = False

    def __post_init__(self):
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.cond_dropout > 0 and not self.null_ids:
            raise ValueError("cond_dropout > 0 needs null_ids (the empty prompt's token ids)")


def init_state(
    params: dict, tx: optax.GradientTransformation, step_cfg: StepConfig, rng
) -> TrainState:
    """A fresh TrainState (jit it with out_shardings for a sharded init)."""
    trainable = optim.select(params, step_cfg.trainable)
    ema = jax.tree.map(jnp.copy, trainable) if step_cfg.ema_decay is not None else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=ema,
        opt_state=tx.init(trainable),
        rng=rng,
    )


def diffusion_loss(
    trainable: dict,
    frozen: dict,
    batch: dict,
    rng: jax.Array,
    *,
    config: SDConfig,
    step_cfg: StepConfig,
    alphas_cumprod: jax.Array,
    prediction_type: str,
) -> tuple[jax.Array, dict]:
    """Mean (weighted) squared error of the network output against its target.

    Args:
      trainable, frozen: the two halves of the params dict.
      batch: ``{"input_ids": [B, L] int}`` and either ``"pixels"`` [B, H, W, 3] in
        [-1, 1] or ``"latents"`` [B, h, w, C] (already scaled).
      rng: this step's key.

    Returns:
      ``(loss, aux)`` with per-batch diagnostics.
    """
    params = {**frozen, **trainable}
    dtype = step_cfg.compute_dtype
    k_lat, k_noise, k_off, k_t, k_drop = jax.random.split(rng, 5)
    if "latents" in batch:
        latents = batch["latents"].astype(jnp.float32)
    else:
        key = k_lat if step_cfg.sample_posterior else None
        latents = encode_images(params["vae"], batch["pixels"], config, key, dtype)
    latents = jax.lax.stop_gradient(latents)
    b = latents.shape[0]

    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    if step_cfg.noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant shift lets the model
        # change an image's mean brightness, which pure white noise never teaches.
        noise = noise + step_cfg.noise_offset * jax.random.normal(
            k_off, (b, 1, 1, latents.shape[-1]), jnp.float32
        )
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    x_t = schedules.add_noise(latents, noise, t, alphas_cumprod)

    ids = batch["input_ids"]
    if step_cfg.cond_dropout > 0:
        drop = jax.random.uniform(k_drop, (b,)) < step_cfg.cond_dropout
        null = jnp.asarray(step_cfg.null_ids, ids.dtype)[None, : ids.shape[1]]
        ids = jnp.where(drop[:, None], null, ids)
    context = encode_text(params["text_encoder"], ids, config, dtype)
    if "text_encoder" not in step_cfg.trainable:
        context = jax.lax.stop_gradient(context)

    # The time embedding added after conv1: in the backward pass the add inside norm2
    # costs more than it saves (see layers._TEMB_IN_NORM).
    pred = apply_unet(
        params["unet"],
        x_t,
        t,
        context,
        config,
        dtype,
        step_cfg.remat,
        temb_in_norm=False,
        ohwi_kernels=step_cfg.ohwi_kernels,
    )
    target = schedules.training_target(prediction_type, latents, noise, t, alphas_cumprod)
    per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
    if step_cfg.snr_gamma is not None:
        weights = schedules.min_snr_weights(t, alphas_cumprod, step_cfg.snr_gamma, prediction_type)
    else:
        weights = jnp.ones_like(per_example)
    loss = jnp.mean(per_example * weights)
    return loss, {"mse": jnp.mean(per_example)}


def make_train_step(
    config: SDConfig,
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
):
    """Build ``train_step(state, batch, rng) -> (state, metrics)``, pure and jittable.

    Args:
      config: the model configs (static).
      step_cfg: the step's static choices.
      tx: the optimiser over the trainable networks (see :mod:`jaxdiff.train.optim`).
      schedule: the learning-rate schedule, reported in the metrics.

    Returns:
      The step function. ``rng`` is the run's base key; the step folds in
      ``state.step`` so every step draws fresh noise and restarts reproduce exactly.
    """
    # Training uses the schedule as the model's scheduler_config.json resolves it.
    sched = config.scheduler.resolve(config.scheduler.default_sampler)
    alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(sched), jnp.float32)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        trainable = optim.select(state.params, step_cfg.trainable)
        frozen = {k: v for k, v in state.params.items() if k not in step_cfg.trainable}
        (loss, aux), grads = jax.value_and_grad(diffusion_loss, has_aux=True)(
            trainable,
            frozen,
            batch,
            rng,
            config=config,
            step_cfg=step_cfg,
            alphas_cumprod=alphas_cumprod,
            prediction_type=sched.prediction_type,
        )
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        ema = state.ema_params
        if step_cfg.ema_decay is not None:
            decay = optim.ema_decay(state.step, step_cfg.ema_decay, step_cfg.ema_warmup)
            ema = optim.ema_update(ema, trainable, decay)
        new_state = state.replace(
            step=state.step + 1,
            params={**state.params, **trainable},
            ema_params=ema,
            opt_state=opt_state,
        )
        # The gradient's norm is the one the clipping recorded (not computed twice). No
        # param_norm here: one more pass over every parameter, one reduction per leaf
        # (686 for SD 1.5's UNet, predicted ~3 ms of a 95 ms step on an H200); the
        # training loop adds it when it logs (see param_norm).
        metrics = {
            "loss": loss,
            "mse": aux["mse"],
            "grad_norm": optim.grad_norm_metric(grads, opt_state),
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return train_step


# Donate the frozen networks' params with the rest of the state, as before session 19
# (benchmark switch; see jit_train_step).
_DONATE_FROZEN = False


def split_frozen(state: TrainState, trainable: Sequence[str]) -> tuple[TrainState, dict]:
    """``(state with only the trainable networks' params, the other networks' params)``.

    Works on a TrainState of arrays, of shardings or of shapes alike.
    """
    own = {k: v for k, v in state.params.items() if k in trainable}
    frozen = {k: v for k, v in state.params.items() if k not in trainable}
    return state.replace(params=own), frozen


class _FrozenApart:
    """``step(state, batch, rng)`` jitted as ``(own, frozen, batch, rng)``, ``own`` donated."""

    def __init__(self, step_fn: Callable, trainable: tuple[str, ...], shardings: tuple | None):
        self.trainable = trainable

        def inner(own, frozen, batch, rng):
            state = own.replace(params={**frozen, **own.params})
            new_state, metrics = step_fn(state, batch, rng)
            return split_frozen(new_state, trainable)[0], metrics

        kw = {}
        if shardings is not None:
            state_sh, batch_sh, rep = shardings
            own_sh, frozen_sh = split_frozen(state_sh, trainable)
            kw = dict(in_shardings=(own_sh, frozen_sh, batch_sh, rep), out_shardings=(own_sh, rep))
        self.jitted = jax.jit(inner, donate_argnums=0, **kw)

    def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
        own, frozen = split_frozen(state, self.trainable)
        new_own, metrics = self.jitted(own, frozen, batch, rng)
        return new_own.replace(params={**frozen, **new_own.params}), metrics

    def lower(self, state: TrainState, batch: dict, rng: jax.Array):
        """The jitted step lowered for these arguments (``.compile()``, ``.as_text()``)."""
        return self.jitted.lower(*split_frozen(state, self.trainable), batch, rng)


def jit_train_step(
    step_fn: Callable,
    trainable: Sequence[str],
    *,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable:
    """Jit ``step_fn(state, batch, rng) -> (state, metrics)``, the state donated except
    the params of the networks that do not train.

    The frozen networks (the VAE and usually the text encoder) stay in
    ``state.params``, where checkpoints, sampling and the latent cache read them,
    but the step only reads them: they are passed as an argument of their own and
    not donated, and the step does not return them. The returned callable has
    ``step_fn``'s signature and puts the same frozen arrays back in the new state.
    That is 444 arrays fewer to donate and return per step for SD 1.5 (a donated
    array costs the H200 hosts of sessions 10-11 ~6-8 us per call, one only read
    ~1.2-2.3 us).

    Args:
      step_fn: the pure step (:func:`make_train_step`, ``make_vae_train_step``).
      trainable: the networks ``step_fn`` updates (the others' params are frozen).
      state_shardings, batch_sharding, replicated: the shardings of the state (a
        TrainState of shardings), of the batch, and of the rng and the metrics; all
        three or none.

    Returns:
      The jitted step, with ``.lower(state, batch, rng)``.
    """
    given = [x is not None for x in (state_shardings, batch_sharding, replicated)]
    if any(given) and not all(given):
        raise ValueError("jit_train_step: give all three shardings or none")
    shardings = (state_shardings, batch_sharding, replicated) if all(given) else None
    if _DONATE_FROZEN:
        kw = {}
        if shardings is not None:
            kw = dict(in_shardings=shardings, out_shardings=(state_shardings, replicated))
        return jax.jit(step_fn, donate_argnums=0, **kw)
    return _FrozenApart(step_fn, tuple(trainable), shardings)


def param_norm(state: TrainState, trainable: Sequence[str] | None = None) -> jax.Array:
    """L2 norm over the params of the ``trainable`` networks (all when None), in fp32.

    Jittable; the training loop logs it at each logging step rather than every step.
    """
    params = state.params if trainable is None else optim.select(state.params, trainable)
    return optax.tree.norm(jax.tree.map(lambda a: a.astype(jnp.float32), params))


def state_shardings(abstract_state: TrainState, mesh, min_size: int | None = None):
    """FSDP shardings for every array of a TrainState (scalars and keys replicated)."""
    from jaxdiff import parallel

    kw = {} if min_size is None else {"min_size": min_size}
    return parallel.param_shardings(abstract_state, mesh, **kw)


def names(seq: Sequence[str]) -> tuple[str, ...]:
    """Normalise a config's list of network names to a tuple."""
    return tuple(str(s) for s in seq)
