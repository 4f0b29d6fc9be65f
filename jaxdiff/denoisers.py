"""Model-output parameterisations and classifier-free guidance.

A diffusion network sees x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps and predicts
one of (Salimans & Ho 2022, sec. 4; Ho et al. 2020):

    "epsilon":       eps
    "v_prediction":  v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
    "sample":        x_0

``to_x0_eps`` turns any of them into the pair (x_0, eps) the solvers use, and
``from_x0`` goes back. ``classifier_free_guidance`` wraps a conditional network into the
``model_fn(x, t)`` the samplers call, evaluating the unconditional and conditional
branches in one batched call (Ho & Salimans 2022) with optional guidance rescale
(Lin et al. 2023, sec. 3.4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.schedules import PREDICTION_TYPES

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
"""model_fn(x_in, t) -> raw network output, the signature samplers call."""


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; "
            f"valid values: {list(PREDICTION_TYPES)}"
        )


def to_x0_eps(
    output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Converts a network output into (x_0, eps).

    Written so that alpha_bar = 0 (zero terminal SNR) is finite for "v_prediction"
    (x_0 = -v, eps = x_t); "epsilon" divides by sqrt(alpha_bar) and cannot be.

    Args:
      output: [B, ...] raw network output.
      x_t: [B, ...] the network's input (variance-preserving scale).
      alpha_bar: scalar (or broadcastable) alpha_bar of x_t.
      prediction_type: one of PREDICTION_TYPES.

    Returns:
      (x0, eps), each shaped like x_t.
    """
    _check(prediction_type)
    a = jnp.sqrt(alpha_bar).astype(x_t.dtype)  # sqrt(alpha_bar)
    s = jnp.sqrt(1 - alpha_bar).astype(x_t.dtype)  # sqrt(1 - alpha_bar)
    output = output.astype(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    return output, (x_t - a * output) / s


def from_x0(x0: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str):
    """The network output that corresponds to predicting ``x0`` at ``x_t``.

    Args:
      x0: [B, ...] predicted clean sample.
      x_t: [B, ...] noisy input (variance-preserving scale).
      alpha_bar: scalar (or broadcastable) alpha_bar of x_t.
      prediction_type: one of PREDICTION_TYPES.

    Returns:
      Output in the given parameterisation, shaped like x_t.
    """
    _check(prediction_type)
    a = jnp.sqrt(alpha_bar).astype(x_t.dtype)
    s = jnp.sqrt(1 - alpha_bar).astype(x_t.dtype)
    if prediction_type == "sample":
        return x0
    eps = (x_t - a * x0) / s
    if prediction_type == "epsilon":
        return eps
    return a * eps - s * x0


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale: jax.Array):
    """Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16).

    Rescales the guided prediction to the per-example std of the conditional one, then
    mixes: phi * rescaled + (1 - phi) * guided. Same as diffusers' rescale_noise_cfg
    (its unbiased stds cancel in the ratio).

    Args:
      guided: [B, ...] guided output.
      cond: [B, ...] conditional output.
      guidance_rescale: phi, scalar (traced is fine).

    Returns:
      [B, ...] rescaled output; exactly ``guided`` where phi == 0.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    phi = jnp.asarray(guidance_rescale, guided.dtype)
    mixed = phi * rescaled + (1 - phi) * guided
    # phi == 0 must not pick up a 0/0 from a constant prediction.
    return jnp.where(phi == 0, guided, mixed)


def guidance_context(cond: Any, uncond: Any) -> Any:
    """The guided call's conditioning batch: ``uncond`` and ``cond`` concatenated leaf
    by leaf along axis 0, [uncond; cond] (diffusers' order), as
    :func:`classifier_free_guidance` passes it to ``net_fn``."""
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def classifier_free_guidance(
    net_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    uncond: Any,
    guidance_scale: jax.Array | float,
    guidance_rescale: jax.Array | float = 0.0,
    *,
    shared_sample: bool = False,
) -> ModelFn:
    """Wraps a conditional network into a guided ``model_fn(x, t)``.

    out = out_uncond + w (out_cond - out_uncond) (Ho & Salimans 2022), then optional
    guidance rescale. Both branches run in ONE call of ``net_fn`` on the batch
    concatenated as [uncond; cond] (diffusers' order), so a sharded batch stays one
    kernel launch per step.

    Args:
      net_fn: net_fn(x, t, context) -> output, with x [2B, ...] and context the leaf-wise
        concatenation of ``uncond`` and ``cond`` along axis 0.
      cond: pytree of [B, ...] conditioning (e.g. prompt embeddings).
      uncond: same structure: unconditional / negative-prompt conditioning.
      guidance_scale: w; a traced scalar is fine (changing it does not recompile).
      guidance_rescale: phi in [0, 1]; traced is fine.
      shared_sample: pass x once, [B, ...], instead of [x; x]: for a ``net_fn``
        that takes a sample shared by a context batch twice its size and returns
        the [2B, ...] outputs of the tiled sample, as jaxdiff's UNet does (it then
        runs its layers before the first cross-attention once).

    Returns:
      model_fn(x [B, ...], t) -> guided output [B, ...].
    """
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError("cond and uncond must have the same pytree structure")
    for c, u in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
        if jnp.shape(c) != jnp.shape(u):
            raise ValueError(
                f"cond and uncond leaves must have equal shapes, got {jnp.shape(c)} (cond) "
                f"and {jnp.shape(u)} (uncond)"
            )
    context = guidance_context(cond, uncond)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = net_fn(x if shared_sample else jnp.concatenate([x, x], axis=0), t, context)
        if out.shape[0] != 2 * x.shape[0]:
            raise ValueError(
                f"classifier_free_guidance: net_fn returned a batch of {out.shape[0]} for "
                f"{x.shape[0]} samples; expected {2 * x.shape[0]} ([uncond; cond])"
            )
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        w = jnp.asarray(guidance_scale, out.dtype)
        guided = out_uncond + w * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, guidance_rescale)

    return model_fn
