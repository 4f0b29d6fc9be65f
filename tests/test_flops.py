"""jaxdiff.flops: matmul/conv FLOPs from the jaxpr, against hand-counted formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.flops import count_flops


def test_dense_and_batched_dot():
    a = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)
    w = jax.ShapeDtypeStruct((7, 11), jnp.float32)
    assert count_flops(lambda a, w: a @ w, a, w) == {
        "dot": 2.0 * 3 * 5 * 7 * 11,
        "conv": 0.0,
        "total": 2.0 * 3 * 5 * 7 * 11,
    }
    q = jax.ShapeDtypeStruct((2, 4, 9, 6), jnp.float32)  # [B, N, T, H]
    k = jax.ShapeDtypeStruct((2, 4, 13, 6), jnp.float32)
    logits = count_flops(lambda q, k: jnp.einsum("bnth,bnsh->bnts", q, k), q, k)
    assert logits["dot"] == 2.0 * 2 * 4 * 9 * 13 * 6


@pytest.mark.parametrize("groups, stride", [(1, 1), (1, 2), (4, 1)])
def test_convolution(groups, stride):
    x = jax.ShapeDtypeStruct((2, 10, 12, 8), jnp.float32)  # NHWC
    k = jax.ShapeDtypeStruct((3, 3, 8 // groups, 16), jnp.float32)  # HWIO

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x,
            k,
            (stride, stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    out = jax.eval_shape(conv, x, k).shape
    expected = 2.0 * np.prod(out) * 3 * 3 * (8 // groups)
    assert count_flops(conv, x, k) == {"dot": 0.0, "conv": expected, "total": expected}


def test_gradient_scan_and_cond():
    w = jnp.ones((6, 6))
    x = jnp.ones((4, 6))
    one = 2.0 * 4 * 6 * 6

    def loss(w, x):
        return jnp.sum(x @ w)

    # Forward 1 matmul; backward adds the one for dL/dw (dL/dx is not asked for).
    assert count_flops(jax.grad(loss), w, x)["dot"] == 2 * one

    def steps(w, x):
        return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]

    assert count_flops(steps, w, x)["dot"] == 5 * one

    def branchy(w, x, pick):
        return jax.lax.cond(pick, lambda: (x @ w) @ w, lambda: x @ w)

    assert count_flops(branchy, w, x, True)["dot"] == 2 * one


def test_cudnn_fused_attention_counts_as_xla_attention(monkeypatch):
    """cuDNN's fused attention (one primitive) counts the matmuls of XLA's attention on
    the same shapes, forward and backward. Traced on the CPU with cuDNN's version checks
    stubbed: make_jaxpr only traces, nothing is lowered."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda *a, **k: 90800)
    monkeypatch.setattr(fused, "check_compute_capability", lambda *a, **k: True)
    q = jax.ShapeDtypeStruct((2, 64, 8, 40), jnp.bfloat16)  # [B, T, N, H]
    k = jax.ShapeDtypeStruct((2, 48, 8, 40), jnp.bfloat16)

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32)
        )

    fwd = {i: count_flops(loss(i), q, k, k)["dot"] for i in ("cudnn", "xla")}
    assert "dot_product_attention_fwd_wrapper" in str(jax.make_jaxpr(loss("cudnn"))(q, k, k))
    assert fwd["cudnn"] == fwd["xla"] == 2 * 2.0 * 2 * 8 * 64 * 48 * 40
    grad = {
        i: count_flops(jax.grad(loss(i), argnums=(0, 1, 2)), q, k, k)["dot"]
        for i in ("cudnn", "xla")
    }
    assert grad["cudnn"] == grad["xla"] == 6 * 2.0 * 2 * 8 * 64 * 48 * 40
