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

Keys and values of a fixed context
----------------------------------
Cross-attention's keys and values depend only on the text context and the
weights, so a sampler's loop would recompute the same ones every step (XLA's
GPU compiler does not move matmuls out of a ``while`` loop). :func:`cross_attention_kv`
computes them once, and the UNet takes them as the ``"cross_kv"`` variable
collection (``model.apply({"params": p, "cross_kv": kv}, ...)``): each ``attn2``
then reads its own ``k``/``v`` instead of calling ``to_k``/``to_v``. The numbers
are the same ``nn.Dense`` products; a ``to_k``/``to_v`` interceptor must also
wrap :func:`cross_attention_kv`.

Merged weights
--------------
XLA's GPU compiler merges the three projections of a self-attention (one input)
into one GEMM and builds the concatenated weights in every call, so also in every
step of a sampler's loop. :func:`merged_self_attention_weights` builds them once;
given as the ``"merged"`` variable collection (:data:`MERGED`), each ``attn1``
computes ``[q, k, v]`` with one ``nn.Dense`` of the joined kernel (the same
products; ``to_q``/``to_k``/``to_v`` interceptors are then not called), where the
products are small enough that XLA would merge them too (``_MERGED_QKV_MAX_BYTES``).
Where they are not, it takes its three kernels' columns from the joined one when
its params have no ``to_q``/``to_k``/``to_v`` (see
:func:`jaxdiff.models.unet.fuse_projections`). Every cross-attention's ``to_k``/``to_v``
kernels can be joined too (:func:`joined_cross_kv_weights`): one product of the
context then gives all their keys and values (``cross_attention_kv(..., joined=)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import geglu_kernel
from jaxdiff.models.geglu_kernel import fused_geglu
from jaxdiff.models.layers import (
    Conv,
    GroupNorm,
    dense,
    gelu_erf,
    pallas_switch_on,
    tile_batch,
)

Dtype = Any
# fn(module, q [B,T,N,H], k [B,S,N,H], v [B,S,N,H]) -> [B,T,N,H]
AttentionFn = Callable[["Attention", jax.Array, jax.Array, jax.Array], jax.Array]

__all__ = [
    "AttentionFn",
    "CROSS_KV",
    "MERGED",
    "cross_attention_kv",
    "joined_cross_kv_weights",
    "merged_self_attention_weights",
    "dot_product_attention",
    "Attention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2DModel",
]

# Environment variable that picks the GPU attention kernel: auto (default), xla, cudnn.
ENV_ATTENTION = "JAXDIFF_ATTENTION"
# GEGLU's GELU: "erf" (layers.gelu_erf, PyTorch's form in fp32) or "jax"
# (jax.nn.gelu(approximate=False), the erfc form used before session 8's change 21). An experiment
# switch: the H200 train step went 94.8 -> 104.1 ms between two runs with new slow
# transposes in its backward, and this is one of the changes in between.
_GEGLU_GELU = "erf"
# GEGLU's projection and gate as one Pallas kernel (``geglu_kernel.fused_geglu``) on a
# GPU, for half-precision compute and shapes that tile: False (default), True, or
# "interpret" (Pallas' interpreter on any backend, for tests). An experiment until
# benchmarks/gpu.py's "geglu_fused" has timed it against cuBLAS + XLA's product kernel.
_GEGLU_FUSED: bool | str = False
# The largest head size the GPU path sends to cuDNN's flash attention by default.
# cuDNN (and jax's own check) takes up to 256 on Hopper and later, 128 before; SD
# 1.5's 1280-channel blocks have heads of 160, so their 12 attentions per UNet call
# run as XLA's einsums (two matmuls, a softmax, head transposes: ~8 kernels each).
# 128 until benchmarks/gpu.py's "cudnn_head_256" experiment has measured 256.
_CUDNN_MAX_HEAD = 128
# The variable collection that carries precomputed cross-attention keys and values.
CROSS_KV = "cross_kv"
# The variable collection that carries weights joined once for many calls.
MERGED = "merged"
# Self-attention uses merged q/k/v weights only while one projection's input, kernel
# and output take at most this many bytes: XLA:GPU's dot merger merges exactly those
# (its threshold, xla_gpu_dot_merger_threshold_mb, is 64 MiB; checked by deviceless
# compiles). Larger products stay three: merged, their outputs would be sliced apart
# in copies (SD 1.5 at batch 16: four 64x64 self-attentions, deviceless +0.13 ms of
# traffic per sampler step).
_MERGED_QKV_MAX_BYTES = 64 << 20


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
    inputs (fp16/bf16, head size a multiple of 8 up to ``_CUDNN_MAX_HEAD``,
    128) and XLA's einsum path otherwise; ``JAXDIFF_ATTENTION=xla`` or
    ``=cudnn`` (read when the function is traced) forces one.
    ``jax.nn.dot_product_attention``'s own default (``implementation=None``)
    never picks cuDNN. On CPU a blocked fused attention (below); other
    backends take XLA's path. Every path accumulates the logits and the
    softmax in fp32 for bf16/fp16 inputs.

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
    (a multiple of 8, at most ``_CUDNN_MAX_HEAD``). cuDNN's own checks, run
    when the call is traced, still have the last word: the caller falls back
    to XLA if they refuse (unless ``cudnn`` was forced).
    """
    choice = os.environ.get(ENV_ATTENTION, "auto").lower()
    if choice not in ("auto", "xla", "cudnn"):
        raise ValueError(f"{ENV_ATTENTION}={choice!r}: expected auto, xla or cudnn")
    if choice != "auto":
        return choice == "cudnn"
    head = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and head % 8 == 0 and head <= _CUDNN_MAX_HEAD


# Up to this many logits in all (B*N*T*S; 2^24 fp32 = 64 MiB) the forward is one
# fused kernel: the benchmark UNet at batch 2 (16 x 1024 x 1024 self-attention
# logits) 208 -> 182 ms against query blocks (session 2); head chunks gave about
# the same on one device (174 vs 178 ms) and were slower with the batch split over
# two host devices (182 vs 146 ms, in a version with the heads first).
_CPU_UNCHUNKED_LOGITS = 2**24
# Above that the CPU attention works through the [B, N, T, S] logits a chunk of
# heads at a time (every chunk holds the whole batch, which may be split over
# devices), so that a chunk's logits stay in cache: as many heads as fit in this many
# logits (2^22 fp32 = 16 MiB; 1 head of a batch of 4 at T = S = 1024), one at least...
_CPU_HEAD_CHUNK_LOGITS = 2**22
# ...and a head of more than this many logits in blocks of queries (for a head of
# batch 8 at T = S = 1024, 2^23, blocks of 256-512 queries were no faster).
_CPU_QUERY_BLOCK_LOGITS = 2**24
# Backward: one head at a time, its keys in blocks of [B, c, T] logits of at most
# this many (512 keys for a batch of 4 at T = 1024).
_CPU_BWD_BLOCK_LOGITS = 2**21
# Key blocks narrower than this are not worth a loop step: all keys in one block.
_CPU_BWD_MIN_KEYS = 32
# Up to this many keys the forward divides the [T, H] output by the softmax's sums
# instead of the [T, S] probabilities: up to 1.75x faster for cross-attention (77 keys)
# and 256-token self-attention (e.g. [64, 1024, 77, 8] 5.7 -> 3.3 ms, [16, 256, 256,
# 16] 0.88 -> 0.62 ms; [16, 2048, 77, 8] equal, 64-token self-attention within
# 0.03 ms); with 512 and more keys XLA's fused softmax kernel was faster
# ([16, 512, 512, 8] 2.8 vs 4.3 ms, [16, 1024, 1024, 8] 8.2 vs 56 ms).
_CPU_DEFERRED_NORM_KEYS = 256


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention laid out for XLA:CPU: heads folded into the batch, a few at a time.

    ``jax.nn.dot_product_attention``'s einsums keep the heads between the token and
    channel axes ("BTNH,BSNH->BNTS"), which XLA:CPU runs as strided batch matmuls
    and cannot fuse with the softmax; [B*N, T, H] operands fuse into one kernel.
    The scale goes on q ([T, H]) rather than on the logits ([T, S]). The heads are
    processed a few at a time (``lax.map``) so each chunk's logits stay in cache;
    the backward pass (:func:`_softmax_attention`) recomputes the logits from the
    saved log-sum-exp, one head and one block of keys at a time, instead of
    storing [T, S]. The chunks never split the batch axis, which the caller may
    have split over devices.

    Args: q [B, T, N, H], k and v [B, S, N, H]. Returns [B, T, N, H].
    """
    q = q * jnp.asarray(scale, q.dtype)
    out = _softmax_attention(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)))  # [B, N, L, H]
    return out.transpose(0, 2, 1, 3)


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 at least)."""
    for d in range(min(n, limit), 1, -1):
        if n % d == 0:
            return d
    return 1


def _forward_chunks(n: int, b: int, t: int, s: int) -> tuple[int, int]:
    """(heads, queries) per forward chunk of [B, N, T, S] logits (see the constants)."""
    head = b * t * s
    if n * head <= _CPU_UNCHUNKED_LOGITS:
        return n, t
    if head <= _CPU_QUERY_BLOCK_LOGITS:
        return _divisor_at_most(n, max(_CPU_HEAD_CHUNK_LOGITS // head, 1)), t
    return 1, _divisor_at_most(t, max(_CPU_QUERY_BLOCK_LOGITS // (b * s), 1))


def _key_block(b: int, t: int, s: int) -> int:
    """Keys per backward block: the largest divisor c of S whose [B, c, T] logits fit
    ``_CPU_BWD_BLOCK_LOGITS``; all S keys when no divisor of at least
    ``_CPU_BWD_MIN_KEYS`` fits."""
    c = _divisor_at_most(s, max(_CPU_BWD_BLOCK_LOGITS // (b * t), 1))
    return c if c >= min(_CPU_BWD_MIN_KEYS, s) else s


def _map_heads(fn, arrays: tuple, size: int):
    """``fn(*chunks)`` over chunks of ``size`` heads (axis 1 of [B, N, ...] arrays,
    ``lax.map``; each chunk [B, size, ...]), re-joined; one call when ``size`` is N.
    The loop runs over heads, never over the batch axis: a loop over an axis split
    over devices makes XLA gather it first."""
    b, n = arrays[0].shape[:2]
    if size == n:
        return fn(*arrays)
    split = tuple(jnp.moveaxis(a.reshape(b, n // size, size, *a.shape[2:]), 1, 0) for a in arrays)
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(b, n, *o.shape[3:]), out)


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _chunked_forward(q: jax.Array, k: jax.Array, v: jax.Array, block):
    """``block(q, k, v)`` on [G, L, H] operands (G = B x heads, batch major: a split
    batch stays split) over the chunks :func:`_forward_chunks` picks; outputs
    re-joined as [B, N, T, ...]."""
    b, n, t, h = q.shape
    heads, queries = _forward_chunks(n, b, t, k.shape[2])

    def head_chunk(qc, kc, vc):  # [B, heads, L, H]
        g = b * heads
        qf, kf, vf = (a.reshape(g, *a.shape[2:]) for a in (qc, kc, vc))
        if queries == t:
            out = block(qf, kf, vf)
        else:  # [G, T, H] -> [T/queries, G, queries, H]: map over query blocks
            qb = jnp.swapaxes(qf.reshape(g, t // queries, queries, h), 0, 1)
            out = jax.lax.map(lambda x: block(x, kf, vf), qb)
            out = jax.tree.map(lambda o: jnp.swapaxes(o, 0, 1).reshape(g, t, *o.shape[3:]), out)
        return jax.tree.map(lambda o: o.reshape(b, heads, *o.shape[1:]), out)

    return _map_heads(head_chunk, (q, k, v), heads)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v`` over [B, N, T, H] x [B, N, S, H] (q already scaled); fp32
    softmax."""

    def block(qb, kb, vb):
        w = _einsum("gth,gsh->gts", qb, kb)
        if kb.shape[1] <= _CPU_DEFERRED_NORM_KEYS:
            e = jnp.exp(w - jnp.max(w, axis=-1, keepdims=True))
            out = _einsum("gts,gsh->gth", e.astype(vb.dtype), vb)
            return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(qb.dtype)
        p = jax.nn.softmax(w, axis=-1)
        return jnp.einsum("gts,gsh->gth", p.astype(vb.dtype), vb).astype(qb.dtype)

    return _chunked_forward(q, k, v, block)


