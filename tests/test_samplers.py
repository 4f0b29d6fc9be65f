"""Sampler parity with diffusers 0.42.1's PyTorch schedulers.

Each sampler and its diffusers counterpart are driven by the same deterministic
stand-in network from the same start latents; the stochastic ones (ddpm, euler_a, ddim
with eta=1) get the same per-step noise by patching diffusers' ``randn_tensor`` with
``samplers.step_noise``. Run with ``pytest -s`` to see the max |diff| table.
"""

import contextlib
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers
from jaxdiff.schedules import SAMPLER_TO_CLASS, SchedulerConfig

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD15 = {
    "_class_name": "PNDMScheduler",
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
# Cell -> (overrides of SD 1.5's scheduler_config.json, schedule argument).
CELLS = {
    "sd15": ({}, None),
    "trailing": ({"timestep_spacing": "trailing"}, None),
    "linspace": ({"timestep_spacing": "linspace"}, None),
    "v_pred": ({"prediction_type": "v_prediction"}, None),
    "karras": ({"use_karras_sigmas": True}, "karras"),
    "exponential": ({"use_exponential_sigmas": True}, "exponential"),
    "zero_snr": (
        {
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        None,
    ),
    "sample_pred": ({"prediction_type": "sample"}, None),
    "clip_sample": ({"clip_sample": True, "clip_sample_range": 1.5}, None),
    "cosine_karras": ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, "karras"),
}
DETERMINISTIC = ("ddim", "pndm", "lms", "euler", "heun", "dpmpp_2m", "unipc")
STOCHASTIC = ("ddpm", "euler_a", "ddim_eta1")
N_STEPS = 10
SHAPE = (2, 8, 8, 4)
TOL = 1e-4
RESULTS: dict[tuple[str, str], str] = {}


def torch_net(x, t):
    """Stand-in network: smooth, nonlinear in x and t, channel dependent, never zero."""
    t = torch.as_tensor(t, dtype=torch.float32)
    ch = torch.arange(x.shape[-1], dtype=torch.float32)
    gate = torch.sin(t / 90.0 + 0.3)
    return (
        0.8 * x * (1 + 0.1 * torch.cos(t / 150.0))
        + 0.3 * torch.tanh(1.5 * x + 0.2 * ch - 0.5) * gate
    )


def jax_net(x, t):
    t = jnp.asarray(t, jnp.float32)
    ch = jnp.arange(x.shape[-1], dtype=jnp.float32)
    gate = jnp.sin(t / 90.0 + 0.3)
    return (
        0.8 * x * (1 + 0.1 * jnp.cos(t / 150.0)) + 0.3 * jnp.tanh(1.5 * x + 0.2 * ch - 0.5) * gate
    )


@contextlib.contextmanager
def injected_noise(holder):
    """Makes diffusers' ddpm / euler_a draw ``holder["noise"]`` instead of torch noise."""

    def fake_randn(shape, *args, **kwargs):
        assert tuple(shape) == tuple(holder["noise"].shape)
        return holder["noise"].clone()

    with contextlib.ExitStack() as stack:
        for mod in ("scheduling_ddpm", "scheduling_euler_ancestral_discrete"):
            stack.enter_context(
                mock.patch(f"diffusers.schedulers.{mod}.randn_tensor", side_effect=fake_randn)
            )
        yield


def diffusers_scheduler(sampler, cfg_dict, n):
    sch = getattr(diffusers, SAMPLER_TO_CLASS[sampler]).from_config(cfg_dict)
    sch.set_timesteps(n)
    return sch


def run_diffusers(sch, sampler, x_start, *, begin=0, rng=None, eta=0.0, hook=None):
    """The diffusers denoising loop (as its SD pipelines run it) from step ``begin``."""
    timesteps = sch.timesteps[begin:]
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(begin)
    x = torch.from_numpy(np.asarray(x_start))
    holder = {}
    with injected_noise(holder):
        for j, t in enumerate(timesteps):
            i = begin + j
            if rng is not None:
                noise = samplers.step_noise(rng, i, x.shape)
                holder["noise"] = torch.from_numpy(np.array(noise))
            out = torch_net(sch.scale_model_input(x, t), t)
            kwargs = {}
            if sampler == "ddim" and eta > 0:
                kwargs = dict(eta=eta, variance_noise=holder["noise"])
            x = sch.step(out, t, x, **kwargs).prev_sample
            if hook is not None:
                x = hook(x, i + 1, len(sch.timesteps))
    return x.numpy()


@jax.jit
def jax_sample(x_init, plan, rng, eta, start):
    # plan is a pytree argument: one compile per (sampler, prediction type, shapes).
    return samplers.sample(jax_net, x_init, plan, rng=rng, eta=eta, start_index=start)


def _noise(seed=0):
    return np.random.RandomState(seed).randn(*SHAPE).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    names = DETERMINISTIC + STOCHASTIC
    lines = ["", "max |jaxdiff - diffusers| after the full loop (fp32, 10 steps, [2,8,8,4])"]
    lines.append(f"{'cell':<12}" + "".join(f"{n:>11}" for n in names))
    for cell in CELLS:
        row = [RESULTS.get((cell, n), "-") for n in names]
        lines.append(f"{cell:<12}" + "".join(f"{r:>11}" for r in row))
    print("\n".join(lines))


@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_diffusers(cell):
    overrides, schedule = CELLS[cell]
    cfg_dict = dict(SD15, **overrides)
    config = SchedulerConfig.from_dict(cfg_dict)
    noise = _noise()
    key = jax.random.key(42)
    failures, ran = [], 0
    for entry in DETERMINISTIC + STOCHASTIC:
        sampler = "ddim" if entry == "ddim_eta1" else entry
        eta = 1.0 if entry == "ddim_eta1" else 0.0
        try:
            plan = samplers.make_plan(sampler, N_STEPS, config, schedule=schedule)
        except ValueError as e:  # a combination diffusers does not offer
            RESULTS[(cell, entry)] = "skip"
            print(f"skip {cell}/{entry}: {e}")
            continue
        sch = diffusers_scheduler(sampler, cfg_dict, N_STEPS)
        # The plan follows diffusers' timesteps and sigmas (float32 to the last ulp).
        np.testing.assert_allclose(
            plan.timesteps, sch.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=0
        )
        if hasattr(sch, "sigmas") and sampler not in ("ddim", "ddpm", "pndm"):
            np.testing.assert_allclose(plan.sigmas, sch.sigmas.numpy(), rtol=1e-6, atol=0)
        assert float(plan.init_noise_sigma) == pytest.approx(float(sch.init_noise_sigma))
        x_init = noise * float(sch.init_noise_sigma)
        want = run_diffusers(sch, sampler, x_init, rng=key, eta=eta)
        got = np.asarray(jax_sample(x_init, plan, key, eta, 0))
        diff = float(np.abs(got - want).max())
        RESULTS[(cell, entry)] = f"{diff:.1e}"
        ran += 1
        assert np.all(np.isfinite(want)) and np.abs(want).max() > 0.1
        if not diff <= TOL:
            failures.append(f"{entry}: {diff:.2e}")
    assert ran >= 5
    assert not failures, f"{cell}: max |diff| > {TOL}: {failures}"


def test_plan_timesteps_heun_doubled_and_pndm_extra_step():
    config = SchedulerConfig.from_dict(SD15)
    heun = samplers.make_plan("heun", 10, config)
    assert heun.length == 19 and heun.order == 2
    pndm = samplers.make_plan("pndm", 10, config)
    assert pndm.length == 11
    np.testing.assert_array_equal(pndm.timesteps[:4], [901, 801, 801, 701])


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_image_to_image_matches_diffusers(sampler):
    """From start_index k (traced) with noise_latents == diffusers' img2img loop over
    timesteps[k:] after set_begin_index(k), started from scheduler.add_noise."""
    config = SchedulerConfig.from_dict(SD15)
    plan = samplers.make_plan(sampler, N_STEPS, config)
    strength = 0.6
    start = samplers.start_index_for_strength(plan, strength)
    # diffusers StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(N_STEPS * strength), N_STEPS)
    t_start = max(N_STEPS - init_timestep, 0)
    begin = t_start * plan.order
    assert int(start) == begin == 4 * plan.order
    rs = np.random.RandomState(3)
    x0 = rs.randn(*SHAPE).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    key = jax.random.key(7)

    sch = diffusers_scheduler(sampler, SD15, N_STEPS)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(begin)
    latent_t = sch.timesteps[begin : begin + 1]
    x_start = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), latent_t).numpy()
    want = run_diffusers(sch, sampler, x_start, begin=begin, rng=key)

    ours_start = samplers.noise_latents(plan, jnp.asarray(x0), jnp.asarray(noise), start)
    assert np.abs(np.asarray(ours_start) - x_start).max() <= 1e-5
    got = np.asarray(jax_sample(ours_start, plan, key, 0.0, start))
    diff = float(np.abs(got - want).max())
    print(f"img2img {sampler}: start {begin}, max |diff| {diff:.1e}")
    assert diff <= TOL
    # Starting later really changes the result (start_index is not ignored).
    full = np.asarray(jax_sample(ours_start, plan, key, 0.0, 0))
    assert np.abs(full - got).max() > 1e-2


