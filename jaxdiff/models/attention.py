"""Attention and the spatial transformer of the Stable Diffusion UNet, NHWC.

Modules mirror diffusers' ``Attention``, ``FeedForward``/``GEGLU``,
``BasicTransformerBlock`` and ``Transformer2DModel`` (continuous input), with
the same submodule names (``attn1/to_q``, ``attn1/to_out_0``,
``ff/net_0/proj``, ``ff/net_2``, ``proj_in``, ...).

The hook point
--------------
Every attention score in the UNet is computed in exactly one place:
:meth:`Attention.attend`, which calls ``Attention.attention_fn`` when one is
set and :func:`dot_product_attention` otherwise. An ``attention_fn`` is any
callable ``fn(module, q, k, v) -> out`` with ``q`` [B, T, N, H], ``k``/``v``
[B, S, N, H] and ``out`` [B, T, N, H]; ``module`` is the bound
:class:`Attention`, so the hook can read ``module.scale``,
``module.upcast_attention``, ``module.name`` (``"attn1"`` is self-attention,
``"attn2"`` cross-attention over the text tokens) and ``module.path`` (which
block it is), and can ``module.sow(...)`` attention maps. This is the seam
for prompt-to-prompt style attention editing and for memory-efficient or
custom kernels. The UNet passes one ``attention_fn`` down to every block.
LoRA needs no seam here: it either merges into the ``to_q/to_k/to_v/to_out_0``
kernels or wraps those ``nn.Dense`` calls with ``flax.linen.intercept_methods``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Conv, GroupNorm

Dtype = Any
# fn(module, q [B,T,N,H], k [B,S,N,H], v [B,S,N,H]) -> [B,T,N,H]
AttentionFn = Callable[["Attention", jax.Array, jax.Array, jax.Array], jax.Array]

__all__ = [
    "AttentionFn",
    "dot_product_attention",
    "Attention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2DModel",
]

# Environment variable that picks the GPU attention kernel: auto (default), xla, cudnn.
ENV_ATTENTION = "JAXDIFF_ATTENTION"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    upcast: bool = False,
) -> jax.Array:
    """``softmax(scale * q k^T) v`` per head (Vaswani et al. 2017, Eq. 1).

    On GPU this is cuDNN's fused (flash) attention where cuDNN takes the
    inputs (fp16/bf16, head size a multiple of 8 up to 128) and XLA's einsum
    path otherwise; ``JAXDIFF_ATTENTION=xla`` or ``=cudnn`` (read when the
    function is traced) forces one. ``jax.nn.dot_product_attention``'s own
    default (``implementation=None``) never picks cuDNN. On CPU a blocked
    fused attention (below); other backends take XLA's path. Every path
    accumulates the logits and the softmax in fp32 for bf16/fp16 inputs.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, N, H] keys.
      v: [B, S, N, H] values.
      scale: logit scale; default ``1 / sqrt(H)``.
      upcast: cast q, k and v to fp32 first (diffusers' ``upcast_attention``,
        which SD 2.x sets because fp16 logits overflow). The output is cast
        back to ``q``'s dtype. On GPU this rules out the cuDNN kernel, which
        takes only half-precision inputs.

    Returns:
      [B, T, N, H] in ``q``'s dtype.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if jax.default_backend() == "cpu":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _cpu_attention(q, k, v, scale).astype(dtype)
    if jax.default_backend() == "gpu" and _use_cudnn(q):
        try:
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            return out.astype(dtype)
        except (NotImplementedError, ValueError, RuntimeError):
            if os.environ.get(ENV_ATTENTION, "").lower() == "cudnn":
                raise
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    return out.astype(dtype)


def _use_cudnn(q: jax.Array) -> bool:
    """Whether the GPU path should try cuDNN's fused attention for queries ``q``.

    ``JAXDIFF_ATTENTION`` = ``xla`` / ``cudnn`` decides; unset (or ``auto``),
    cuDNN is tried for fp16/bf16 with a head size cuDNN's flash kernel takes
    (a multiple of 8, at most 128). cuDNN's own checks, run when the call is
    traced, still have the last word: the caller falls back to XLA if they
    refuse (unless ``cudnn`` was forced).
    """
    choice = os.environ.get(ENV_ATTENTION, "auto").lower()
    if choice not in ("auto", "xla", "cudnn"):
        raise ValueError(f"{ENV_ATTENTION}={choice!r}: expected auto, xla or cudnn")
    if choice != "auto":
        return choice == "cudnn"
    head = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and head % 8 == 0 and head <= 128


