"""The diffusers-Flax 0.39 train step that both benchmark scripts time for that peer.

It follows diffusers' ``examples/text_to_image/train_text_to_image_flax.py``: frozen
CLIP, DDPM noising at uniform random timesteps, MSE on the predicted noise,
global-norm clipping and AdamW, the state ``(params, opt_state, step)``. Imported
only inside the diffusers-Flax workers (it needs jax and optax; ``common.py`` stays
stdlib + numpy).
"""

from __future__ import annotations

from typing import Any


def diffusers_flax_train_step(
    unet: Any, text_encoder: Any, text_params: Any, noise_scheduler: Any, lr: float
) -> tuple[Any, Any]:
    """(optax transform, ``step(state, batch, rng) -> (state, loss)``), not jitted.

    ``unet`` is a ``FlaxUNet2DConditionModel`` (its ``dtype`` is the compute dtype;
    the params in the state keep theirs), ``noise_scheduler`` a
    ``FlaxDDPMScheduler``; ``batch`` holds ``latents`` (NCHW) and ``input_ids``.
    The loss is taken in fp32.
    """
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
    )
    sched_state = noise_scheduler.create_state()
    n_train = noise_scheduler.config.num_train_timesteps

    def step(state, batch, rng):
        params, opt_state, count = state
        k_noise, k_t = jax.random.split(jax.random.fold_in(rng, count))
        latents = batch["latents"]
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, n_train)
        noisy = noise_scheduler.add_noise(sched_state, latents, noise, t)
        ctx = text_encoder(batch["input_ids"], params=text_params, train=False)[0]

        def loss_fn(p):
            pred = unet.apply({"params": p}, noisy, t, ctx, train=False).sample
            return jnp.mean(jnp.square(noise - pred.astype(jnp.float32)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, count + 1), loss

    return tx, step
