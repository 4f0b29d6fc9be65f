"""Optimiser, learning-rate schedule, trainable-parameter masks and EMA.

Which networks train is a label tree over the params (``"train"`` /
``"freeze"``), and the optimiser is an ``optax.multi_transform`` over it:
fine-tuning methods that train a subset (only the UNet, UNet + text encoder,
later LoRA adapters or textual-inversion embeddings) are a different label
function, not a different trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxdiff import layouts, parallel

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

# Every conv kernel's gradient pinned to the default (row-major [h, w, in, out]) layout
# before AdamW (`pin_layouts`, in `make_optimizer`'s chain). Without it XLA runs AdamW's
# update of each conv kernel in the layout of cuDNN's weight gradient ([out, h, w, in]):
# the fused update transposes the fp32 param and both moments in and all three results
# out, then copies the results into the donated buffers (session 10's H200 profile: 13 +
# 3.5 ms of a 90 ms step; an optimization barrier did not help, the layout went through
# it). Measured on an H200 (session 11): 106.5 -> 88.5 ms per step at SD 1.5 shapes,
# batch 8. None: on for the CPU and GPU backends (measured), off elsewhere (TPU layouts
# are tiled; unmeasured); True / False force it (benchmarks/gpu.py's
# "train_grad_layout" experiment).
_GRAD_LAYOUT: bool | None = None

# Where the pin goes: after the clipping (True), whose norm then reads each gradient in
# the layout it comes in; or first, before the clipping (False; the form measured in
# session 11). Pinned first, the norm reads the pinned gradients: XLA transposes each
# large conv-kernel gradient once for the norm's squares and again for the update (63 +
# 30 transpose kernels per SD 1.5 step writing 1.1 ms of traffic, deviceless).
_PIN_AFTER_CLIP = True

# Clipping and AdamW see every trainable leaf with fewer than this many elements
# (biases, norm scales, small kernels: 406 of SD 1.5's 686 UNet leaves, 0.05 % of its
# elements) as one flat vector per dtype (`pack_small_leaves`). Their moments are then
# two arrays instead of 812, and their update one kernel instead of hundreds of tiny
# ones. The threshold is FSDP's (`parallel.DEFAULT_MIN_FSDP_SIZE`): such leaves are
# replicated anyway, and so is the packed vector (`parallel.REPLICATED_KEY`). 0 turns
# the packing off (the optimizer state's structure then differs: checkpoints of the two
# forms do not mix).
_PACK_SMALL_BELOW = parallel.DEFAULT_MIN_FSDP_SIZE


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
    fsdp_min_size: int = parallel.DEFAULT_MIN_FSDP_SIZE,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the ``"train"`` leaves, zero updates elsewhere.

    ``mu_dtype``: the dtype of AdamW's first moment (None: the params'). ``bfloat16``
    halves its memory (SD 1.5's UNet: 3.4 -> 1.7 GB) and its share of the update's
    memory traffic; the second moment keeps the params' dtype (fp32 master weights:
    its range needs it).

    With ``accumulation_steps > 1`` it is wrapped in ``optax.MultiSteps``:
    gradients are averaged over that many calls and the params move on the last.
    The leaves below ``_PACK_SMALL_BELOW`` elements, and below ``fsdp_min_size`` (the
    one the state is sharded with: only replicated leaves are packed), go through
    clipping and AdamW as one vector (`pack_small_leaves`). The clipping records the
    gradients' norm (`grad_norm_metric`), then the gradients' layouts are pinned
    (`pin_layouts`) before AdamW.
    """
    clip, pin = clip_by_global_norm(clip_norm or None), pin_layouts()
    train = optax.chain(
        *((clip, pin) if _PIN_AFTER_CLIP else (pin, clip)),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype),
    )
    if _FLAT_OPTIMIZER:
        train = optax.flatten(train)
    elif min(_PACK_SMALL_BELOW, fsdp_min_size) > 0:
        train = pack_small_leaves(train, min(_PACK_SMALL_BELOW, fsdp_min_size))
    tx = optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels)
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx


def _pin_grad_layouts() -> bool:
    if _GRAD_LAYOUT is not None:
        return _GRAD_LAYOUT
    return jax.default_backend() in ("cpu", "gpu")


def pin_grad_layouts(grads: Any) -> Any:
    """``grads`` with each conv kernel's gradient pinned to the default layout (where
    ``_GRAD_LAYOUT`` says so; see there), for use inside a jitted step. Values
    unchanged."""
    return layouts.default_layouts(grads) if _pin_grad_layouts() else grads


def pin_layouts() -> optax.GradientTransformation:
    """`pin_grad_layouts` as a stateless transformation, for an optimizer's chain: after
    the clipping (whose norm reads the gradients in any layout) and before the update
    that writes the parameters and moments in place."""
    return optax.stateless(lambda updates, params=None: pin_grad_layouts(updates))