# Queries per block of the CPU attention: a block's logits, [B*N, 32, S] fp32, stay
# in cache (128 KiB per head at S = 1024), where the whole [B*N, T, S] does not.
# 32 vs 64 (same process, benchmark model): UNet batch 8 742 vs 799 ms, train step
# 1.69 vs 1.77 s; 128 was slower still.
_CPU_QUERY_BLOCK = 32
# Up to this many logits (B*N*T*S; 2^24 fp32 = 64 MiB) one unblocked fused kernel
# was faster: the small benchmark UNet at batch 2 (16 x 1024 x 1024 self-attention
# logits) 208 -> 182 ms, cross-attention (S = 77) at any batch no slower. At batch 8
# (2^26) blocks are 2x faster than the unblocked kernel.
_CPU_BLOCK_MIN_LOGITS = 2**24


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention laid out for XLA:CPU: heads folded into the batch, queries in blocks.

    ``jax.nn.dot_product_attention``'s einsums keep the heads between the token and
    channel axes ("BTNH,BSNH->BNTS"), which XLA:CPU runs as strided batch matmuls
    and cannot fuse with the softmax; [B*N, T, H] operands fuse into one kernel.
    The scale goes on q ([T, H]) rather than on the logits ([T, S]). Long query
    sequences with more than ``_CPU_BLOCK_MIN_LOGITS`` logits in all are processed in
    blocks of ``_CPU_QUERY_BLOCK`` queries with ``lax.map`` so each block's logits
    stay in cache, and the backward pass recomputes them from
    the saved log-sum-exp (:func:`_softmax_attention`) instead of storing [T, S].

    Args: q [B, T, N, H], k and v [B, S, N, H]. Returns [B, T, N, H].
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    q = q * jnp.asarray(scale, q.dtype)

    def heads_first(a: jax.Array, length: int) -> jax.Array:  # [B, L, N, H] -> [B*N, L, H]
        return a.transpose(0, 2, 1, 3).reshape(b * n, length, h)

    qg, kg, vg = heads_first(q, t), heads_first(k, s), heads_first(v, s)
    c = _CPU_QUERY_BLOCK
    if t > c and t % c == 0 and b * n * t * s > _CPU_BLOCK_MIN_LOGITS:
        blocks = qg.reshape(b * n, t // c, c, h).swapaxes(0, 1)  # [T/c, B*N, c, H]
        out = jax.lax.map(lambda qb: _softmax_attention(qb, kg, vg), blocks)
        out = out.swapaxes(0, 1).reshape(b * n, t, h)
    else:
        out = _softmax_attention(qg, kg, vg)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _logits(q: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.einsum("gth,gsh->gts", q, k, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v`` over [G, T, H] x [G, S, H] (q already scaled); fp32 softmax."""
    p = jax.nn.softmax(_logits(q, k), axis=-1)
    return jnp.einsum("gts,gsh->gth", p.astype(v.dtype), v).astype(q.dtype)


def _softmax_attention_fwd(q, k, v):
    w = _logits(q, k)
    m = jnp.max(w, axis=-1, keepdims=True)
    e = jnp.exp(w - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("gts,gsh->gth", (e / total).astype(v.dtype), v).astype(q.dtype)
    return out, (q, k, v, out, m + jnp.log(total))


def _softmax_attention_bwd(res, d_out):
    # The softmax backward of flash attention (Dao et al. 2022, Alg. 4): recompute
    # P = exp(S - lse); dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O));
    # dQ = dS K; dK = dS^T Q.
    q, k, v, out, lse = res
    f32 = jnp.float32
    p = jnp.exp(_logits(q, k) - lse)
    dp = jnp.einsum("gth,gsh->gts", d_out, v, preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dq = jnp.einsum("gts,gsh->gth", ds, k, preferred_element_type=f32)
    # dV and dK contract over the queries, the major axis of P and dS. Left alone, XLA
    # folds a transpose into the dot's dimension numbers, and XLA:CPU runs a dot that
    # contracts a non-minor axis of a [32, 64, 1024] block as a slow loop (~7 ms); the
    # barrier keeps explicit transposed copies (~1 ms each), after which the dot is a
    # plain matmul (~1.3 ms).
    # Measured in the benchmark's train step (benchmarks/NOTES.md): 2.30 -> 1.71 s.
    p_t, ds_t = jax.lax.optimization_barrier((jnp.swapaxes(p, 1, 2), jnp.swapaxes(ds, 1, 2)))
    dv = jnp.einsum("gst,gth->gsh", p_t.astype(d_out.dtype), d_out, preferred_element_type=f32)
    dk = jnp.einsum("gst,gth->gsh", ds_t, q, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nn.Module):
    """Multi-head attention, diffusers ``Attention`` as the UNet builds it.

    ``to_q``, ``to_k``, ``to_v`` have no bias (unless ``qkv_bias``); ``to_out_0``
    has one and maps back to the query's channel count. Self-attention when
    called without ``context``, cross-attention over ``context`` otherwise.

    Attributes:
      heads: N, the number of heads.
      dim_head: H, channels per head; the inner width is N * H.
      upcast_attention: compute the attention in fp32 (see
        :func:`dot_product_attention`).
      qkv_bias: give ``to_q/to_k/to_v`` a bias (diffusers ``bias=True``).
      attention_fn: the hook point described in the module docstring.
    """

    heads: int
    dim_head: int
    upcast_attention: bool = False
    qkv_bias: bool = False
    attention_fn: AttentionFn | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def scale(self) -> float:
        """The logit scale ``1 / sqrt(H)``."""
        return self.dim_head**-0.5

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """The single place attention is computed: q [B,T,N,H], k/v [B,S,N,H] -> [B,T,N,H]."""
        if self.attention_fn is not None:
            return self.attention_fn(self, q, k, v)
        return dot_product_attention(q, k, v, scale=self.scale, upcast=self.upcast_attention)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Args:
          x: [B, T, C] queries' source.
          context: [B, S, D] keys' and values' source; ``None`` means ``x``.

        Returns:
          [B, T, C] in ``dtype``.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        x = x.astype(self.dtype)
        ctx = x if context is None else context.astype(self.dtype)
        b, t, c = x.shape
        q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(ctx)
        v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(ctx)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
        out = self.attend(split(q), split(k), split(v))
        return nn.Dense(c, name="to_out_0", **kw)(out.reshape(b, t, inner))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): ``a * gelu(g)`` with ``[a, g] = proj(x)``.

    Attributes:
      features: output width; ``proj`` produces twice that.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., C]. Returns [..., features]."""
        h = nn.Dense(
            2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
        )(x)
        a, gate = jnp.split(h, 2, axis=-1)
        # Exact (erf) GELU, as torch.nn.functional.gelu's default.
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_2(net_0(x))`` (``net_1`` is dropout, p=0).

    Attributes:
      mult: inner width is ``mult`` x the input width.
    """

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [B, T, C]. Returns [B, T, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``), pre-norm residuals.

    ``x += attn1(norm1(x))``; ``x += attn2(norm2(x), context)``; ``x += ff(norm3(x))``.

    Attributes:
      heads: attention heads.
      dim_head: channels per head.
      upcast_attention: see :class:`Attention`.
      attention_fn: see :class:`Attention`.
    """

    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_fn: AttentionFn | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Args: x [B, T, C]; context [B, S, D]. Returns [B, T, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(
            heads=self.heads,
            dim_head=self.dim_head,
            upcast_attention=self.upcast_attention,
            attention_fn=self.attention_fn,
            **kw,
        )

        # LayerNorm statistics are reduced in fp32 by flax (force_float32_reductions);
        # use_fast_variance=False keeps the two-pass variance PyTorch uses.
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)

        x = x + Attention(name="attn1", **attn)(norm("norm1")(x))
        x = x + Attention(name="attn2", **attn)(norm("norm2")(x), context)
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input (the UNet's spatial transformer).

    ``h = proj_in(norm(x))`` flattened to H*W tokens, ``depth`` transformer
    blocks with cross-attention to ``context``, ``proj_out`` back to C channels,
    plus the input (Rombach et al. 2022, Sec. 3.3). ``proj_in``/``proj_out`` are
    1x1 convolutions in SD 1.x and Dense layers in SD 2.x
    (``use_linear_projection``); on NHWC data both are the same matmul and
    differ only in the kernel's shape, [1, 1, C, D] or [C, D].

    Attributes:
      heads: attention heads N.
      dim_head: channels per head H; the inner width is N * H.
      depth: number of transformer blocks (``transformer_layers_per_block``).
      norm_num_groups: groups of the input GroupNorm (eps fixed at 1e-6, as diffusers).
      use_linear_projection: Dense rather than 1x1 conv projections.
      upcast_attention, attention_fn: see :class:`Attention`.
    """

    heads: int
    dim_head: int
    depth: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_fn: AttentionFn | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Args: x [B, H, W, C]; context [B, S, D]. Returns [B, H, W, C] in ``dtype``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head

        def proj(features: int, name: str) -> nn.Module:
            if self.use_linear_projection:
                return nn.Dense(features, name=name, **kw)
            return Conv(features, (1, 1), name=name, **kw)

        residual = x.astype(self.dtype)
        y = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.depth):
            y = BasicTransformerBlock(
                self.heads,
                self.dim_head,
                upcast_attention=self.upcast_attention,
                attention_fn=self.attention_fn,
                name=f"transformer_blocks_{i}",
                **kw,
            )(y, context)
        y = proj(c, "proj_out")(y.reshape(b, h, w, inner))
        return y + residual
