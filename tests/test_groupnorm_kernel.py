"""GroupNorm statistics from the Pallas kernel (run here in its interpreter) against
float64 two-pass statistics, PyTorch's GroupNorm, and diffusers' UNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_sd import tiling_unet_case, torch_unet_output  # noqa: E402

from jaxdiff.models import groupnorm_kernel, layers  # noqa: E402
from jaxdiff.models.groupnorm_kernel import (  # noqa: E402
    channel_stats,
    channel_stats_reference,
    group_stats,
)


def _pallas_calls(fn, *args) -> int:
    # Traced afresh (a new function each time: make_jaxpr caches a function's trace).
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("pallas_call")


def _data(shape, mean=0.0, std=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * std + mean).astype(np.float32)


def test_channel_stats_match_their_definition():
    # Four row tiles, three channel blocks, channels far from zero.
    x = jnp.asarray(_data((2, 4 * 256, 3 * 64), mean=50.0))
    mean, m2 = channel_stats(x, True)
    want_mean, want_m2 = channel_stats_reference(x, 256)
    assert mean.shape == m2.shape == (2, 4, 192)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(want_mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(want_m2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "mean, std", [(0.0, 1.0), (100.0, 0.01)], ids=["centred", "mean_10000_stds_away"]
)
def test_group_stats_match_float64_two_pass(mean, std):
    """Split into parts along the channels, with an offset, against float64; also where
    a group's mean is 10^4 of its standard deviations from zero (what a one-pass sum of
    squares would lose)."""
    b, r, groups = 2, 512, 8
    parts = [_data((b, r, 64), mean, std, seed=2), _data((b, r, 128), mean, std, seed=3)]
    offset = _data((b, 192), std=std, seed=4)
    got_mean, got_var = group_stats(
        [jnp.asarray(p) for p in parts], jnp.asarray(offset), groups, True
    )
    x = np.concatenate(parts, axis=-1).astype(np.float64) + offset[:, None, :]
    g = x.reshape(b, r, groups, 192 // groups)
    np.testing.assert_allclose(np.asarray(got_mean), g.mean(axis=(1, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_var), g.var(axis=(1, 3)), rtol=1e-4)


def test_gradients_are_the_reference_statistics_gradients():
    """Through the kernel's custom VJP and through GroupNorm's statistics as a whole
    (offset included), against plain jax."""
    x = jnp.asarray(_data((2, 512, 64)))
    offset = jnp.asarray(_data((2, 64), seed=5))
    w = jnp.asarray(_data((2, 2, 64), seed=6))

    def loss(stats):
        return lambda a: jnp.sum((stats(a)[0] + stats(a)[1]) * w)

    got = jax.grad(loss(lambda a: channel_stats(a, True)))(x)
    want = jax.grad(loss(lambda a: channel_stats_reference(a, 256)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).max()) > 0

    def plain(a, o):
        g = (a + o[:, None, :]).reshape(2, 512, 8, 8)
        return jnp.mean(g, axis=(1, 3)), jnp.var(g, axis=(1, 3))

    wg = jnp.asarray(_data((2, 8), seed=7))

    def grads(stats):
        loss = lambda a, o: jnp.sum((stats(a, o)[0] + stats(a, o)[1]) * wg)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(x, offset)

    for g, v in zip(grads(lambda a, o: group_stats([a], o, 8, True)), grads(plain)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-4, atol=1e-6)


def test_shapes_that_do_not_tile_are_refused():
    assert groupnorm_kernel.fits(64, 128) and groupnorm_kernel.fits(4096, 320)
    assert not groupnorm_kernel.fits(99, 128)  # 9 x 11 latents
    assert not groupnorm_kernel.fits(384, 128)  # not a multiple of the 256-row tile
    assert not groupnorm_kernel.fits(64, 96)
    with pytest.raises(ValueError, match="do not split"):
        channel_stats(jnp.zeros((1, 99, 64)), True)


def test_groupnorm_module_with_kernel_matches_torch(monkeypatch):
    """layers.GroupNorm with the kernel's statistics against torch.nn.GroupNorm, on a
    resnet's input given as its two parts (no concatenation for the statistics)."""
    a, skip = _data((2, 8, 8, 64), 1.0, 2.0, seed=7), _data((2, 8, 8, 128), seed=8)
    x = np.concatenate([a, skip], axis=-1)
    tn = torch.nn.GroupNorm(16, 192, eps=1e-5)
    with torch.no_grad():
        tn.weight.normal_()
        tn.bias.normal_()
        want = tn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    params = {"params": {"scale": tn.weight.detach().numpy(), "bias": tn.bias.detach().numpy()}}
    gn = layers.GroupNorm(16)

    def apply(p, x, a, s):
        return gn.apply(p, x, parts=(a, s))

    monkeypatch.setattr(layers, "_GROUPNORM_PALLAS", "interpret")
    assert _pallas_calls(apply, params, x, a, skip) == 2  # one per part
    got = np.asarray(jax.jit(apply)(params, x, a, skip))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not make up"):
        gn.apply(params, x, parts=(a, skip[..., :64]))
    # Off by default; and never the real kernel on a CPU.
    for switch in (False, True):
        monkeypatch.setattr(layers, "_GROUPNORM_PALLAS", switch)
        assert _pallas_calls(apply, params, x, a, skip) == 0


def test_unet_with_kernel_statistics_matches_diffusers(monkeypatch):
    """A tiny SD 1.x UNet whose every GroupNorm tiles (64 / 128 channels, 8x8 and 4x4
    maps; the up-blocks' input and skip read as parts), in fp32 against diffusers."""
    from jaxdiff.models.unet import UNet2DConditionModel

    tm, cfg, params, inputs = tiling_unet_case()
    want = torch_unet_output(tm, inputs)
    x, t, ctx = inputs

    monkeypatch.setattr(layers, "_GROUPNORM_PALLAS", "interpret")
    model = UNet2DConditionModel(cfg)
    args = ({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    # 21 GroupNorms (2 in each of 9 resnets, 2 transformers' input norms, the output
    # norm); the 4 up-block resnets' first norms read two parts each.
    assert _pallas_calls(model.apply, *args) == 21 + 4
    got = np.asarray(jax.jit(model.apply)(*args)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
