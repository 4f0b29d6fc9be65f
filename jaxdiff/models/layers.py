"""Convolutional building blocks shared by the UNet and the autoencoder, NHWC.

Each module mirrors the diffusers module of the same name and names its
submodules the same way (``norm1``, ``conv1``, ``time_emb_proj``, ...), so a
PyTorch state dict maps onto the params tree by the fixed rule in
:mod:`jaxdiff.weights.common`.

Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``) and
``param_dtype`` (the storage dtype of its params, fp32 by default). Group
normalisation always computes its statistics in fp32: with bf16 activations
the per-group variance of a 64x64x320 feature map loses most of its digits
otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import groupnorm_kernel

Dtype = Any
_NHWC_DN = ("NHWC", "HWIO", "NHWC")

__all__ = [
    "GroupNorm",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "TimestepEmbedding",
    "timestep_embedding",
    "conv3x3",
    "conv_general_dilated",
    "upsample2x_conv3x3",
    "Conv",
    "tile_batch",
    "gelu_erf",
    "pallas_switch_on",
    "dense",
]


def dense(params: Any, x: jax.Array, dtype: Dtype) -> jax.Array:
    """``nn.Dense`` applied with the given params (``kernel`` [, ``bias``]) to ``x``:
    weights built outside a module (precomputed or joined ones), the same product.
    Usable inside a module's method (the Dense is created unbound)."""
    layer = nn.Dense(
        params["kernel"].shape[-1], use_bias="bias" in params, dtype=dtype, parent=None
    )
    return layer.apply({"params": params}, x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch writes it, ``0.5 x (1 + erf(x / sqrt(2)))``, in fp32; ``x``'s dtype.

    ``jax.nn.gelu(approximate=False)`` computes ``0.5 x erfc(-x / sqrt(2))``; XLA's
    erfc evaluates two polynomials and an exp per element where erf is one rational
    polynomial: GEGLU's product 0.36 -> 0.15 ms for [2, 1024, 512] on this CPU. This
    form is torch.nn.functional.gelu's (so diffusers' and transformers'); the results
    differ from PyTorch's by rounding, and below x = -5.4, where XLA's fp32 erf is
    already -1, by returning 0 for values of ~-1e-7 (about 1e-6 absolute at most).
    It computes in fp32 for half-precision inputs (jax.nn.gelu scales bf16 input by a
    bf16 1/sqrt(2)).
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(0.5**0.5)))).astype(x.dtype)