def _softmax_attention_fwd(q, k, v):
    def block(qb, kb, vb):
        w = _einsum("gth,gsh->gts", qb, kb)
        m = jnp.max(w, axis=-1, keepdims=True)
        e = jnp.exp(w - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum("gts,gsh->gth", (e / total).astype(vb.dtype), vb).astype(qb.dtype)
        return out, (m + jnp.log(total))[..., 0]

    out, lse = _chunked_forward(q, k, v, block)
    return out, (q, k, v, out, lse)


def _softmax_attention_bwd(res, d_out):
    # The softmax backward of flash attention (Dao et al. 2022, Alg. 4), from the saved
    # log-sum-exp: P = exp(S - lse); dV = P^T dO; dP = dO V^T; dS = P * (dP - delta)
    # with delta = rowsum(dO * O); dQ = dS K; dK = dS^T Q.
    # One head at a time, its keys in blocks, every array keys-first ([c, T]: P^T,
    # dP^T, dS^T), so dV = P^T dO and dK = dS^T Q contract the minor axis, and dQ is
    # accumulated transposed, dQ^T += K_j^T dS^T_j, a plain matmul too. Query-major
    # blocks instead make dV and dK contract the major axis of P and dS, which XLA:CPU
    # runs as a slow loop unless both are transposed first (as this code did before).
    q, k, v, out, lse = res
    f32 = jnp.float32
    b, n, t, h = q.shape
    s = k.shape[2]
    c = _key_block(b, t, s)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [B, N, T]

    def one_head(qh, kh, vh, doh, lse_h, delta_h):  # [B, 1, T, H], [B, 1, S, H], ...
        qh, kh, vh, doh = (a[:, 0] for a in (qh, kh, vh, doh))  # [B, L, H]
        lse_row, delta_row = lse_h[:, 0, None, :], delta_h[:, 0, None, :]

        def key_block(dq_t, kv):
            kj, vj = kv  # [B, c, H]
            p_t = jnp.exp(_einsum("gch,gth->gct", kj, qh) - lse_row)
            dv = _einsum("gct,gth->gch", p_t.astype(doh.dtype), doh)
            ds_t = p_t * (_einsum("gch,gth->gct", vj, doh) - delta_row)
            dk = _einsum("gct,gth->gch", ds_t.astype(qh.dtype), qh)
            dq_t = dq_t + _einsum("ghc,gct->ght", jnp.swapaxes(kj, 1, 2), ds_t.astype(kh.dtype))
            return dq_t, (dk, dv)

        def by_blocks(a):  # [B, S, H] -> [S/c, B, c, H]
            return jnp.swapaxes(a.reshape(b, s // c, c, h), 0, 1)

        def joined(a):  # [S/c, B, c, H] -> [B, 1, S, H]
            return jnp.swapaxes(a, 0, 1).reshape(b, 1, s, h)

        blocks = (by_blocks(kh), by_blocks(vh))
        dq_t, (dk, dv) = jax.lax.scan(key_block, jnp.zeros((b, h, t), f32), blocks)
        return jnp.swapaxes(dq_t, 1, 2)[:, None], joined(dk), joined(dv)

    dq, dk, dv = _map_heads(one_head, (q, k, v, d_out, lse, delta), 1)
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
        # The three projections as one product (see merged_self_attention_weights);
        # too large to merge, three products of the joined kernel's columns when the
        # params have no separate kernels (fuse_projections).
        merge = self._merge(x)
        if (
            context is None
            and self.has_variable(MERGED, "qkv_kernel")
            and (merge or not self.has_variable("params", "to_q"))
        ):
            joined = {"kernel": self.get_variable(MERGED, "qkv_kernel")}
            if self.qkv_bias:
                joined["bias"] = self.get_variable(MERGED, "qkv_bias")
            if joined["kernel"].shape != (c, 3 * inner):
                raise ValueError(
                    f"{self.name}: merged q/k/v kernel {joined['kernel'].shape} does not fit "
                    f"{c} input and {inner} inner channels"
                )
            if merge:
                q, k, v = jnp.split(dense(joined, x, self.dtype), 3, axis=-1)
            else:
                cols = {name: jnp.split(w, 3, axis=-1) for name, w in joined.items()}
                q, k, v = [
                    dense({name: w[i] for name, w in cols.items()}, x, self.dtype) for i in range(3)
                ]
            return self._attend_and_project(q, k, v, b, t, c)
        q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        if context is not None and self.has_variable(CROSS_KV, "k"):
            # Precomputed for this context (see cross_attention_kv).
            k, v = self.get_variable(CROSS_KV, "k"), self.get_variable(CROSS_KV, "v")
            if k.shape[:2] != ctx.shape[:2] or k.shape[-1] != inner:
                raise ValueError(
                    f"{self.name}: precomputed keys {k.shape} do not fit the context "
                    f"{ctx.shape} and {inner} channels"
                )
        else:
            k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(ctx)
            v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(ctx)
        return self._attend_and_project(q, k, v, b, t, c)

    def _merge(self, x: jax.Array) -> bool:
        # Whether one projection (input, kernel, output) is small enough to merge.
        inner = self.heads * self.dim_head
        size = jnp.dtype(self.dtype).itemsize
        b, t, c = x.shape
        return (b * t * (c + inner) + c * inner) * size <= _MERGED_QKV_MAX_BYTES

    def _attend_and_project(self, q, k, v, b: int, t: int, c: int) -> jax.Array:
        # q [B, T, inner], k/v [B, S, inner] -> heads, attention, to_out_0 -> [B, T, C].
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
        out = self.attend(split(q), split(k), split(v))
        to_out = nn.Dense(c, name="to_out_0", dtype=self.dtype, param_dtype=self.param_dtype)
        return to_out(out.reshape(b, t, self.heads * self.dim_head))


def cross_attention_kv(
    params: Mapping,
    context: jax.Array,
    dtype: Dtype = jnp.float32,
    joined: Mapping | None = None,
) -> dict:
    """Every cross-attention's keys and values for ``context``, computed once.

    Args:
      params: params of a network built from these modules (e.g. the UNet's); each
        subtree named ``attn2`` is a cross-attention (see :class:`BasicTransformerBlock`).
      context: [B, S, D], as the network would get it.
      dtype: the network's compute dtype.
      joined: :func:`joined_cross_kv_weights` of the same params: all the keys and
        values as one product, split per attention (then ``params`` need no
        ``to_k``/``to_v``).

    Returns:
      A tree like ``params`` with ``{"k", "v"}`` [B, S, inner] in place of each
      ``attn2``, for the ``"cross_kv"`` collection (:data:`CROSS_KV`): the same
      ``to_k``/``to_v`` products the modules would compute.
    """
    ctx = context.astype(dtype)
    if joined is None:
        return _per_attention(
            params,
            "attn2",
            lambda p: {"k": dense(p["to_k"], ctx, dtype), "v": dense(p["to_v"], ctx, dtype)},
        )
    attentions = _cross_attentions(params)
    width = 2 * sum(inner for _, inner, _ in attentions)
    if joined["kernel"].shape != (ctx.shape[-1], width):
        raise ValueError(
            f"cross_attention_kv: joined kernel {joined['kernel'].shape} does not fit "
            f"{ctx.shape[-1]} context channels and these params' cross-attentions "
            f"({width} key and value channels)"
        )
    out = dense(joined, ctx, dtype)
    tree: dict = {}
    start = 0
    for path, inner, _ in attentions:  # the order joined_cross_kv_weights used
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {
            "k": out[..., start : start + inner],
            "v": out[..., start + inner : start + 2 * inner],
        }
        start += 2 * inner
    return tree


def joined_cross_kv_weights(params: Mapping) -> dict:
    """Every cross-attention's ``to_k`` and ``to_v`` params as one ``{"kernel"}`` [D,
    2 x (sum of their inner widths)] (and ``"bias"``), for
    ``cross_attention_kv(..., joined=)``: each attention's keys, then its values, in
    the order of the attentions' paths."""
    parts = [p[name] for _, _, p in _cross_attentions(params) for name in ("to_k", "to_v")]
    out = {"kernel": jnp.concatenate([q["kernel"] for q in parts], axis=-1)}
    if "bias" in parts[0]:
        out["bias"] = jnp.concatenate([q["bias"] for q in parts], axis=-1)
    return out


def _cross_attentions(params: Mapping) -> list[tuple[tuple[str, ...], int, Mapping]]:
    # (path, inner width, params) of every attn2 subtree, ordered by path (sorted, so
    # that dicts rebuilt by tree functions, whose keys come back sorted, give one
    # order). The width is to_q's: keys and values have the query's inner width.
    found = []

    def walk(tree: Mapping, path: tuple[str, ...]) -> None:
        for name, sub in tree.items():
            if isinstance(sub, Mapping):
                if name == "attn2":
                    found.append(((*path, name), sub["to_q"]["kernel"].shape[-1], sub))
                else:
                    walk(sub, (*path, name))

    walk(params, ())
    return sorted(found, key=lambda f: f[0])


def merged_self_attention_weights(params: Mapping) -> dict:
    """Every self-attention's ``to_q``/``to_k``/``to_v`` params joined into one.

    Args:
      params: params of a network built from these modules (e.g. the UNet's); each
        subtree named ``attn1`` is a self-attention.

    Returns:
      A tree like ``params`` with ``{"qkv_kernel"}`` [C, 3 x inner] (and
      ``"qkv_bias"`` [3 x inner] when the projections have biases) in place of each
      ``attn1``, for the ``"merged"`` collection (:data:`MERGED`).
    """

    def join(p: Mapping) -> dict:
        parts = [p[name] for name in ("to_q", "to_k", "to_v")]
        out = {"qkv_kernel": jnp.concatenate([q["kernel"] for q in parts], axis=-1)}
        if "bias" in parts[0]:
            out["qkv_bias"] = jnp.concatenate([q["bias"] for q in parts], axis=-1)
        return out

    return _per_attention(params, "attn1", join)


def _per_attention(params: Mapping, kind: str, fn: Callable[[Mapping], dict]) -> dict:
    # ``fn(subtree)`` for every subtree named ``kind``, in a tree of the same nesting.
    out = {}
    for name, sub in params.items():
        if not isinstance(sub, Mapping):
            continue
        if name == kind:
            out[name] = fn(sub)
        elif found := _per_attention(sub, kind, fn):
            out[name] = found
    return out


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
        proj = nn.Dense(
            2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
        )
        if self._fused(x):
            p = self.variables["params"]["proj"]
            rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
            out = fused_geglu(
                rows, p["kernel"].astype(self.dtype), p["bias"], _GEGLU_FUSED == "interpret"
            )
            return out.reshape(*x.shape[:-1], self.features)
        h = proj(x)
        a, gate = jnp.split(h, 2, axis=-1)
        # Exact (erf) GELU, as torch.nn.functional.gelu's default.
        if _GEGLU_GELU == "jax":
            return a * jax.nn.gelu(gate, approximate=False)
        return a * gelu_erf(gate)

    def _fused(self, x: jax.Array) -> bool:
        """Whether this call takes the fused kernel (see ``_GEGLU_FUSED``)."""
        if not pallas_switch_on(_GEGLU_FUSED) or self.is_initializing():
            return False
        if _GEGLU_FUSED != "interpret" and self.dtype not in (jnp.bfloat16, jnp.float16):
            return False
        return geglu_kernel.fits(math.prod(x.shape[:-1]), x.shape[-1], self.features)


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
        """Args: x [B, T, C]; context [B, S, D] (or [k B, S, D] for an x shared by k
        contexts: self-attention runs once, the output is [k B, T, C]). Returns [B, T, C]."""
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
        # A sample shared by k contexts (x's batch a k-th of the context's, see
        # UNet2DConditionModel) is the same up to here for all of them: tile it now.
        x = tile_batch(x, context.shape[0])
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
        """Args: x [B, H, W, C]; context [B, S, D] (or [k B, S, D], see
        :class:`BasicTransformerBlock`). Returns [B, H, W, C] (or [k B, ...]) in ``dtype``."""
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
        # y has the context's batch (k B for a sample shared by k contexts).
        y = proj(c, "proj_out")(y.reshape(y.shape[0], h, w, inner))
        return y + tile_batch(residual, y.shape[0])
