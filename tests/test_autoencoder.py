"""AutoencoderKL parity with diffusers' PyTorch AutoencoderKL at tiny random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jaxdiff.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    abstract_autoencoder_params,
    init_autoencoder,
    scale_latents,
    unscale_latents,
    vae_decode,
    vae_encode,
)
from jaxdiff.weights.common import params_to_state_dict, state_dict_to_params

TOL = 1e-4

# Two shapes: the SD layout shrunk (2 blocks, quant convs, mid attention), and a
# 3-block variant with 2 resnets per block and the optional parts switched off.
SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
DEEP = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=3,
    sample_size=16,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# config (and dtype) are static: hashable frozen dataclasses.
encode_jit = jax.jit(vae_encode, static_argnums=(2, 3))
decode_jit = jax.jit(vae_decode, static_argnums=(2, 3))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def build(kwargs, seed):
    """Seeded torch VAE, our config, converted params, and random test inputs."""
    torch.manual_seed(seed)
    tm = TorchAutoencoderKL(**kwargs).eval()
    # Random (not zero) biases/norm affine so every parameter is exercised.
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = AutoencoderConfig.from_diffusers(dict(tm.config))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = state_dict_to_params(sd, abstract_autoencoder_params(cfg), what="vae")
    size = kwargs["sample_size"]
    f = cfg.downsample_factor
    x = torch.rand(2, 3, size, size) * 2 - 1
    z = torch.randn(2, cfg.latent_channels, size // f, size // f)
    return tm, cfg, sd, params, x, z


@pytest.fixture(scope="module")
def small():
    return build(SMALL, seed=0)


@pytest.mark.parametrize("which", ["small", "deep"])
def test_encode_decode_match_diffusers(which, small):
    tm, cfg, _, params, x, z = small if which == "small" else build(DEEP, seed=1)
    with torch.no_grad():
        post = tm.encode(x).latent_dist
        dec = tm.decode(z).sample
    ours = encode_jit(params, jnp.asarray(nhwc(x)), cfg)
    img = decode_jit(params, jnp.asarray(nhwc(z)), cfg)
    assert ours.mean.shape == nhwc(post.mean).shape
    assert img.shape == nhwc(dec).shape
    d_mean = maxdiff(ours.mean, nhwc(post.mean))
    d_logvar = maxdiff(ours.logvar, nhwc(post.logvar))
    d_dec = maxdiff(img, nhwc(dec))
    print(f"\n[{which}] max|diff| mean {d_mean:.2e} logvar {d_logvar:.2e} decode {d_dec:.2e}")
    assert d_mean <= TOL and d_logvar <= TOL and d_dec <= TOL
    # The KL term is a sum over h*w*C elements: compare relatively.
    np.testing.assert_allclose(ours.kl(), post.kl().numpy(), rtol=1e-5)


def test_module_methods_and_call(small):
    """``model.apply(..., method=model.encode)`` and ``__call__`` (encode -> mode -> decode)."""
    tm, cfg, _, params, x, _ = small
    model = AutoencoderKL(cfg)
    with torch.no_grad():
        ref_mean = nhwc(tm.encode(x).latent_dist.mean)
        ref_recon = nhwc(tm(x, sample_posterior=False).sample)
    post = model.apply({"params": params}, jnp.asarray(nhwc(x)), method=model.encode)
    assert isinstance(post, DiagonalGaussian)
    assert maxdiff(post.mean, ref_mean) <= TOL
    recon = jax.jit(model.apply)({"params": params}, jnp.asarray(nhwc(x)))
    d = maxdiff(recon, ref_recon)
    print(f"\n[small] max|diff| reconstruction {d:.2e}")
    assert d <= TOL


def test_bfloat16_compute(small):
    """bf16 compute: fp32 params, fp32 posterior, bf16 image, close to the fp32 result."""
    _, cfg, _, params, x, z = small
    post = encode_jit(params, jnp.asarray(nhwc(x)), cfg, jnp.bfloat16)
    img = decode_jit(params, jnp.asarray(nhwc(z)), cfg, jnp.bfloat16)
    assert post.mean.dtype == jnp.float32 and img.dtype == jnp.bfloat16
    ref_post = encode_jit(params, jnp.asarray(nhwc(x)), cfg)
    ref_img = decode_jit(params, jnp.asarray(nhwc(z)), cfg)
    d_mean, d_img = maxdiff(post.mean, ref_post.mean), maxdiff(img, ref_img)
    print(f"\n[small bf16 vs fp32] max|diff| mean {d_mean:.2e} decode {d_img:.2e}")
    assert d_mean < 0.1 * float(jnp.max(jnp.abs(ref_post.mean)))
    assert d_img < 0.1 * float(jnp.max(jnp.abs(ref_img)))


def test_posterior_sample_clip_and_kl():
    rng = jax.random.key(3)
    moments = jax.random.normal(rng, (2, 4, 4, 6)) * 3.0
    moments = moments.at[0, 0, 0, 3].set(100.0).at[0, 0, 0, 4].set(-100.0)
    post = DiagonalGaussian.from_moments(moments)
    assert post.mean.shape == post.logvar.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(post.mean, moments[..., :3])
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 0, 1]) == -30.0
    np.testing.assert_allclose(post.std, np.exp(0.5 * np.asarray(post.logvar)), rtol=1e-6)
    assert post.mode() is post.mean
    # sample = mean + std * eps with eps the standard normal drawn from the same key.
    key = jax.random.key(7)
    eps = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(post.sample(key), post.mean + post.std * eps, rtol=1e-6)
    assert not np.allclose(post.sample(key), post.sample(jax.random.key(8)))
    # KL of the standard normal to itself is 0.
    zero = DiagonalGaussian(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
    np.testing.assert_array_equal(zero.kl(), [0.0])


def test_params_round_trip_exactly(small):
    _, _, sd, params, _, _ = small
    back = params_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_init_matches_abstract_and_is_random():
    cfg = AutoencoderConfig(**{**SMALL, "sample_size": 16})
    params = init_autoencoder(cfg, jax.random.key(0))
    abstract = abstract_autoencoder_params(cfg)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    k = params["encoder"]["conv_in"]["kernel"]
    assert k.shape == (3, 3, 3, 32) and float(jnp.std(k)) > 0


def test_config_round_trip_through_diffusers():
    cfg = AutoencoderConfig(**DEEP, shift_factor=0.1, scaling_factor=0.5)
    d = cfg.to_diffusers()
    assert AutoencoderConfig.from_diffusers(d) == cfg
    tm = TorchAutoencoderKL.from_config(d)
    assert AutoencoderConfig.from_diffusers(dict(tm.config)) == cfg
    hash(cfg)  # static argument to jit
    # Defaults are the SD 1.x/2.x VAE.
    sd = AutoencoderConfig()
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.downsample_factor == 8
    z = jnp.linspace(-2.0, 2.0, 8).reshape(1, 2, 1, 4)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        (
            {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")},
            "down_block_types",
        ),
        ({"up_block_types": ("UpDecoderBlock2D",)}, "same length"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"norm_num_groups": 5}, "norm_num_groups"),
        ({"latents_mean": [0.0, 1.0]}, "latents_mean"),
        ({"norm_type": "spatial"}, "unsupported keys.*norm_type"),
        ({"layers_per_block": 0}, "layers_per_block"),
    ],
)
def test_bad_config_raises(override, match):
    d = {**SMALL, "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", **override}
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig.from_diffusers(d)


def test_bad_input_raises():
    cfg = AutoencoderConfig(**SMALL)
    params = abstract_autoencoder_params(cfg)
    with pytest.raises(ValueError, match="channels"):
        jax.eval_shape(lambda p, x: vae_encode(p, x, cfg), params, jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(lambda p, x: vae_encode(p, x, cfg), params, jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        jax.eval_shape(lambda p, z: vae_decode(p, z, cfg), params, jnp.zeros((8, 8, 4)))
    with pytest.raises(ValueError, match="rng"):
        AutoencoderKL(cfg).init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)), sample_posterior=True)
