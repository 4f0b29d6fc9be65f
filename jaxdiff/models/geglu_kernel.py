"""GEGLU's projection and gate as one GPU kernel (Pallas, Triton backend): an experiment.

``a * gelu(g)`` with ``[a, g] = x @ kernel + bias``, tile by tile: each program
multiplies a block of rows of ``x`` by the matching column blocks of both halves of
the kernel, adds the biases and writes only the gated product. XLA instead runs the
projection as a cuBLAS GEMM that writes both halves (2F columns) and then a kernel
that reads them back for the product: SD 1.5's UNet at batch 16 spends ~1.3 ms per
call in those product kernels on an H200 (session 11's profile), which this kernel
does not need. Whether a Triton GEMM with this epilogue is as fast as cuBLAS's GEMM
is what ``benchmarks/gpu.py``'s ``geglu_fused`` experiment measures; until then
``attention._GEGLU_FUSED`` is off.

Limits: the row count must be a multiple of ``BLOCK_M``, ``F`` of ``BLOCK_N`` and the
input width of ``BLOCK_K`` (callers fall back to XLA otherwise; SD 1.5's shapes fit at
even batch sizes). The kernel has no partitioning rule: in a program sharded by XLA's
SPMD partitioner its inputs would be gathered on every device, so it is for
single-device programs. Gradients come from the plain formula (a custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fused_geglu", "geglu_reference", "fits"]

# Tiles: rows of x, output columns (per half), input channels per step. Two fp32
# accumulators of BLOCK_M x BLOCK_N each: the register footprint of one 128 x 256
# tile, Triton's usual bf16 tile on Hopper with 8 warps.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
NUM_WARPS, NUM_STAGES = 8, 3

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 to fp32 beyond): the rational
# approximation Eigen and XLA use for fp32 erf (max abs error ~4e-7). Pallas' Triton
# lowering has no erf.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _erf(x: jax.Array) -> jax.Array:
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + np.float32(c)
    q = jnp.full_like(x, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + np.float32(c)
    return x * p / q


def _gate(a: jax.Array, g: jax.Array) -> jax.Array:
    """``a * gelu(g)`` (exact GELU, PyTorch's erf form), in fp32."""
    return a * (0.5 * g * (1.0 + _erf(g * np.float32(0.5**0.5))))


def fits(rows: int, channels: int, features: int) -> bool:
    """Whether ``[rows, channels] @ [channels, 2 * features]`` tiles evenly."""
    return rows % BLOCK_M == 0 and channels % BLOCK_K == 0 and features % BLOCK_N == 0


def geglu_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The same function in plain jax (fp32 accumulation, the gate in fp32): the
    kernel's gradient and its tests' reference. x [M, C], kernel [C, 2F], bias [2F]."""
    h = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    a, g = jnp.split(h, 2, axis=-1)
    return _gate(a, g).astype(x.dtype)


def _geglu_matmul(x_ref, wa_ref, wg_ref, ba_ref, bg_ref, o_ref, *, k_steps: int) -> None:
    from jax.experimental import pallas as pl

    def step(i, acc):
        a, g = acc
        cols = pl.ds(i * BLOCK_K, BLOCK_K)
        xs = x_ref[:, cols]
        a = a + jnp.dot(xs, wa_ref[cols, :], preferred_element_type=jnp.float32)
        g = g + jnp.dot(xs, wg_ref[cols, :], preferred_element_type=jnp.float32)
        return a, g

    zero = jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32)
    a, g = jax.lax.fori_loop(0, k_steps, step, (zero, zero))
    a = a + ba_ref[...].astype(jnp.float32)[None, :]
    g = g + bg_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = _gate(a, g).astype(o_ref.dtype)


def _pallas_geglu(x, kernel, bias, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, c = x.shape
    f = kernel.shape[1] // 2
    half = f // BLOCK_N  # the gate's column blocks start here
    return pl.pallas_call(
        functools.partial(_geglu_matmul, k_steps=c // BLOCK_K),
        out_shape=jax.ShapeDtypeStruct((m, f), x.dtype),
        grid=(m // BLOCK_M, f // BLOCK_N),
        in_specs=[
            pl.BlockSpec((BLOCK_M, c), lambda i, j: (i, 0)),
            # The kernel and bias are passed twice, for their two halves: no copies.
            pl.BlockSpec((c, BLOCK_N), lambda i, j: (0, j)),
            pl.BlockSpec((c, BLOCK_N), lambda i, j: (0, j + half)),
            pl.BlockSpec((BLOCK_N,), lambda i, j: (j,)),
            pl.BlockSpec((BLOCK_N,), lambda i, j: (j + half,)),
        ],
        out_specs=pl.BlockSpec((BLOCK_M, BLOCK_N), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name=f"geglu_matmul_{m}x{c}x{f}",  # profiles tell the shapes apart
    )(x, kernel, kernel, bias, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_geglu(x: jax.Array, kernel: jax.Array, bias: jax.Array, interpret: bool = False):
    """``a * gelu(g)``, ``[a, g] = x @ kernel + bias``, in one Pallas kernel.

    Args: x [M, C] and kernel [C, 2F] in the compute dtype (bf16/fp16 on a GPU), bias
    [2F]; the shapes must satisfy :func:`fits`. ``interpret``: run the kernel in
    Pallas' interpreter (any backend; tests). Returns [M, F] in x's dtype."""
    m, c = x.shape
    if kernel.shape[0] != c or kernel.shape[1] % 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(
            f"fused_geglu: x {x.shape}, kernel {kernel.shape}, bias {bias.shape} do not "
            "make [M, C] @ [C, 2F] + [2F]"
        )
    if not fits(m, c, kernel.shape[1] // 2):
        raise ValueError(
            f"fused_geglu: [{m}, {c}] @ {list(kernel.shape)} does not tile into "
            f"{BLOCK_M} rows, {BLOCK_K} channels and {BLOCK_N} features"
        )
    return _pallas_geglu(x, kernel, bias, interpret)


def _fwd(x, kernel, bias, interpret):
    return fused_geglu(x, kernel, bias, interpret), (x, kernel, bias)


def _bwd(interpret, residuals, g):
    del interpret
    _, vjp = jax.vjp(geglu_reference, *residuals)
    return vjp(g)


fused_geglu.defvjp(_fwd, _bwd)
