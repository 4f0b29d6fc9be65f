"""One pure training step of the KL autoencoder (the first phase of a from-scratch model).

Latent diffusion trains its autoencoder first and freezes it (Rombach et al.
2022, Sec. 3.1): a reconstruction loss plus a small KL penalty towards
N(0, I) keeps the latent space smooth without blurring the images. Stable
Diffusion's VAE adds a perceptual (LPIPS) and an adversarial term; for the
small models trained here an L1 or L2 reconstruction is enough.

The state is a :class:`jaxdiff.train.step.TrainState` whose params hold only
``{"vae": ...}``, so checkpointing, sharding, EMA and resume are the same
machinery as in the diffusion phase.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxdiff.models.autoencoder import AutoencoderConfig, vae_decode, vae_encode
from jaxdiff.train import optim
from jaxdiff.train.step import TrainState

RECON_LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class VAEStepConfig:
    """Static choices of the autoencoder step (hashable).

    Attributes:
      kl_weight: weight of the KL term. The KL is summed over latent elements and
        the reconstruction averaged over pixels, so the KL is divided by the pixel
        count: the ratio is then that of LDM's summed losses (1e-6 in SD's VAE).
      recon_loss: "l1" (sharper, as LDM) or "l2".
      ema_decay: max EMA decay of the VAE weights (None: no EMA).
      ema_warmup: ramp the decay up as (1 + step) / (10 + step).
      compute_dtype: activations' dtype (params stay fp32).
    """

    kl_weight: float = 1e-6
    recon_loss: str = "l1"
    ema_decay: float | None = None
    ema_warmup: bool = True
    compute_dtype: object = jnp.float32

    def __post_init__(self):
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"unknown recon_loss {self.recon_loss!r}; valid: {RECON_LOSSES}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    @property
    def trainable(self) -> tuple[str, ...]:
        """The networks this phase trains (for :func:`jaxdiff.train.step.init_state`)."""
        return ("vae",)


def vae_loss(
    params: dict,
    pixels: jax.Array,
    rng: jax.Array,
    *,
    config: AutoencoderConfig,
    cfg: VAEStepConfig,
) -> tuple[jax.Array, dict]:
    """Reconstruction + weighted KL of a batch.

    Args:
      params: the VAE params.
      pixels: [B, H, W, 3] in [-1, 1].
      rng: key for the posterior sample.

    Returns:
      ``(loss, {"recon", "kl"})``; ``kl`` is the mean per-example KL (summed over latents).
    """
    posterior = vae_encode(params, pixels, config, cfg.compute_dtype)
    z = posterior.sample(rng)
    recon = vae_decode(params, z, config, cfg.compute_dtype).astype(jnp.float32)
    diff = recon - pixels.astype(jnp.float32)
    rec = jnp.mean(jnp.abs(diff)) if cfg.recon_loss == "l1" else jnp.mean(jnp.square(diff))
    kl = jnp.mean(posterior.kl())
    pixels_per_image = pixels.shape[1] * pixels.shape[2] * pixels.shape[3]
    loss = rec + cfg.kl_weight * kl / pixels_per_image
    return loss, {"recon": rec, "kl": kl}


def make_vae_train_step(
    config: AutoencoderConfig,
    cfg: VAEStepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
):
    """Build ``train_step(state, batch, rng) -> (state, metrics)`` for the autoencoder.

    Args:
      config: the autoencoder's architecture (static).
      cfg: the step's static choices.
      tx: optimiser over ``{"vae": ...}``.
      schedule: learning-rate schedule, reported in the metrics.

    Returns:
      A pure step; ``batch`` is ``{"pixels": [B, H, W, 3]}`` and ``rng`` the run's
      base key (the step folds in ``state.step``).
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        pixels = batch["pixels"]
        (loss, aux), grads = jax.value_and_grad(
            lambda p: vae_loss(p["vae"], pixels, rng, config=config, cfg=cfg), has_aux=True
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if cfg.ema_decay is not None:
            decay = optim.ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup)
            ema = optim.ema_update(ema, params, decay)
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        metrics = {
            "loss": loss,
            "recon": aux["recon"],
            "kl": aux["kl"],
            "grad_norm": optim.grad_norm_metric(grads, opt_state),
        }  # param_norm: added by the training loop when it logs (see step.param_norm)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return train_step
