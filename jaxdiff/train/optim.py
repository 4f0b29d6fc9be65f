"""Optimiser, learning-rate schedule, trainable-parameter masks and EMA.

Which networks train is a label tree over the params (``"train"`` /
``"freeze"``), and the optimiser is an ``optax.multi_transform`` over it:
fine-tuning methods that train a subset (only the UNet, UNet + text encoder,
later LoRA adapters or textual-inversion embeddings) are a different label
function, not a different trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

TRAIN, FREEZE = "train", "freeze"

# Experiment switch (benchmarks/gpu.py "train_flat_optimizer"): clipping and AdamW over
# one flat vector of all trainable parameters (``optax.flatten``) instead of leaf by
# leaf: one moment array each instead of one per parameter (686 for SD 1.5's UNet),
# a few large fused kernels instead of ~1200 small ones per step, and each gradient
# written out in the parameters' own layout by the concatenation. Costs one more pass
# over the gradients and the updates (flatten, unflatten). Changes the optimizer
# state's structure, so checkpoints of the two forms do not mix. H200, session 11
# (before the gradient-layout pin): 106.5 -> 97.1 ms per step, the compile 108 -> 51 s.
# Not for sharded training: on an FSDP mesh the flat vector's shards cut across the
# parameters' shards (tests' 2 x 4 mesh: all-gathers 144 -> 488, collective-permutes
# 33 -> 650 per step).
_FLAT_OPTIMIZER = False


def trainable_labels(params: Mapping[str, Any], trainable: Sequence[str]) -> dict:
    """Label each leaf ``"train"`` if its top-level network is in ``trainable``.

    Args:
      params: ``{"unet": ..., "vae": ..., "text_encoder": ...}`` (params or
        abstract ShapeDtypeStructs).
      trainable: top-level names to train, e.g. ``("unet",)``.
    """
    unknown = set(trainable) - set(params)
    if unknown:
        raise ValueError(f"cannot train {sorted(unknown)}: the params hold {sorted(params)} only")
    flat = traverse_util.flatten_dict(dict(params))
    labels = {k: TRAIN if k[0] in trainable else FREEZE for k in flat}
    return traverse_util.unflatten_dict(labels)


def learning_rate_schedule(
    lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine", end_factor: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` then ``constant`` or ``cosine`` decay to ``lr*end_factor``."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {kind!r}; valid: 'constant', 'cosine'")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay = max(total_steps - warmup_steps, 1)
        after = optax.cosine_decay_schedule(lr, decay, alpha=end_factor)
    return optax.join_schedules([warmup, after], [max(warmup_steps, 1)])


def make_optimizer(
    labels: Any,
    schedule: optax.Schedule,
    *,
    weight_decay: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the ``"train"`` leaves, zero updates elsewhere.

    With ``accumulation_steps > 1`` it is wrapped in ``optax.MultiSteps``:
    gradients are averaged over that many calls and the params move on the last.
    """
    inner = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    inner.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    train = optax.chain(*inner)
    if _FLAT_OPTIMIZER:
        train = optax.flatten(train)
    tx = optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels)
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx


def ema_decay(step: jax.Array, max_decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay at ``step``: ``min(max_decay, (1 + step) / (10 + step))`` with warmup.

    The warmup keeps early averages from being dominated by the random init.
    """
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )


def select(tree: Mapping[str, Any], names: Sequence[str]) -> dict:
    """The sub-dict of top-level ``names``."""
    return {k: tree[k] for k in names}


Loss = Callable[..., tuple[jax.Array, dict]]