def tile_batch(a: jax.Array, n: int) -> jax.Array:
    """``a`` [b, ...] as [a; a; ...] with n rows (n a multiple of b); ``a`` itself if b == n.

    The layout of a classifier-free guidance batch, whose halves share one sample:
    the UNet keeps such a shared sample at its own batch until the first layer that
    reads the text context, and tiles it (and what it adds later) there.
    """
    b = a.shape[0]
    if b == n:
        return a
    if b == 0 or n % b:
        raise ValueError(f"cannot tile a batch of {b} to {n}: {n} is not a multiple of {b}")
    return jnp.concatenate([a] * (n // b), axis=0)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs):
    """``lax.conv_general_dilated`` for ``nn.Conv``, with CPU paths where XLA:CPU is slow.

    Two kinds of convolution run much slower on XLA:CPU than the same sum as a
    matrix product (measured on 2 cores, fp32; benchmarks/NOTES.md):

    - 1x1 convolutions (resnet ``conv_shortcut``, the transformers' ``proj_in`` /
      ``proj_out``): 2-7x forward, 2-3.5x gradient, e.g. 24.6 -> 3.5 ms for
      [2, 256, 256, 64] -> 32 channels. They become one [B*H*W, C] x [C, O] dot.
    - convolutions whose output is smaller than the kernel (a 3x3 conv on a 2x2
      map, at the bottom of a small UNet): 3-18x. The ``kh*kw`` shifted windows
      are gathered into one [B*H'*W', kh*kw*C] matrix and multiplied by the
      kernel reshaped to [kh*kw*C, O]. From 4x4 maps up the patches were no
      faster forward (up to 2.4x slower) and at most 1.5x faster in the
      gradient, so the native conv is kept.

    And with one CPU device, fp32 3x3 convolutions of the shapes in
    ``_eigen_conv_is_faster`` are written so that XLA picks its multi-threaded
    Eigen kernel over a YNNPACK one that uses one core (``_conv3x3_eigen``).

    These apply on the CPU backend to an NHWC/HWIO conv (what ``nn.Conv`` emits)
    without dilation or groups; everything else goes to ``lax.conv_general_dilated``.
    With ``_GPU_1X1_DOT`` the 1x1 convolutions are dots on a GPU too (see there).
    """
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    if isinstance(padding, str) and (kh, kw) == (1, 1) and tuple(window_strides) == (1, 1):
        padding = ((0, 0), (0, 0))  # SAME and VALID agree for a 1x1 stride-1 kernel
    backend = jax.default_backend()
    simple = (
        backend in ("cpu", "gpu")
        and lhs.ndim == 4
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in kwargs.get("lhs_dilation") or (1,))
        and all(d in (None, 1) for d in kwargs.get("rhs_dilation") or (1,))
        and kwargs.get("feature_group_count", 1) == 1
        and _is_nhwc(kwargs.get("dimension_numbers"))
    )
    if simple:
        _, _, c, o = rhs.shape
        (pt, pb), (pl, pr) = padding
        sh, sw = window_strides
        precision = kwargs.get("precision")
        b = lhs.shape[0]
        pointwise = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any((pt, pb, pl, pr))
        if pointwise and (backend == "cpu" or _GPU_1X1_DOT):
            out = jnp.dot(lhs.reshape(-1, c), rhs.reshape(c, o), precision=precision)
            return out.reshape(*lhs.shape[:3], o)
        if backend != "cpu":
            return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
        ho = (lhs.shape[1] + pt + pb - kh) // sh + 1
        wo = (lhs.shape[2] + pl + pr - kw) // sw + 1
        if min(ho, wo) < max(kh, kw):
            x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            windows = [
                x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
                for i in range(kh)
                for j in range(kw)
            ]
            patches = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * c)
            out = jnp.dot(patches, rhs.reshape(kh * kw * c, o), precision=precision)
            return out.reshape(b, ho, wo, o)
        if (
            (kh, kw, sh, sw, pt, pb, pl, pr) == (3, 3, 1, 1, 1, 1, 1, 1)
            and _CPU_EIGEN_CONV
            and lhs.dtype == rhs.dtype == jnp.float32
            and jax.local_device_count() == 1
            and _eigen_conv_is_faster(lhs.shape, o)
        ):
            return _conv3x3_eigen(lhs, rhs, precision)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


# XLA:CPU (jax 0.10) gives a 3x3 convolution to YNNPACK unless its output is larger
# than its input along a spatial axis, and then to Eigen. For some shapes YNNPACK runs
# on one core where Eigen uses all of them; there the convolution is computed with one
# extra output column (padding 2 on the right), which XLA gives to Eigen, and the
# column is dropped. Measured on the 2-core benchmark machine, fp32, forward
# (benchmarks/NOTES.md, session 6): 64 output channels from 64-192 input channels on
# maps up to 32x32 (e.g. [2, 32, 32, 192] -> 64 4.7 -> 2.9 ms, [8, 32, 32, 64] -> 64
# 6.3 -> 3.6 ms), and 32 -> 32 channels on maps from 64x64 ([1, 256, 256, 32] 12.1 ->
# 7.5 ms). Elsewhere (128 output channels; 64 output channels on 128x128 maps; 3 or 4
# channels in or out; 32 -> 32 on maps up to 32x32, mixed: the digits VAE's gradient
# step 406 -> 413 ms with them) Eigen was slower or no faster. The gradient is the
# plain convolution's (Eigen's form of it was 1.6x slower in the train step). Only
# with one CPU device: with one device per core (``--xla_force_host_platform_device_count``)
# every core already runs a YNNPACK kernel and the rule measured no faster
# (text-to-image 3.18 vs 3.22 s). False turns it off.
_CPU_EIGEN_CONV = True

