"""Schedules, forward process, training targets and SchedulerConfig vs diffusers 0.42.1."""

import inspect
import json
import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.schedules import (
    CLASS_DEFAULTS,
    CLASS_TO_SAMPLER,
    IGNORED_KEYS,
    PINNED_KEYS,
    SAMPLER_TO_CLASS,
    SchedulerConfig,
)

warnings.filterwarnings("ignore", category=FutureWarning)
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
from diffusers.training_utils import compute_snr  # noqa: E402

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

BETA_CASES = {
    "sd_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    ),
    "trained": dict(trained_betas=list(np.linspace(1e-4, 0.03, 1000))),
}


@pytest.mark.parametrize("case", sorted(BETA_CASES))
def test_alphas_cumprod_match_diffusers(case):
    kw = BETA_CASES[case]
    ref = diffusers.DDPMScheduler(**kw)
    cfg = SchedulerConfig.from_dict(kw)
    # The zero-SNR rescale recovers betas as 1 - alpha_bar_t / alpha_bar_(t-1) in float32,
    # which turns the last-ulp differences of torch.linspace into ~1e-4 relative noise.
    rtol = 1e-3 if case == "zero_snr" else 2e-6
    np.testing.assert_allclose(schedules.betas(cfg), ref.betas.numpy(), rtol=rtol, atol=1e-9)
    ac = schedules.alphas_cumprod(cfg)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-7)
    if case == "zero_snr":
        assert ac[-1] == 0.0  # exactly zero terminal SNR


@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 50, 61, 999])
def test_spaced_timesteps_match_ddim(spacing, n):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    ours = schedules.spaced_timesteps(spacing, n, 1000, 0)
    want = ref.timesteps.numpy()
    if spacing == "trailing" and n == 61:
        # diffusers' np.arange(T, 0, -T/n) gives 62 points ending in t = -1 here; we
        # keep the n intended ones.
        assert len(want) == 62 and want[-1] == -1
        want = want[:n]
    assert len(ours) == n
    np.testing.assert_array_equal(ours, want)


def _ddpm_ref():
    return diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )


def _batch(seed=0, shape=(6, 4, 4, 3)):
    rs = np.random.RandomState(seed)
    x0 = rs.randn(*shape).astype(np.float32) * 1.7
    noise = rs.randn(*shape).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])[: shape[0]]
    return x0, noise, t


def test_add_noise_and_velocity_match_diffusers():
    ref = _ddpm_ref()
    ac = schedules.alphas_cumprod(SchedulerConfig.from_dict(dict(ref.config)))
    x0, noise, t = _batch()
    tt = torch.from_numpy(t)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    got = np.asarray(schedules.add_noise(jnp.asarray(x0), jnp.asarray(noise), t, ac))
    assert np.abs(got - want).max() <= 1e-6
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    got_v = np.asarray(schedules.get_velocity(jnp.asarray(x0), jnp.asarray(noise), t, ac))
    assert np.abs(got_v - want_v).max() <= 1e-6
    # Not vacuous: different timesteps give visibly different x_t.
    assert np.abs(got[0] - got[-1]).max() > 1.0


def test_training_targets():
    ref = _ddpm_ref()
    ac = schedules.alphas_cumprod(SchedulerConfig.from_dict(dict(ref.config)))
    x0, noise, t = _batch(1)
    args = (jnp.asarray(x0), jnp.asarray(noise), t, ac)
    np.testing.assert_array_equal(schedules.training_target("epsilon", *args), noise)
    np.testing.assert_array_equal(schedules.training_target("sample", *args), x0)
    v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    got = np.asarray(schedules.training_target("v_prediction", *args))
    assert np.abs(got - v.numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="epsilon"):
        schedules.training_target("x", *args)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_train_script(prediction_type):
    ref = _ddpm_ref()
    ac = schedules.alphas_cumprod(SchedulerConfig.from_dict(dict(ref.config)))
    t = np.array([0, 10, 100, 300, 600, 999])
    gamma = 5.0
    snr = compute_snr(ref, torch.from_numpy(t))
    # diffusers examples/text_to_image/train_text_to_image.py (min-SNR branch).
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    got = np.asarray(schedules.min_snr_weights(t, ac, gamma, prediction_type))
    np.testing.assert_allclose(got, w.numpy(), rtol=1e-5)
    assert got.min() < got.max()  # the clamp is active somewhere


def test_min_snr_weights_zero_terminal_snr_is_finite():
    cfg = SchedulerConfig.from_dict(BETA_CASES["zero_snr"])
    ac = schedules.alphas_cumprod(cfg)
    w = np.asarray(schedules.min_snr_weights(np.array([999, 998]), ac, 5.0, "epsilon"))
    assert np.all(np.isfinite(w)) and w[0] == 1.0


def test_sigma_helpers():
    k = schedules.karras_sigmas(0.03, 14.6, 10)
    assert k[0] == pytest.approx(14.6) and k[-1] == pytest.approx(0.03)
    assert np.all(np.diff(k) < 0)
    e = schedules.exponential_sigmas(0.03, 14.6, 10)
    np.testing.assert_allclose(np.diff(np.log(e)), np.log(0.03 / 14.6) / 9)
    ac = schedules.alphas_cumprod(SchedulerConfig.stable_diffusion())
    train = schedules.train_sigmas(ac)
    t = schedules.sigma_to_t(train[[0, 10, 500, 999]], np.log(train))
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-4)


