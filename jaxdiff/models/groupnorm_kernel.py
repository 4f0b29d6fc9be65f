"""GroupNorm's statistics in one read of the input (Pallas, Triton backend): an experiment.

XLA:GPU computes a GroupNorm's two-pass statistics as two column reductions that each
read the whole input, and with few outputs ([16, 4096, 320] -> [16, 32, 10] in SD
1.5's UNet at batch 16) they run at ~1.4 TB/s on an H200: 1.9 ms of each batch-16 UNet
call (session 11's profile) for ~0.7 ms of traffic. Here one kernel reads each
[rows, 64 channels] tile once and writes per-channel partial statistics of the tile:
its mean (less the channel's first value, the "shift", so that a channel far from
zero keeps its precision) and the sum of squared deviations from that mean (M2), both
in fp32 and computed from the tile in registers (two passes over the registers, one
over memory). The group statistics then come from the partials exactly (Chan et al.'s
pairwise combination): mean = the mean of the tile means, M2 = the sum of the tiles'
M2 plus rows x the sum of the squared deviations of the tile means. That step reads
partials of 1/16 to 1/4 of the input's bytes.

Limits: rows (H x W) a multiple of ``TILE_ROWS`` or a power of two below it,
channels a multiple of ``CHANNEL_BLOCK`` (callers fall back otherwise; every SD 1.5
and VAE GroupNorm fits). No partitioning rule: for single-device programs (a program
sharded by XLA's SPMD partitioner would gather the input). Gradients come from the
same statistics in plain jax (a custom VJP).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["channel_stats", "channel_stats_reference", "group_stats", "fits"]

TILE_ROWS, CHANNEL_BLOCK = 256, 64
NUM_WARPS = 4


def _tile(rows: int) -> int:
    return min(TILE_ROWS, rows)


def fits(rows: int, channels: int) -> bool:
    """Whether [B, rows, channels] splits into the kernel's tiles."""
    tile = _tile(rows)
    return tile & (tile - 1) == 0 and rows % tile == 0 and channels % CHANNEL_BLOCK == 0


def channel_stats_reference(x: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """Per-tile, per-channel mean of ``x - x[:, :1]`` (each channel less its first row,
    the shift) and M2 in plain jax, fp32: the kernel's definition, gradient and test
    reference. x [B, R, C] -> two [B, R/tile, C]."""
    b, r, c = x.shape
    xf = x.astype(jnp.float32)
    xt = (xf - xf[:, :1, :]).reshape(b, r // tile, tile, c)
    mean = jnp.mean(xt, axis=2)
    m2 = jnp.sum(jnp.square(xt - mean[:, :, None, :]), axis=2)
    return mean, m2


def _stats_kernel(x_ref, first_ref, mean_ref, m2_ref) -> None:
    x = x_ref[...].astype(jnp.float32) - first_ref[...].astype(jnp.float32)
    mean = jnp.mean(x, axis=0)  # x: [tile, CHANNEL_BLOCK]
    d = x - mean[None, :]
    mean_ref[...] = mean
    m2_ref[...] = jnp.sum(d * d, axis=0)


def _pallas_stats(x, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, r, c = x.shape
    tile = _tile(r)
    out = pl.BlockSpec((None, None, CHANNEL_BLOCK), lambda i, t, k: (i, t, k))
    shape = jax.ShapeDtypeStruct((b, r // tile, c), jnp.float32)
    return pl.pallas_call(
        _stats_kernel,
        out_shape=(shape, shape),
        grid=(b, r // tile, c // CHANNEL_BLOCK),
        in_specs=[
            pl.BlockSpec((None, tile, CHANNEL_BLOCK), lambda i, t, k: (i, t, k)),
            pl.BlockSpec((None, 1, CHANNEL_BLOCK), lambda i, t, k: (i, 0, k)),  # row 0
        ],
        out_specs=(out, out),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=f"groupnorm_stats_{r}x{c}",  # profiles tell the shapes apart
    )(x, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def channel_stats(x: jax.Array, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-tile, per-channel mean of ``x - x[:, :1]`` and M2 (fp32), in one Pallas kernel.

    Args: x [B, R, C] (``fits(R, C)``); ``interpret``: Pallas' interpreter (any
    backend; tests). Returns (mean, m2), each [B, R / tile, C] with ``tile =
    min(TILE_ROWS, R)``. The shift keeps the means small where a channel is far from
    zero (fp32 tile means of ~100 would round at ~1e-5); the group step adds it back."""
    b, r, c = x.shape
    if not fits(r, c):
        raise ValueError(
            f"channel_stats: {r} rows x {c} channels do not split into tiles of "
            f"{_tile(r)} rows (a power of two) and {CHANNEL_BLOCK} channels"
        )
    return _pallas_stats(x, interpret)


def _fwd(x, interpret):
    return channel_stats(x, interpret), x


def _bwd(interpret, x, cotangents):
    del interpret
    _, vjp = jax.vjp(lambda a: channel_stats_reference(a, _tile(a.shape[1])), x)
    return vjp(cotangents)


channel_stats.defvjp(_fwd, _bwd)


def group_stats(
    parts: Sequence[jax.Array], offset: jax.Array | None, groups: int, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """GroupNorm's mean and (biased) variance of ``x + offset`` per sample and group.

    ``parts``: x [B, R, C], or arrays [B, R, C_i] whose concatenation along channels is
    x (each part's statistics are taken where it is: a concatenation is not written
    out for them); channels in ``groups`` consecutive groups; offset [B, C] (added to
    every row) or None. Returns two [B, G] fp32 arrays, from :func:`channel_stats`."""
    stats = [channel_stats(p, interpret) for p in parts]
    mean_c, m2_c = (jnp.concatenate(s, axis=-1) for s in zip(*stats, strict=True))
    shift = jnp.concatenate([p[:, 0, :].astype(jnp.float32) for p in parts], axis=-1)
    if offset is not None:
        shift = shift + offset.astype(jnp.float32)
    b, r, c = parts[0].shape[0], parts[0].shape[1], shift.shape[-1]
    tile, cg = _tile(r), c // groups
    shift = shift.reshape(b, 1, groups, cg)
    mean_c = mean_c.reshape(b, r // tile, groups, cg)
    m2_c = m2_c.reshape(b, r // tile, groups, cg)
    # Each tile mean about the group's first shift: three sibling sums that XLA fuses
    # into one reduction (the spread about the group mean itself would need a second).
    first = shift[:, :, :, :1]
    d = (shift - first) + mean_c
    n = mean_c.shape[1] * cg
    s1, s2, m2 = (jnp.sum(a, axis=(1, 3)) for a in (d, d * d, m2_c))
    spread = jnp.maximum(s2 - s1 * s1 / n, 0.0)
    mean = first[:, 0, :, 0] + s1 / n
    var = (m2 + tile * spread) / (r * cg)
    return mean, var