# GPU: the 1x1 convolutions (the transformers' proj_in / proj_out, the resnets'
# conv_shortcut; 46 in SD 1.5's UNet) as [B*H*W, C] x [C, O] dots, cuBLAS GEMMs instead
# of cuDNN convolutions. cuDNN's NHWC convolution reads its kernel as [O, H, W, I], so
# XLA transposes each of these kernels at every call (a dot reads [C, O] as it is),
# and each cuDNN convolution is launched outside XLA's CUDA graphs, which take cuBLAS
# GEMMs. Off until a GPU has timed it (experiment ``conv1x1_dot``, session 19).
_GPU_1X1_DOT = False


def _eigen_conv_is_faster(lhs_shape: tuple[int, ...], out_channels: int) -> bool:
    _, h, w, c = lhs_shape
    if out_channels == 64:
        return 64 <= c <= 192 and h * w <= 32 * 32
    return c == out_channels == 32 and h * w >= 64 * 64


def _plain_conv3x3(lhs: jax.Array, rhs: jax.Array, precision: Any) -> jax.Array:
    return jax.lax.conv_general_dilated(
        lhs, rhs, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC_DN, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_eigen(lhs: jax.Array, rhs: jax.Array, precision: Any) -> jax.Array:
    """3x3 convolution, stride 1, padding 1 (NHWC/HWIO), in the form XLA:CPU gives to Eigen."""
    wide = jax.lax.conv_general_dilated(
        lhs, rhs, (1, 1), ((1, 1), (1, 2)), dimension_numbers=_NHWC_DN, precision=precision
    )
    return wide[:, :, : lhs.shape[2]]


def _conv3x3_eigen_fwd(lhs, rhs, precision):
    return _conv3x3_eigen(lhs, rhs, precision), (lhs, rhs)


def _conv3x3_eigen_bwd(precision, res, g):
    # The convolution is linear in each operand, so the plain form's VJP needs only them;
    # its forward is dead code under jit.
    lhs, rhs = res
    _, vjp = jax.vjp(lambda x, k: _plain_conv3x3(x, k, precision), lhs, rhs)
    return vjp(g)


_conv3x3_eigen.defvjp(_conv3x3_eigen_fwd, _conv3x3_eigen_bwd)


def _is_nhwc(dimension_numbers: Any) -> bool:
    """Whether ``dimension_numbers`` say NHWC input, HWIO kernel, NHWC output."""
    if dimension_numbers is None:
        return False
    nhwc = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC_DN)
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, nhwc))


def Conv(features: int, kernel_size: tuple[int, int], **kwargs: Any) -> nn.Conv:  # noqa: N802
    """``nn.Conv`` running :func:`conv_general_dilated`: every convolution of the models."""
    return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