class GradNormState(NamedTuple):
    """`clip_by_global_norm`'s state: the global norm of the last gradients it saw."""

    grad_norm: jax.Array


def clip_by_global_norm(max_norm: float | None) -> optax.GradientTransformation:
    """Scales the updates by ``min(1, max_norm / norm)`` (optax's clipping rule) and
    keeps their global L2 norm in its state (`grad_norm_metric` reads it).

    A step that reports the gradient norm then reports the clipping's own, computed
    once: a second norm over the same leaves is not merged by XLA when the optimizer
    sees them packed (`pack_small_leaves`) and the step sees them leaf by leaf.

    Args:
      max_norm: the largest norm let through; None records the norm and clips nothing.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0 or None, got {max_norm}")

    def init_fn(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        del state, params
        norm = optax.tree.norm(updates)
        if max_norm is not None:
            clipped = norm >= max_norm
            updates = jax.tree.map(
                lambda g: jnp.where(clipped, (g / norm.astype(g.dtype)) * max_norm, g), updates
            )
        return updates, GradNormState(norm.astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def grad_norm_metric(grads: Any, opt_state: Any) -> jax.Array:
    """The step's ``grad_norm``: the norm `clip_by_global_norm` recorded in this step's
    ``opt_state``. With gradient accumulation (``optax.MultiSteps``, whose optimizer
    runs only every k-th call) or no recorded norm: the norm of ``grads``."""
    is_state = lambda x: isinstance(x, GradNormState | optax.MultiStepsState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if len(found) == 1 and isinstance(found[0], GradNormState):
        return found[0].grad_norm
    return optax.tree.norm(grads)


def _plan(tree: Any, below: int) -> tuple[list, Any, dict[str, list[int]], list[int]]:
    """(leaves, treedef, {packed key: indices of the small leaves}, indices of the rest)."""
    leaves, treedef = jax.tree.flatten(tree)
    small: dict[str, list[int]] = {}
    large: list[int] = []
    for i, leaf in enumerate(leaves):
        if math.prod(leaf.shape) < below:
            key = f"{parallel.REPLICATED_KEY}{jnp.dtype(leaf.dtype).name}"
            small.setdefault(key, []).append(i)
        else:
            large.append(i)
    return leaves, treedef, small, large


def _pack(tree: Any, below: int) -> dict:
    """``{packed key: flat vector of the small leaves, "large": [the other leaves]}``."""
    leaves, _, small, large = _plan(tree, below)
    packed = {k: jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]) for k, idx in small.items()}
    packed["large"] = [leaves[i] for i in large]
    return packed


def _unpack(packed: dict, like: Any, below: int) -> Any:
    """`_pack`'s inverse, into the structure and shapes of ``like``."""
    leaves, treedef, small, large = _plan(like, below)
    out = [None] * len(leaves)
    for key, idx in small.items():
        offset = 0
        for i in idx:
            n = math.prod(leaves[i].shape)
            out[i] = packed[key][offset : offset + n].reshape(leaves[i].shape)
            offset += n
    for i, leaf in zip(large, packed["large"], strict=True):
        out[i] = leaf
    return jax.tree.unflatten(treedef, out)


class PackedSmallState(NamedTuple):
    """`pack_small_leaves`'s state: the inner transformation's, over the packed tree."""

    inner: Any


def pack_small_leaves(
    inner: optax.GradientTransformation, below: int
) -> optax.GradientTransformation:
    """``inner`` applied to a tree whose leaves with fewer than ``below`` elements are
    concatenated into one flat vector per dtype, the larger leaves as they are.

    For element-wise transformations (AdamW, scaling) and global-norm clipping the
    updates are the same as ``inner``'s on the plain tree, up to the order of the
    norm's sums. What changes is the number of arrays: the moments of many small
    leaves become one vector each, so a jitted step has fewer arguments to donate and
    fewer small kernels to launch. The packed vectors sit under keys starting with
    `parallel.REPLICATED_KEY`, which `parallel.param_shardings` keeps replicated.

    Args:
      inner: the transformation to wrap (e.g. clipping chained with AdamW).
      below: leaves with fewer elements than this are packed.

    Returns:
      An ``optax.GradientTransformation`` whose state is a `PackedSmallState`.
    """
    if below < 1:
        raise ValueError(f"pack_small_leaves: below must be >= 1, got {below}")

    def init_fn(params):
        return PackedSmallState(inner.init(_pack(params, below)))

    def update_fn(updates, state, params=None):
        packed_params = None if params is None else _pack(params, below)
        new, inner_state = inner.update(_pack(updates, below), state.inner, packed_params)
        return _unpack(new, updates, below), PackedSmallState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


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