def test_static_and_traced_start_index_agree():
    plan = samplers.make_plan("dpmpp_2m", N_STEPS, SchedulerConfig.from_dict(SD15))
    x = jnp.asarray(_noise(5))
    static = samplers.sample(jax_net, x, plan, rng=None, start_index=3)
    traced = jax_sample(x, plan, jax.random.key(0), 0.0, 3)
    np.testing.assert_allclose(np.asarray(static), np.asarray(traced), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m", "unipc"])
def test_inpaint_step_hook_matches_diffusers(sampler):
    """step_hook + noise_latents(next_index) == diffusers' legacy 4-channel inpaint
    re-blend: after step i, known pixels <- add_noise(init, noise, timesteps[i+1])."""
    config = SchedulerConfig.from_dict(SD15)
    plan = samplers.make_plan(sampler, N_STEPS, config)
    rs = np.random.RandomState(11)
    init = rs.randn(*SHAPE).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    mask = (rs.rand(SHAPE[0], SHAPE[1], SHAPE[2], 1) > 0.5).astype(np.float32)
    init_t, noise_t, mask_t = map(torch.from_numpy, (init, noise, mask))
    sch = diffusers_scheduler(sampler, SD15, N_STEPS)

    def torch_hook(x, nxt, total):
        proper = init_t
        if nxt < total:
            proper = sch.add_noise(init_t, noise_t, sch.timesteps[nxt : nxt + 1])
        return (1 - mask_t) * proper + mask_t * x

    x_init = noise * float(sch.init_noise_sigma)
    want = run_diffusers(sch, sampler, x_init, hook=torch_hook)

    def hook(x, nxt):
        return (1 - mask) * samplers.noise_latents(plan, init, noise, nxt) + mask * x

    got = np.asarray(
        jax.jit(lambda x: samplers.sample(jax_net, x, plan, rng=None, step_hook=hook))(x_init)
    )
    assert np.abs(got - want).max() <= TOL
    # The known region ends at the clean init latents.
    np.testing.assert_allclose(got * (1 - mask), init * (1 - mask), atol=1e-6)