# -- SchedulerConfig ------------------------------------------------------------------


def test_class_defaults_match_diffusers_signatures():
    for cls_name, defaults in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        for key, value in defaults.items():
            assert key in params, (cls_name, key)
            assert params[key].default == value, (cls_name, key, params[key].default, value)
        # Every modelled key the class takes is in our table.
        modelled = {f for f in SchedulerConfig.__dataclass_fields__} - {"class_name"}
        assert modelled & set(params) == set(defaults), cls_name


def test_every_diffusers_argument_is_known():
    modelled = set(SchedulerConfig.__dataclass_fields__) - {"class_name"}
    known = modelled | IGNORED_KEYS | set(PINNED_KEYS)
    for cls_name in CLASS_TO_SAMPLER:
        params = set(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)
        assert params - {"self"} <= known, (cls_name, params - {"self"} - known)


@pytest.mark.parametrize("cls_name", sorted(CLASS_TO_SAMPLER))
def test_diffusers_saved_default_configs_load(cls_name, tmp_path):
    sched = getattr(diffusers, cls_name)()
    sched.save_config(tmp_path)
    cfg = SchedulerConfig.from_json(tmp_path)
    assert cfg.default_sampler == CLASS_TO_SAMPLER[cls_name]
    # Written back for that class, the values are diffusers' own.
    exported = cfg.to_dict()
    assert exported["_class_name"] == cls_name
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    for key, value in exported.items():
        if key == "skip_prk_steps":
            continue
        assert saved[key] == value, (key, saved[key], value)


@pytest.mark.parametrize("sampler", sorted(SAMPLER_TO_CLASS))
def test_resolve_matches_diffusers_scheduler_swap(sampler):
    """Swapping SD 1.5's PNDM config to another class: present keys carry over,
    absent ones take the new class's defaults (e.g. euler -> "linspace")."""
    pndm = diffusers.PNDMScheduler.from_config(SD15)
    swapped = getattr(diffusers, SAMPLER_TO_CLASS[sampler]).from_config(pndm.config)
    resolved = SchedulerConfig.from_dict(dict(pndm.config)).resolve(sampler)
    for key in CLASS_DEFAULTS[SAMPLER_TO_CLASS[sampler]]:
        want = swapped.config[key]
        got = getattr(resolved, key)
        assert (list(got) if isinstance(got, tuple) else got) == want, (key, got, want)


def test_from_dict_sd15_and_round_trip(tmp_path):
    cfg = SchedulerConfig.from_dict(SD15)
    assert cfg.default_sampler == "pndm"
    assert cfg.beta_schedule == "scaled_linear" and cfg.steps_offset == 1
    assert cfg.timestep_spacing is None  # not in the file: resolved per sampler
    assert cfg.resolve("pndm").timestep_spacing == "leading"
    assert cfg.resolve("euler").timestep_spacing == "linspace"
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    assert SchedulerConfig.from_json(path) == cfg
    d = cfg.to_dict("euler")
    assert d["_class_name"] == "EulerDiscreteScheduler"
    again = SchedulerConfig.from_dict(d)
    assert again.resolve("euler") == dataclasses_replace(cfg.resolve("euler"), again.class_name)
    assert SchedulerConfig.stable_diffusion() == dataclasses_replace(cfg, "PNDMScheduler")


def dataclasses_replace(cfg, class_name):
    import dataclasses

    return dataclasses.replace(cfg, class_name=class_name)


def test_use_default_values_are_not_carried_over():
    d = dict(SD15, timestep_spacing="leading", _use_default_values=["timestep_spacing"])
    assert SchedulerConfig.from_dict(d).resolve("euler").timestep_spacing == "linspace"


@pytest.mark.parametrize(
    "key,value,valid",
    [
        ("beta_schedule", "foo", "scaled_linear"),
        ("timestep_spacing", "bar", "trailing"),
        ("prediction_type", "x", "v_prediction"),
        ("variance_type", "learned", "fixed_small"),
        ("_class_name", "KDPM2DiscreteScheduler", "EulerDiscreteScheduler"),
    ],
)
def test_bad_values_list_valid_ones(key, value, valid):
    with pytest.raises(ValueError, match=valid) as info:
        SchedulerConfig.from_dict(dict(SD15, **{key: value}))
    assert repr(value) in str(info.value)


def test_unknown_key_and_pinned_values_rejected():
    with pytest.raises(ValueError, match="unknown scheduler config key 'beta_strat'") as info:
        SchedulerConfig.from_dict(dict(SD15, beta_strat=0.1))
    assert "beta_start" in str(info.value)
    with pytest.raises(ValueError, match="thresholding"):
        SchedulerConfig.from_dict(dict(SD15, thresholding=True))
    with pytest.raises(ValueError, match="solver_order"):
        SchedulerConfig.from_dict(dict(SD15, solver_order=3))
    # At their implemented values pinned keys load fine.
    SchedulerConfig.from_dict(
        dict(SD15, thresholding=False, solver_order=2, lambda_min_clipped=-math.inf)
    )
    with pytest.raises(ValueError, match="exclusive"):
        SchedulerConfig(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        SchedulerConfig(num_train_timesteps=0)
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        SchedulerConfig(num_train_timesteps=10, trained_betas=(0.1, 0.2, 0.3))