def conv3x3(features: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
    """A 3x3 convolution with symmetric padding 1 (PyTorch's ``padding=1``).

    Flax's default ``"SAME"`` padding is asymmetric for stride 2 (0 before, 1
    after), which is not what the PyTorch models do, so padding is explicit.
    """
    return Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


# GroupNorm statistics in one read of x instead of two, about a shift (see
# GroupNorm). "auto": on CPU, where it measured faster (benchmarks/NOTES.md, session
# 6: UNet b2 168 -> 164 ms, b8 613 -> 601 ms, same process); other backends keep two
# passes until benchmarks/gpu.py's "groupnorm_one_pass" experiment (which sets True)
# has measured it.
_ONE_PASS_GROUPNORM: bool | str = "auto"
# The one-pass statistics' sums in two steps, positions then channels (see GroupNorm);
# "auto": on CPU, the backend whose merged reduction it works around.
_GROUPNORM_SPLIT_SUMS: bool | str = "auto"
# The two-pass statistics (the default off the CPU) with each sum in two steps: over
# the last spatial axis first (a reduction with many outputs), then the rest. On the
# H200 a batch-16 UNet's GroupNorm sums run as one column reduction per pass, e.g.
# [16, 4096, 320] -> [16, 320] at ~1.4 TB/s (1.9 ms of each call); the staged form
# gives the first step far more parallel outputs. Off until benchmarks/gpu.py's
# "groupnorm_staged_sums" experiment has measured it.
_GROUPNORM_STAGED_SUMS: bool = False
# The statistics from one Pallas kernel that reads x once (``groupnorm_kernel``), on a
# GPU, when the shapes split into its tiles: False (default), True, or "interpret"
# (Pallas' interpreter on any backend, for tests). Off until benchmarks/gpu.py's
# "groupnorm_pallas" experiment has measured it.
_GROUPNORM_PALLAS: bool | str = False


# The resnets' time embedding added inside norm2, in fp32 (GroupNorm's ``offset``),
# rather than to conv1's output before it: the default of ResnetBlock2D's
# ``temb_in_norm=None``. XLA's GPU compiler folds the add after conv1 into conv1's
# cuDNN call as a side input, which needs the broadcast embedding written out at full
# size first: 22 kernels and ~0.7 GB of traffic per batch-16 SD 1.5 UNet call or
# sampler step (benchmarks/gpu_hlo.py). Inside the norm it fuses into the norm's
# kernels. The same numbers in fp32; in bf16 the add itself is fp32 now. The train
# step keeps the add after conv1 (temb_in_norm=False): its backward moves ~0.2 ms
# more per step the other way. An experiment switch (benchmarks/gpu.py's
# "temb_side_input" sets False).
_TEMB_IN_NORM = True


def _cpu_unless_set(switch: bool | str) -> bool:
    """A module switch's value: as set, or for "auto" whether the backend is the CPU."""
    return jax.default_backend() == "cpu" if switch == "auto" else bool(switch)


def _plain_mean(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.mean(a, axis=axes, keepdims=True)


def _staged_mean(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``jnp.mean(a, axes, keepdims=True)`` for ``a`` [B, *spatial, G, C/G] (``axes``:
    the spatial ones and the last), summed over the last spatial axis first; the
    barrier keeps XLA from merging the two reductions back into one."""
    last = axes[-2]
    partial = jax.lax.optimization_barrier(jnp.sum(a, axis=last, keepdims=True))
    n = math.prod(a.shape[i] for i in axes)
    return jnp.sum(partial, axis=axes, keepdims=True) / n


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over NHWC (or any channels-last) input.

    Statistics and the affine transform are computed in fp32 whatever the
    compute dtype; the result is cast to ``dtype``. Params: ``scale`` and
    ``bias``, each [C].

    Attributes:
      num_groups: G; must divide the channel count C.
      epsilon: added to the variance (diffusers: 1e-5 in UNet resnets, 1e-6 in
        transformer blocks' input norm and in the VAE).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        offset: jax.Array | None = None,
        parts: Sequence[jax.Array] | None = None,
    ) -> jax.Array:
        """Normalise ``x`` [B, ..., C] per (sample, group); returns the same shape in ``dtype``.

        ``offset`` [B, C]: added to ``x`` first, in fp32, at every position (the
        resnets' time embedding). ``parts``: arrays whose concatenation along the
        channels is ``x`` (an up-block's input and skip), for the statistics of
        ``_GROUPNORM_PALLAS``, which then read them where they are; else unused."""
        c = x.shape[-1]
        if x.ndim < 2 or c % self.num_groups != 0:
            raise ValueError(
                f"GroupNorm: {c} channels (input shape {x.shape}) cannot be split into "
                f"{self.num_groups} groups"
            )
        if parts is not None and (
            sum(p.shape[-1] for p in parts) != c or any(p.shape[:-1] != x.shape[:-1] for p in parts)
        ):
            raise ValueError(
                f"GroupNorm: parts {[p.shape for p in parts]} do not make up x {x.shape}"
            )
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        if offset is not None:
            xf = xf + offset.astype(jnp.float32).reshape(x.shape[0], *[1] * (x.ndim - 2), c)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        # Reduce over every spatial axis and the channels inside a group.
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        if _pallas_stats(x, parts):
            # One read of x for per-tile channel statistics, combined exactly.
            b, rows = x.shape[0], math.prod(x.shape[1:-1])
            flat = [p.reshape(b, rows, p.shape[-1]) for p in (parts or [x])]
            stats = groupnorm_kernel.group_stats(
                flat, offset, self.num_groups, _GROUPNORM_PALLAS == "interpret"
            )
            mean, var = (a.reshape(b, *[1] * (x.ndim - 2), self.num_groups, 1) for a in stats)
        elif x.ndim >= 3 and _cpu_unless_set(_ONE_PASS_GROUPNORM):
            # Both sums in one read of x (XLA fuses sibling reductions), taken about a
            # shift: each group's mean over the first row, so that E[d^2] - E[d]^2
            # does not cancel when a group's |mean| >> std. The variance does not
            # depend on the shift, so it needs no gradient.
            shift = jax.lax.stop_gradient(jnp.mean(g[:, :1], axis=axes, keepdims=True))
            d = g - shift
            # Per-channel sums over the positions first, then over a group's channels.
            # XLA would merge the two reductions into one over [..., G, C/G], which
            # XLA:CPU runs 1.5-2.8x slower (C/G is 2-8 in Stable Diffusion); there
            # the barrier keeps them apart.
            spatial = axes[:-1]
            sums = tuple(jnp.sum(a, axis=spatial, keepdims=True) for a in (d, d * d))
            if _cpu_unless_set(_GROUPNORM_SPLIT_SUMS):
                sums = jax.lax.optimization_barrier(sums)
            s1, s2 = sums
            n = math.prod(g.shape[a] for a in axes)
            m1 = jnp.sum(s1, axis=-1, keepdims=True) / n
            var = jnp.maximum(jnp.sum(s2, axis=-1, keepdims=True) / n - m1**2, 0.0)
            mean = shift + m1
        else:
            mean_of = _staged_mean if x.ndim >= 4 and _GROUPNORM_STAGED_SUMS else _plain_mean
            mean = mean_of(g, axes)
            # Two-pass: E[(x - mean)^2] does not cancel catastrophically like E[x^2] - mean^2.
            var = mean_of(jnp.square(g - mean), axes)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def pallas_switch_on(switch: bool | str) -> bool:
    """Whether a Pallas kernel's switch (False, True: on a GPU, "interpret": Pallas'
    interpreter on any backend) lets it run on this backend."""
    return switch == "interpret" or (bool(switch) and jax.default_backend() == "gpu")


def _pallas_stats(x: jax.Array, parts: Sequence[jax.Array] | None) -> bool:
    """Whether GroupNorm takes its statistics from ``groupnorm_kernel`` for ``x``
    (given as ``parts`` when not None)."""
    if not pallas_switch_on(_GROUPNORM_PALLAS) or x.ndim < 3:
        return False
    rows = math.prod(x.shape[1:-1])
    return all(groupnorm_kernel.fits(rows, p.shape[-1]) for p in (parts or [x]))


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm residual block, ``time_embedding_norm="default"``).

    ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, None, None]``,
    ``h = conv2(dropout(silu(norm2(h))))``, output ``shortcut(x) + h``, where the
    shortcut is a 1x1 ``conv_shortcut`` only when the channel count changes
    (``output_scale_factor`` is 1 in every Stable Diffusion model).

    ``temb`` is optional: called without it the block has no ``time_emb_proj``
    params at all, which is the autoencoder's variant (``temb_channels=None``).
    ``temb_proj`` instead of ``temb`` is ``time_emb_proj(silu(temb))`` computed
    outside (the UNet's merged time-embedding projections); ``time_emb_proj``'s
    params are then not read (initialise with ``temb``).

    Attributes:
      out_channels: output channels; ``None`` keeps the input's.
      groups: GroupNorm groups for both norms.
      eps: GroupNorm epsilon (the UNet's ``norm_eps``).
      dropout: dropout rate before ``conv2`` (0 in Stable Diffusion).
      deterministic: disable dropout; when False an rng named ``"dropout"`` is needed.
      temb_in_norm: add the time embedding inside ``norm2`` (in fp32) rather than to
        ``conv1``'s output; the same result (see ``_TEMB_IN_NORM``; None: that default).
    """

    out_channels: int | None = None
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    temb_in_norm: bool | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array | None = None,
        temb_proj: jax.Array | None = None,
        skip: jax.Array | None = None,
    ) -> jax.Array:
        """Args: x [B, H, W, C_in]; temb [B, T], [B/k, T] (tiled k times) or None;
        temb_proj [B, C_out] or [B/k, C_out], or None; skip: an up-block's skip
        connection [B, H, W, C_skip], joined to x along the channels first (the
        block's input is then [B, H, W, C_in + C_skip]), or None.

        Returns [B, H, W, C_out] in ``dtype``.
        """
        parts = None
        if skip is not None:
            parts = (x, skip)
            x = jnp.concatenate(parts, axis=-1)
        cin = x.shape[-1]
        cout = self.out_channels or cin
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x, parts=parts)
        h = nn.silu(h)
        h = conv3x3(cout, name="conv1", **kw)(h)
        t = None
        if temb is not None and temb_proj is not None:
            raise ValueError("ResnetBlock2D: pass temb or temb_proj, not both")
        if temb_proj is not None:
            if temb_proj.shape[-1] != cout:
                raise ValueError(
                    f"ResnetBlock2D: temb_proj has {temb_proj.shape[-1]} channels, the block {cout}"
                )
            t = temb_proj.astype(self.dtype)
        elif temb is not None:
            t = nn.Dense(cout, name="time_emb_proj", **kw)(nn.silu(temb.astype(self.dtype)))
        if t is not None:
            # A shared sample's embedding meets the tiled batch (see tile_batch).
            t = tile_batch(t, h.shape[0])
            if not (_TEMB_IN_NORM if self.temb_in_norm is None else self.temb_in_norm):
                h, t = h + t[:, None, None, :], None
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h, offset=t)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv3x3(cout, name="conv2", **kw)(h)

        shortcut = x.astype(self.dtype)
        if cin != cout:
            shortcut = Conv(cout, (1, 1), name="conv_shortcut", **kw)(shortcut)
        return shortcut + h


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D`` with a convolution: a stride-2 3x3 conv named ``conv``.

    Attributes:
      out_channels: output channels; ``None`` keeps the input's.
      padding: 1 pads one pixel on every side (the UNet); 0 pads one pixel only
        after each spatial axis, i.e. PyTorch ``F.pad(x, (0, 1, 0, 1))`` then an
        unpadded conv (the autoencoder encoder).
    """

    out_channels: int | None = None
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [B, H, W, C]. Returns [B, H', W', C_out], H' = floor((H + 2p - 3) / 2) + 1."""
        if self.padding == 1:
            pad = ((1, 1), (1, 1))
        elif self.padding == 0:
            pad = ((0, 1), (0, 1))
        else:
            raise ValueError(f"Downsample2D: padding must be 0 or 1, got {self.padding}")
        return Conv(
            self.out_channels or x.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=pad,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output index of PyTorch's ``mode="nearest"`` resize.

    PyTorch computes ``min(floor(i * float32(n_in / n_out)), n_in - 1)`` in
    float32; doing the same float32 arithmetic here reproduces its choice even
    where ``i * n_in / n_out`` lands on an integer.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of x [B, H, W, C] to ``size`` (PyTorch semantics)."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        # The common case: every pixel repeated twice along each axis.
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, _nearest_indices(h, size[0]), axis=1)
    return jnp.take(x, _nearest_indices(w, size[1]), axis=2)


# Nearest x2 upsampling then a 3x3 convolution, computed from the low-resolution input
# (the "sub-pixel" form): each of the four output phases (row parity a, column parity b)
# sees only a 2x2 window of the input, with the 3x3 kernel's taps summed onto it. Row
# phase 0 takes input rows (i-1, i) with kernel rows (0, 1+2); phase 1 takes (i, i+1)
# with (0+1, 2). One 2x2 convolution with 4x the output channels gives all four phases:
# 16 multiply-adds per input pixel and channel pair instead of 36.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
# "auto": the sub-pixel form for inputs of at least this many pixels, per backend,
# where it measured faster (benchmarks/NOTES.md). CPU: [1, 64, 64, 128] 25.3 -> 13.2 ms,
# no faster from 16x16 down. GPU (H200, session 8): the SD VAE decode 8 x 512² 42.2 ->
# 39.5 ms, its upsamplers' inputs 64² to 256²; the SD 1.5 UNet's (8² to 32²) were not
# measured and keep the plain form. TPU: the plain form. True / False force a form
# (benchmarks/gpu.py's "subpixel_upsample" experiment sets True).
_SUBPIXEL_MIN_PIXELS = {"cpu": 32 * 32, "gpu": 64 * 64}
_SUBPIXEL_UPSAMPLE: bool | str = "auto"


def _use_subpixel(x: jax.Array) -> bool:
    if _SUBPIXEL_UPSAMPLE != "auto":
        return bool(_SUBPIXEL_UPSAMPLE)
    least = _SUBPIXEL_MIN_PIXELS.get(jax.default_backend())
    return least is not None and x.shape[1] * x.shape[2] >= least


def _upsample_conv_reference(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution (padding 1) of x [B, H, W, C] repeated x2 along H and W."""
    up = _resize_nearest(x, (2 * x.shape[1], 2 * x.shape[2]))
    return conv_general_dilated(
        up,
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=jax.lax.conv_dimension_numbers(
            up.shape, kernel.shape, ("NHWC", "HWIO", "NHWC")
        ),
    )


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``conv3x3(nearest_upsample_x2(x)) + bias`` (padding 1) without forming the upsampled input.

    The same function as :func:`_upsample_conv_reference` (plus ``bias``) up to rounding
    (the kernel taps are summed in fp32 before the products), at 4/9 of its
    multiply-adds. The bias is added in the pass that interleaves the four output
    phases, not in a pass of its own over the output. The gradient is the reference
    form's.

    Args: x [B, H, W, C]; kernel [3, 3, C, O] (HWIO); bias [O] or None.
    Returns [B, 2H, 2W, O].
    """
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), jnp.result_type(x, kernel))
    return _upsample2x_conv3x3(x, kernel, bias)


