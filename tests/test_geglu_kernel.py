"""The fused GEGLU kernel (Pallas, run here in its interpreter) against diffusers'
PyTorch GEGLU and against the library's plain GEGLU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.activations import GEGLU as TorchGEGLU  # noqa: E402
from tiny_sd import tiling_unet_case, torch_unet_output  # noqa: E402

from jaxdiff.models import attention, geglu_kernel  # noqa: E402
from jaxdiff.models.geglu_kernel import fused_geglu, geglu_reference  # noqa: E402

# Two row blocks, three channel steps, two column blocks per half: every index map
# and the loop over the channels take more than one value.
ROWS, CHANNELS, FEATURES = 2 * 128, 3 * 64, 2 * 128


def _torch_geglu(seed: int = 0):
    torch.manual_seed(seed)
    module = TorchGEGLU(CHANNELS, FEATURES).eval()
    with torch.no_grad():  # biases of the size of the products' values, not zeros
        module.proj.bias.normal_(0.0, 0.5)
    kernel = module.proj.weight.detach().numpy().T.copy()  # [C, 2F]
    bias = module.proj.bias.detach().numpy().copy()
    return module, kernel, bias


def _pallas_calls(fn, *args) -> int:
    # Traced afresh (a new function each time: make_jaxpr caches a function's trace).
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("pallas_call")


def test_kernel_matches_diffusers_geglu_in_fp32():
    module, kernel, bias = _torch_geglu()
    x = np.random.default_rng(1).standard_normal((ROWS, CHANNELS)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = np.asarray(fused_geglu(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), True))
    assert got.shape == (ROWS, FEATURES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # The reference the kernel's gradient uses is the same function.
    ref = np.asarray(geglu_reference(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias)))
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=2e-5)


def test_erf_polynomial_matches_math_erf():
    x = np.linspace(-7.0, 7.0, 20001, dtype=np.float32)
    want = np.array([math.erf(float(v)) for v in x])
    got = np.asarray(geglu_kernel._erf(jnp.asarray(x)), np.float64)
    assert np.abs(got - want).max() < 1e-6


def test_gradients_are_the_plain_formulas():
    _, kernel, bias = _torch_geglu()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((ROWS, CHANNELS)), jnp.float32)
    args = (x, jnp.asarray(kernel), jnp.asarray(bias))
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((ROWS, FEATURES)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * weights)

    got = jax.grad(loss(lambda *a: fused_geglu(*a, True)), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(geglu_reference), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4)
        assert float(jnp.abs(w).max()) > 0


def test_bad_shapes_are_refused():
    x = jnp.zeros((ROWS, CHANNELS), jnp.float32)
    with pytest.raises(ValueError, match="does not tile"):
        fused_geglu(x[:100], jnp.zeros((CHANNELS, 2 * FEATURES)), jnp.zeros(2 * FEATURES), True)
    with pytest.raises(ValueError, match=r"do not\s+make"):
        fused_geglu(x, jnp.zeros((CHANNELS, 2 * FEATURES)), jnp.zeros(FEATURES), True)


@pytest.fixture
def fused_switch(monkeypatch):
    def set_to(value):
        monkeypatch.setattr(attention, "_GEGLU_FUSED", value)

    return set_to


def test_geglu_module_takes_the_kernel_only_when_switched_on_and_it_tiles(fused_switch):
    module = attention.GEGLU(FEATURES, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.asarray(
        np.random.default_rng(4).standard_normal((2, ROWS // 2, CHANNELS)), jnp.bfloat16
    )
    variables = module.init(jax.random.key(0), x)
    params = variables["params"]["proj"]
    variables = {"params": {"proj": {"kernel": params["kernel"], "bias": params["bias"] + 0.25}}}
    plain = module.apply(variables, x)
    assert _pallas_calls(module.apply, variables, x) == 0  # off by default

    fused_switch("interpret")
    assert _pallas_calls(module.apply, variables, x) == 1
    fused = jax.jit(module.apply)(variables, x)
    assert fused.shape == plain.shape and fused.dtype == jnp.bfloat16
    # The plain path rounds both halves to bf16 before the product; the kernel keeps
    # them in fp32: a couple of bf16 steps apart at most, and closer to the product
    # of the same bf16 numbers computed in fp32.
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    diff = np.abs(f32(fused) - f32(plain))
    assert (diff <= 2**-6 * np.maximum(np.abs(f32(plain)), 1.0)).all()
    exact = geglu_reference(
        *(jnp.asarray(f32(a)) for a in (x, params["kernel"], variables["params"]["proj"]["bias"]))
    )
    error = lambda a: np.abs(f32(a) - f32(exact)).mean()  # noqa: E731
    assert error(fused) < 0.75 * error(plain)
    # Rows that do not fill a block: the plain path.
    assert _pallas_calls(module.apply, variables, x[:, :100]) == 0
    # On a CPU the real kernel is never chosen (it needs a GPU and half precision).
    fused_switch(True)
    assert _pallas_calls(module.apply, variables, x) == 0


def test_unet_with_the_kernel_tracks_diffusers(fused_switch):
    """A tiny SD 1.x UNet whose 64-channel level tiles (2 x 8 x 8 rows): its three
    GEGLUs there take the kernel, and bf16 compute stays within bf16's few percent of
    diffusers' fp32 output."""
    from jaxdiff.models.unet import UNet2DConditionModel

    tm, cfg, params, inputs = tiling_unet_case()
    ref = torch_unet_output(tm, inputs)
    x, t, ctx = inputs

    model = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    args = ({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)

    def rel_rms() -> float:
        out = np.asarray(jax.jit(model.apply)(*args), np.float32).transpose(0, 3, 1, 2)
        return float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref**2)))

    plain = rel_rms()
    fused_switch("interpret")
    assert _pallas_calls(model.apply, *args) == 3
    fused = rel_rms()
    print(f"\n[bf16 UNet] relative RMS error: plain {plain:.3g}, fused GEGLU {fused:.3g}")
    assert fused < 0.03 and fused < 1.1 * plain, (fused, plain)