@jax.custom_vjp
def _upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    k = kernel.astype(jnp.float32)
    k4 = jnp.einsum("ari,bsj,ijco->rscabo", _PHASE_TAPS, _PHASE_TAPS, k)
    k4 = k4.reshape(2, 2, c, 4 * o).astype(kernel.dtype)
    y = conv_general_dilated(
        x,
        k4,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, k4.shape, ("NHWC", "HWIO", "NHWC")
        ),
    )  # [B, H+1, W+1, 4O]: phase (a, b) of output pixel (2i+a, 2j+b) is at (i+a, j+b)
    y = y.reshape(b, h + 1, w + 1, 2, 2, o)
    # The bias goes onto each phase's slice, where XLA fuses it into the interleaving.
    rows = [
        jnp.stack([y[:, a : a + h, c2 : c2 + w, a, c2] + bias for c2 in (0, 1)], axis=3)
        for a in (0, 1)
    ]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)


def _upsample_conv_fwd(x, kernel, bias):
    return _upsample2x_conv3x3(x, kernel, bias), (x, kernel, bias)


def _upsample_conv_bwd(res, g):
    # The reference form's gradient: XLA:CPU ran the 2x2 form's gradient 13-28x slower
    # than this at the VAE decoder's sizes (benchmarks/NOTES.md). Its unused forward is
    # dead code under jit.
    x, kernel, bias = res
    _, vjp = jax.vjp(lambda x, k, b: _upsample_conv_reference(x, k) + b, x, kernel, bias)
    return vjp(g)


_upsample2x_conv3x3.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


class _SubpixelUpsampleConv(nn.Module):
    """``nn.Conv(features, (3, 3), padding=1)``'s params ("kernel" [3, 3, C, O] and
    "bias" [O], the same initialisers), applied to x [B, H, W, C] repeated x2 along H
    and W through :func:`upsample2x_conv3x3`."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (3, 3, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return upsample2x_conv3x3(x, kernel, bias)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D`` with a convolution: nearest x2 resize, then a 3x3 conv ``conv``.

    Attributes:
      out_channels: output channels; ``None`` keeps the input's.
    """

    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """Args:
          x: [B, H, W, C].
          output_size: (H_out, W_out) to resize to instead of (2H, 2W); the UNet
            passes its skip connection's size when the input was not a multiple
            of the total down-sampling factor.

        Returns:
          [B, H_out, W_out, C_out] in ``dtype``.
        """
        h, w = x.shape[1:3]
        size = (2 * h, 2 * w) if output_size is None else tuple(int(s) for s in output_size)
        features = self.out_channels or x.shape[-1]
        if size == (2 * h, 2 * w) and _use_subpixel(x):
            # Same params ("conv": kernel [3, 3, C, O], bias), computed sub-pixel.
            return _SubpixelUpsampleConv(
                features, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
            )(x)
        x = _resize_nearest(x, size)
        return conv3x3(features, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features (Ho et al. 2020; Vaswani et al. 2017, Sec. 3.5).

    With ``half = dim // 2`` and frequencies
    ``w_j = exp(-log(max_period) * j / (half - freq_shift))``, ``j < half``, the
    features are ``[sin(scale t w), cos(scale t w)]`` (``[cos, sin]`` when
    ``flip_sin_to_cos``), zero-padded by one when ``dim`` is odd. This is
    diffusers' ``get_timestep_embedding`` with ``downscale_freq_shift =
    freq_shift``; Stable Diffusion uses ``flip_sin_to_cos=True, freq_shift=0``.

    Args:
      timesteps: [N] timesteps, integer or fractional.
      dim: feature size.
      flip_sin_to_cos: put the cosines first.
      freq_shift: ``downscale_freq_shift`` above.
      scale: multiplies the arguments of sin and cos.
      max_period: the slowest period.

    Returns:
      [N, dim] float32.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D [N], got {timesteps.shape}")
    half = dim // 2
    if half - freq_shift == 0:
        raise ValueError(f"timestep_embedding: dim {dim} with freq_shift {freq_shift} divides by 0")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: ``linear_2(silu(linear_1(t_features)))``.

    Attributes:
      features: output (and hidden) size; 4 x block_out_channels[0] in the UNet.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_features: jax.Array) -> jax.Array:
        """Args: t_features [B, D] (from :func:`timestep_embedding`). Returns [B, features]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.features, name="linear_1", **kw)(t_features.astype(self.dtype))
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(h))
