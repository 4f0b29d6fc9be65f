"""Diffusion samplers as pure functions: one ``lax.scan`` over a static step plan.

Three layers, as in k-diffusion:

* ``make_plan`` (numpy, once, static): the timesteps the network sees, the sigmas /
  alpha_bars of every step and every per-step solver coefficient, reproducing the
  numerics of the matching diffusers 0.42 scheduler for the same scheduler_config.json
  (ddim -> DDIMScheduler, pndm -> PNDMScheduler (PLMS, skip_prk_steps), lms ->
  LMSDiscreteScheduler (order 4), euler -> EulerDiscreteScheduler, euler_a ->
  EulerAncestralDiscreteScheduler, heun -> HeunDiscreteScheduler, dpmpp_2m ->
  DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final),
  unipc -> UniPCMultistepScheduler (bh2, order 2, predict_x0), ddpm -> DDPMScheduler).
* the model: ``model_fn(x_in, t) -> raw output`` (epsilon / v / sample), turned into
  (x_0, eps) by ``denoisers.to_x0_eps``; guidance is a wrapper around it.
* ``sample``: one scan over the plan. Each step calls the network once and applies
  the solver's update; multistep history (PLMS, LMS, Heun, DPM-Solver++, UniPC) is a
  NamedTuple in the scan carry, and every choice that depends on the step
  (first/second order, warm-up) is ``jnp.where`` on the step counter, so a plan jits
  once and a traced ``start_index`` (image-to-image) needs no recompilation.

Each sampler works in the space its diffusers scheduler works in: ddim/ddpm/pndm/
dpmpp_2m/unipc on the variance-preserving x_t = sqrt(alpha_bar) x_0 + sqrt(1 -
alpha_bar) eps; euler/euler_a/lms/heun on the variance-exploding x = x_0 + sigma eps
(x_t / sqrt(alpha_bar)). ``initial_latents``, ``noise_latents`` and the
``step_hook`` all speak that "own space", so pipelines never need to know which is which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.denoisers import ModelFn, to_x0_eps
from jaxdiff.schedules import SAMPLER_TO_CLASS, SchedulerConfig

SAMPLERS: tuple[str, ...] = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "unipc",
    "ddpm",
)
SCHEDULES: tuple[str | None, ...] = (None, "karras", "exponential")

# Which diffusers classes take which options (their __init__ signatures).
_SIGMA_SCHEDULE_SAMPLERS = ("lms", "euler", "heun", "dpmpp_2m", "unipc")
_ZERO_SNR_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "ddpm")
_VE_SAMPLERS = ("lms", "euler", "euler_a", "heun")  # work on x_0 + sigma eps
_STOCHASTIC = ("ddpm", "euler_a", "ddim")  # draw per-step noise (ddim: when eta > 0)
_NO_SAMPLE_PREDICTION = ("pndm", "euler_a")  # diffusers raises for prediction "sample"


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Everything static about one sampling run: S network evaluations.

    A pytree: the arrays are leaves, so a plan can be closed over (constants) or passed
    into a jitted function as an argument (then plans with equal shapes, e.g. another
    schedule with the same step count, reuse the compiled function). The strings and
    ints are static metadata.

    Attributes:
      sampler: a name from SAMPLERS.
      prediction_type: what the network outputs ("epsilon", "v_prediction", "sample").
      num_steps: inference steps asked for (n); ``length`` S may differ (heun: 2n - 1,
        pndm: n + 1), as in diffusers' ``len(scheduler.timesteps)``.
      order: diffusers' ``scheduler.order`` (2 for heun), for image-to-image slicing.
      clip_sample_range: clamp predicted x_0 to +-this (ddim/ddpm/heun with
        clip_sample), or None.
      timesteps: [S] float32, the t passed to the network at each step (diffusers'
        ``scheduler.timesteps``; fractional for karras/exponential sigma-space ones).
      sigmas: [S+1] float32, diffusers' ``scheduler.sigmas`` for the sigma-based
        samplers; for ddim/ddpm/pndm sqrt((1 - alpha_bar)/alpha_bar) at each timestep,
        then 0.
      alpha_bar: [S] float32, alpha_bar of the network input at each step.
      in_scale: [S] float32, x_in = x * in_scale (diffusers' ``scale_model_input``).
      init_noise_sigma: [] float32, diffusers' ``init_noise_sigma``.
      noise_signal, noise_sigma: [S+1] float32, ``noise_latents`` at index i is
        noise_signal[i] x_0 + noise_sigma[i] eps (index S: the clean x_0).
      coefs: per-step solver coefficients, each [S] or [S, k] float32.
    """

    sampler: str
    prediction_type: str
    num_steps: int
    order: int
    clip_sample_range: float | None
    timesteps: Any
    sigmas: Any
    alpha_bar: Any
    in_scale: Any
    init_noise_sigma: Any
    noise_signal: Any
    noise_sigma: Any
    coefs: dict[str, Any]

    @property
    def length(self) -> int:
        """S, the number of network evaluations (scan steps)."""
        return int(np.shape(self.timesteps)[0])


jax.tree_util.register_dataclass(
    SamplerPlan,
    data_fields=[
        "timesteps",
        "sigmas",
        "alpha_bar",
        "in_scale",
        "init_noise_sigma",
        "noise_signal",
        "noise_sigma",
        "coefs",
    ],
    meta_fields=["sampler", "prediction_type", "num_steps", "order", "clip_sample_range"],
)


# -- plans ----------------------------------------------------------------------------


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _ve_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """Euler/LMS/Heun timesteps: like spaced_timesteps but "linspace" is not rounded."""
    t = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, t - 1, n, dtype=np.float32)[::-1].copy()
    return schedules.spaced_timesteps(cfg.timestep_spacing, n, t, cfg.steps_offset).astype(
        np.float32
    )


def _multistep_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """DPM-Solver/UniPC timesteps: leading and linspace drop the last of n + 1 points."""
    t, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if spacing == "trailing":
        return schedules.spaced_timesteps(spacing, n, t)
    return schedules.spaced_timesteps(spacing, n + 1, t, cfg.steps_offset)[:-1]


def _sigma_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    ac = schedules.alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        # The sigma-based diffusers schedulers replace alpha_bar_T = 0 by 2^-24 so that
        # sigma_T = 4096 stays finite.
        ac = ac.copy()
        ac[-1] = 2.0**-24
    return ac


def _vp_noise(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ab = np.asarray(ab, np.float64)
    return np.append(np.sqrt(ab), 1.0), np.append(np.sqrt(1 - ab), 0.0)


def _vp_sigmas(ab: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.append(np.sqrt((1 - ab.astype(np.float64)) / ab), 0.0)


def _alpha_sigma_lambda(sig: np.ndarray):
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t) of VE sigmas, float64."""
    sig = np.asarray(sig, np.float64)
    alpha = 1.0 / np.sqrt(sig**2 + 1)
    sigma_vp = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_vp)
    return alpha, sigma_vp, lam


def _plan_vp(sampler: str, cfg: SchedulerConfig, n: int) -> dict[str, Any]:
    """ddim, ddpm, pndm: discrete timesteps, alpha_bar indexed by integer t."""
    ac = schedules.alphas_cumprod(cfg)
    t_train = cfg.num_train_timesteps
    final_ab = 1.0 if cfg.set_alpha_to_one else float(ac[0])
    ratio = t_train // n  # diffusers' step size for "prev_timestep" in ddim/pndm

    def ab_at(ts: np.ndarray, final: float) -> np.ndarray:
        ts = np.asarray(ts)
        return np.where(ts >= 0, ac[np.clip(ts, 0, t_train - 1)], final)

    coefs: dict[str, np.ndarray] = {}
    if sampler == "pndm":
        asc = schedules.spaced_timesteps(cfg.timestep_spacing, n, t_train, cfg.steps_offset)
        asc = asc[::-1]
        # PLMS with skip_prk_steps: one extra evaluation at the second-highest step.
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)
        # Step counter 1 is PLMS' Heun-like correction: it re-takes the first step
        # (t + ratio -> t) with the average of the two outputs.
        coefs["ab_cur"] = ab_at(ts, final_ab)
        coefs["ab_prev"] = ab_at(ts - ratio, final_ab)
        coefs["ab_cur1"] = ab_at(np.minimum(ts + ratio, t_train - 1), final_ab)
        coefs["ab_prev1"] = ab_at(ts, final_ab)
    else:
        ts = schedules.spaced_timesteps(cfg.timestep_spacing, n, t_train, cfg.steps_offset)
        if sampler == "ddim":
            # diffusers' DDIM always steps to t - T // n, whatever the spacing.
            coefs["ab_prev"] = ab_at(ts - ratio, final_ab)
        else:  # ddpm: to the next timestep of the plan, alpha_bar = 1 after the last
            ab_t = ac[ts].astype(np.float64)
            ab_prev = np.append(ac[ts[1:]], 1.0).astype(np.float64)
            beta = 1 - ab_t / ab_prev
            if cfg.variance_type == "fixed_large":
                var = beta
            else:  # fixed_small: the posterior variance beta_tilde (Ho et al. eq. 7)
                var = np.maximum((1 - ab_prev) / (1 - ab_t) * beta, 1e-20)
            coefs["ab_prev"] = ab_prev
            coefs["noise_std"] = np.where(ts > 0, np.sqrt(var), 0.0)
    ab = ac[ts]
    signal, sigma = _vp_noise(ab)
    return dict(
        timesteps=ts,
        sigmas=_vp_sigmas(ab),
        alpha_bar=ab,
        in_scale=np.ones(len(ts)),
        init_noise_sigma=1.0,
        noise_signal=signal,
        noise_sigma=sigma,
        coefs=coefs,
    )


def _ve_sigmas_timesteps(cfg: SchedulerConfig, n: int, ac: np.ndarray):
    ts = _ve_timesteps(cfg, n)
    train = schedules.train_sigmas(ac)
    sig = np.interp(ts, np.arange(len(train)), train)
    if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
        make = schedules.karras_sigmas if cfg.use_karras_sigmas else schedules.exponential_sigmas
        sig = make(float(sig[-1]), float(sig[0]), n)
        ts = schedules.sigma_to_t(sig, np.log(train))
    return ts.astype(np.float32), np.append(sig, 0.0).astype(np.float32)


def _plan_ve(sampler: str, cfg: SchedulerConfig, n: int) -> dict[str, Any]:
    """euler, euler_a, lms, heun: sigma-space (k-diffusion) samplers."""
    ac = _sigma_alphas_cumprod(cfg)
    ts, sig = _ve_sigmas_timesteps(cfg, n, ac)
    if sampler == "heun":
        # Each interior sigma is visited twice: Euler predictor, then trapezoid corrector.
        ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
        sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
    s64 = sig.astype(np.float64)
    coefs: dict[str, np.ndarray] = {}
    if sampler == "euler_a":
        # Ancestral step (k-diffusion get_ancestral_step): go down to sigma_down
        # deterministically, then add sigma_up noise, sigma_down^2 + sigma_up^2 = s_next^2.
        s, s_next = s64[:-1], s64[1:]
        up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        coefs["sigma_up"] = up
        coefs["sigma_down"] = np.sqrt(s_next**2 - up**2)
    elif sampler == "lms":
        coefs["lms"] = _lms_coefficients(sig)
    max_sigma = float(sig.max())
    if cfg.timestep_spacing in ("linspace", "trailing"):
        init_sigma = max_sigma
    else:
        init_sigma = float(np.sqrt(np.float32(max_sigma) ** 2 + np.float32(1)))
    return dict(
        timesteps=ts,
        sigmas=sig,
        alpha_bar=1.0 / (s64[:-1] ** 2 + 1),
        in_scale=1.0 / np.sqrt(s64[:-1] ** 2 + 1),
        init_noise_sigma=init_sigma,
        noise_signal=np.ones(len(sig)),
        noise_sigma=sig,
        coefs=coefs,
    )


def _lms_coefficients(sig: np.ndarray, max_order: int = 4) -> np.ndarray:
    """Linear multistep weights: coef[i, j] = int_{s_i}^{s_(i+1)} l_j(s) ds, l_j the
    Lagrange basis polynomial of node s_(i-j) over nodes s_i..s_(i-o+1), o = min(i+1, 4).

    Like diffusers, the order uses the absolute step index even when fewer derivatives
    exist (image-to-image); ``sample`` then drops the missing terms, as its zip does.

    Returns:
      [S, max_order] float64.
    """
    s = sig.astype(np.float64)
    n = len(s) - 1
    out = np.zeros((n, max_order))
    for i in range(n):
        o = min(i + 1, max_order)
        for j in range(o):
            others = [s[i - k] for k in range(o) if k != j]
            basis = np.polynomial.Polynomial([1.0])
            for r in others:
                basis = basis * np.polynomial.Polynomial([-r, 1.0]) / (s[i - j] - r)
            integral = basis.integ()
            out[i, j] = integral(s[i + 1]) - integral(s[i])
    return out


def _plan_multistep(sampler: str, cfg: SchedulerConfig, n: int) -> dict[str, Any]:
    """dpmpp_2m, unipc: exponential integrators in lambda = log(alpha / sigma)."""
    ac = _sigma_alphas_cumprod(cfg)
    train = schedules.train_sigmas(ac)
    ts = _multistep_timesteps(cfg, n)
    if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
        # Here the end points are the training schedule's, not the spaced timesteps'.
        make = schedules.karras_sigmas if cfg.use_karras_sigmas else schedules.exponential_sigmas
        sig = make(float(train[0]), float(train[-1]), n)
        t_frac = schedules.sigma_to_t(sig, np.log(train))
        round_t = cfg.use_karras_sigmas and not (
            sampler == "dpmpp_2m" and cfg.beta_schedule == "squaredcos_cap_v2"
        )
        # diffusers rounds karras timesteps and truncates the others to int64.
        ts = (np.round(t_frac) if round_t else t_frac).astype(np.int64)
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    sig = np.append(sig, 0.0).astype(np.float32)
    alpha, sigma_vp, lam = _alpha_sigma_lambda(sig)
    s_len = len(ts)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # h_i = lambda_(i+1) - lambda_i is +inf at the last step (sigma = 0); the
        # coefficients there reduce to x_(i+1) = x_0-prediction, as in diffusers.
        h = lam[1:] - lam[:-1]
        ratio = sigma_vp[1:] / sigma_vp[:-1]
        coefs: dict[str, np.ndarray] = {}
        if sampler == "dpmpp_2m":
            # DPM-Solver++(2M), Lu et al. 2022b, Alg. 2 (midpoint form):
            # x_t = (s_t/s_s) x - a_t (e^-h - 1) (D0 + 0.5 D1), D1 = (m0 - m1) / r0.
            b = -alpha[1:] * np.expm1(-h)
            r0 = np.zeros(s_len)
            r0[1:] = (lam[1:-1] - lam[:-2]) / h[1:]
            c = np.where(np.arange(s_len) >= 1, 0.5 * b / r0, 0.0)
            c[-1] = 0.0  # lower_order_final: the last step is first order
            coefs.update(a=ratio, b=b, c=c)
        else:
            coefs.update(_unipc_coefficients(alpha, sigma_vp, lam, h, ratio))
    ab = 1.0 / (sig[:-1].astype(np.float64) ** 2 + 1)
    return dict(
        timesteps=ts,
        sigmas=sig,
        alpha_bar=ab,
        in_scale=np.ones(s_len),
        init_noise_sigma=1.0,
        noise_signal=alpha,
        noise_sigma=sigma_vp,
        coefs={k: np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in coefs.items()},
    )


def _unipc_coefficients(alpha, sigma_vp, lam, h, ratio) -> dict[str, np.ndarray]:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), predicting x_0 (Zhao et al. 2023, Alg. 1-2).

    Predictor UniP at step i (order p): x_(i+1) = (s_(i+1)/s_i) x_i - a_(i+1) phi1 m_i
      - a_(i+1) B(h) rho_p (m_(i-1) - m_i) / r1, rho_p = 1/2 for p = 2.
    Corrector UniC at step i (order q of the previous predictor), applied to the
    predictor's output once m_i is known:
      x_i^c = (s_i/s_(i-1)) x_(i-1) - a_i phi1 m_(i-1)
              - a_i B(h) (rho_0 (m_(i-2) - m_(i-1)) / r1 + rho_last (m_i - m_(i-1))),
    with rho solving R rho = b (R rows r^0, r^1) for q = 2, rho_last = 1/2 for q = 1.
    """
    s_len = len(h)
    idx = np.arange(s_len)
    hh = -h  # predict_x0 uses -h
    phi1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
    b_h = np.expm1(hh)  # bh2
    out = {"pa": ratio, "pb": -alpha[1:] * phi1}
    r1 = np.zeros(s_len)
    r1[1:] = (lam[:-2] - lam[1:-1]) / h[1:]
    pc = -alpha[1:] * b_h * 0.5 / r1
    out["pc"] = np.where((idx >= 1) & (idx < s_len - 1), pc, 0.0)
    # Corrector at step i uses the interval (i-1, i).
    hc = np.full(s_len, np.nan)
    hc[1:] = h[:-1]
    hhc = -hc
    phi1c = np.expm1(hhc)
    bc = np.expm1(hhc)
    a_i = alpha[:-1]
    out["ca"] = np.concatenate([[0.0], ratio[:-1]])
    out["cb"] = -a_i * phi1c
    out["cl1"] = -a_i * bc * 0.5
    rc = np.full(s_len, np.nan)
    rc[2:] = (lam[:-3] - lam[1:-2])[: s_len - 2] / hc[2:]
    b1 = (phi1c / hhc - 1) / bc
    b2 = ((phi1c / hhc - 1) / hhc - 0.5) * 2 / bc
    rho0 = (b1 - b2) / (1 - rc)
    rho1 = b1 - rho0
    out["cl2"] = -a_i * bc * rho1
    out["cd2"] = -a_i * bc * rho0 / rc
    return out


def make_plan(
    sampler: str, num_steps: int, config: SchedulerConfig, schedule: str | None = None
) -> SamplerPlan:
    """Builds the static step plan for ``sampler`` with ``num_steps`` steps.

    Args:
      sampler: a name from SAMPLERS.
      num_steps: inference steps n, 1 <= n <= num_train_timesteps.
      config: scheduler settings (resolved for this sampler as diffusers' from_config).
      schedule: None (as the config says), "karras" (use_karras_sigmas) or
        "exponential" (use_exponential_sigmas); only for lms/euler/heun/dpmpp_2m/unipc.

    Returns:
      A SamplerPlan whose timesteps and sigmas equal the matching diffusers
      scheduler's ``timesteps`` / ``sigmas`` after ``set_timesteps(num_steps)``.

    Raises:
      ValueError: unknown sampler or schedule, bad step count, or a combination the
        diffusers scheduler does not support.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {list(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)}")
    if not isinstance(config, SchedulerConfig):
        raise ValueError(f"config must be a SchedulerConfig, got {type(config).__name__}")
    cfg = config.resolve(sampler)
    t_train = cfg.num_train_timesteps
    if (
        not isinstance(num_steps, (int, np.integer))
        or isinstance(num_steps, bool)
        or not 1 <= num_steps <= t_train
    ):
        raise ValueError(
            f"num_steps must be an int in [1, {t_train}] (num_train_timesteps), got {num_steps!r}"
        )
    num_steps = int(num_steps)
    if schedule is not None:
        if sampler not in _SIGMA_SCHEDULE_SAMPLERS:
            raise ValueError(
                f"schedule={schedule!r} is not available for sampler {sampler!r} (diffusers' "
                f"{SAMPLER_TO_CLASS[sampler]} has no sigma schedules); samplers that take "
                f"it: {list(_SIGMA_SCHEDULE_SAMPLERS)}"
            )
        cfg = dataclasses.replace(
            cfg,
            use_karras_sigmas=schedule == "karras",
            use_exponential_sigmas=schedule == "exponential",
        )
    if config.rescale_betas_zero_snr and sampler not in _ZERO_SNR_SAMPLERS:
        raise ValueError(
            f"rescale_betas_zero_snr=True is not supported by sampler {sampler!r} (diffusers' "
            f"{SAMPLER_TO_CLASS[sampler]} lacks it); samplers that support it: "
            f"{list(_ZERO_SNR_SAMPLERS)}"
        )
    if cfg.prediction_type == "sample" and sampler in _NO_SAMPLE_PREDICTION:
        raise ValueError(
            f"prediction_type='sample' is not supported by sampler {sampler!r}; use one of "
            f"{[s for s in SAMPLERS if s not in _NO_SAMPLE_PREDICTION]}"
        )
    if cfg.timestep_spacing == "leading":
        # steps_offset can push the first "leading" timestep past T - 1 (diffusers then
        # indexes alpha_bar out of range or feeds the network an unseen t).
        if sampler in ("dpmpp_2m", "unipc"):
            top = num_steps * (t_train // (num_steps + 1)) + cfg.steps_offset
        else:
            top = (num_steps - 1) * (t_train // num_steps) + cfg.steps_offset
        if top > t_train - 1:
            raise ValueError(
                f"num_steps={num_steps} with timestep_spacing='leading' and steps_offset="
                f"{cfg.steps_offset} gives timestep {top} >= num_train_timesteps={t_train}; "
                "use fewer steps or 'trailing'/'linspace' spacing"
            )
    if sampler in ("ddim", "ddpm", "pndm"):
        parts = _plan_vp(sampler, cfg, num_steps)
    elif sampler in _VE_SAMPLERS:
        parts = _plan_ve(sampler, cfg, num_steps)
    else:
        parts = _plan_multistep(sampler, cfg, num_steps)
    clip = cfg.clip_sample and sampler in ("ddim", "ddpm", "heun")
    return SamplerPlan(
        sampler=sampler,
        prediction_type=cfg.prediction_type,
        num_steps=num_steps,
        order=2 if sampler == "heun" else 1,
        clip_sample_range=float(cfg.clip_sample_range) if clip else None,
        timesteps=_f32(parts["timesteps"]),
        sigmas=_f32(parts["sigmas"]),
        alpha_bar=_f32(parts["alpha_bar"]),
        in_scale=_f32(parts["in_scale"]),
        init_noise_sigma=_f32(parts["init_noise_sigma"]),
        noise_signal=_f32(parts["noise_signal"]),
        noise_sigma=_f32(parts["noise_sigma"]),
        coefs={k: _f32(v) for k, v in parts["coefs"].items()},
    )


# -- solver states and steps ----------------------------------------------------------


class NoState(NamedTuple):
    """Single-step solvers carry nothing."""


class PLMSState(NamedTuple):
    """PNDM/PLMS: the last three raw outputs (newest first) and the x at counter 0."""

    outputs: tuple[jax.Array, jax.Array, jax.Array]  # each [B, ...]
    first_x: jax.Array  # [B, ...]


class LMSState(NamedTuple):
    """LMS: the last three derivatives d = (x - x_0)/sigma, newest first."""

    derivatives: tuple[jax.Array, jax.Array, jax.Array]  # each [B, ...]


class HeunState(NamedTuple):
    """Heun: predictor derivative, step size and start point, for the corrector."""

    derivative: jax.Array  # [B, ...]
    dt: jax.Array  # []
    x: jax.Array  # [B, ...]


class DPMState(NamedTuple):
    """DPM-Solver++(2M): x_0-prediction of the previous step."""

    x0_prev: jax.Array  # [B, ...]


class UniPCState(NamedTuple):
    """UniPC: x_0-predictions of the last two steps and the last corrected x."""

    x0_prev: jax.Array  # [B, ...] m_(i-1)
    x0_prev2: jax.Array  # [B, ...] m_(i-2)
    x_prev: jax.Array  # [B, ...] x_(i-1) after correction


def _init_state(sampler: str, x: jax.Array):
    z = jnp.zeros_like(x)
    if sampler == "pndm":
        return PLMSState((z, z, z), z)
    if sampler == "lms":
        return LMSState((z, z, z))
    if sampler == "heun":
        return HeunState(z, jnp.zeros((), x.dtype), z)
    if sampler == "dpmpp_2m":
        return DPMState(z)
    if sampler == "unipc":
        return UniPCState(z, z, z)
    return NoState()


# PLMS weights by step counter c (Liu et al. 2022, eq. 12 with the skip_prk warm-up):
# c=0 Euler, c=1 average with the previous output, then Adams-Bashforth 2, 3, 4.
_PLMS_WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [1.5, -0.5, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    np.float32,
)


class _Step(NamedTuple):
    """What every solver update sees at scan index i."""

    plan: SamplerPlan
    i: jax.Array  # [] int32, absolute step index
    c: jax.Array  # [] int32, steps since start_index (multistep warm-up counter)
    x: jax.Array  # [B, ...] current sample, sampler's own space
    x_in: jax.Array  # [B, ...] network input x * in_scale (variance preserving)
    out: jax.Array  # [B, ...] raw network output
    noise: jax.Array  # [B, ...] standard normal (zeros for deterministic samplers)
    eta: jax.Array  # [] DDIM eta

    def x0_eps(self) -> tuple[jax.Array, jax.Array]:
        p = self.plan
        x0, eps = to_x0_eps(self.out, self.x_in, p.alpha_bar[self.i], p.prediction_type)
        if p.clip_sample_range is not None:
            x0 = jnp.clip(x0, -p.clip_sample_range, p.clip_sample_range)
        return x0, eps

    def derivative(self) -> jax.Array:
        """d = (x - x0)/sigma = dx/dsigma of the probability-flow ODE (Karras eq. 3)."""
        x0, _ = self.x0_eps()
        return (self.x - x0) / self.plan.sigmas[self.i]

    def coef(self, name: str) -> jax.Array:
        return self.plan.coefs[name][self.i]

    @property
    def last(self) -> jax.Array:
        return self.i == self.plan.length - 1


def _ddim(s: _Step, state: NoState):
    # Song et al. 2021, eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - std^2)
    # eps + std z, std = eta sqrt((1 - ab_prev)/(1 - ab) (1 - ab/ab_prev)).
    x0, eps = s.x0_eps()
    ab, ab_prev = s.plan.alpha_bar[s.i], s.coef("ab_prev")
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = jnp.asarray(s.eta, s.x.dtype) * jnp.sqrt(var)
    direction = jnp.sqrt(jnp.maximum(1 - ab_prev - std**2, 0.0))
    return jnp.sqrt(ab_prev) * x0 + direction * eps + std * s.noise, state


def _ddpm(s: _Step, state: NoState):
    # Ho et al. 2020, eq. 7: the mean of q(x_prev | x_t, x0), plus the noise_std noise.
    x0, _ = s.x0_eps()
    ab, ab_prev = s.plan.alpha_bar[s.i], s.coef("ab_prev")
    alpha_t = ab / ab_prev
    c_x0 = jnp.sqrt(ab_prev) * (1 - alpha_t) / (1 - ab)
    c_xt = jnp.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab)
    return c_x0 * x0 + c_xt * s.x + s.coef("noise_std") * s.noise, state


def _pndm(s: _Step, state: PLMSState):
    # PLMS (Liu et al. 2022, eq. 12) combines raw outputs, then takes the PNDM transfer
    # step (eq. 11). Counter 1 re-takes the first step with the average of two outputs.
    is1 = s.c == 1
    w = jnp.asarray(_PLMS_WEIGHTS)[jnp.minimum(s.c, 4)]
    h0, h1, h2 = state.outputs
    e = w[0] * s.out + w[1] * h0 + w[2] * h1 + w[3] * h2
    x = jnp.where(is1, state.first_x, s.x)
    ab_t = jnp.where(is1, s.coef("ab_cur1"), s.coef("ab_cur"))
    ab_p = jnp.where(is1, s.coef("ab_prev1"), s.coef("ab_prev"))
    if s.plan.prediction_type == "v_prediction":
        e = jnp.sqrt(ab_t) * e + jnp.sqrt(1 - ab_t) * x
    denom = ab_t * jnp.sqrt(1 - ab_p) + jnp.sqrt(ab_t * (1 - ab_t) * ab_p)
    x_new = jnp.sqrt(ab_p / ab_t) * x - (ab_p - ab_t) / denom * e
    pushed = (s.out, h0, h1)
    outputs = tuple(jnp.where(is1, old, new) for old, new in zip(state.outputs, pushed))
    return x_new, PLMSState(outputs, jnp.where(s.c == 0, s.x, state.first_x))


def _euler(s: _Step, state: NoState):
    sigma, sigma_next = s.plan.sigmas[s.i], s.plan.sigmas[s.i + 1]
    return s.x + s.derivative() * (sigma_next - sigma), state


def _euler_a(s: _Step, state: NoState):
    # Deterministic step down to sigma_down, then sigma_up fresh noise.
    sigma = s.plan.sigmas[s.i]
    x = s.x + s.derivative() * (s.coef("sigma_down") - sigma)
    return x + s.coef("sigma_up") * s.noise, state


def _lms(s: _Step, state: LMSState):
    d = s.derivative()
    # Only the derivatives this run has seen (c + 1) enter the sum.
    w = jnp.where(jnp.arange(4) < jnp.minimum(s.c + 1, 4), s.coef("lms"), 0.0)
    d1, d2, d3 = state.derivatives
    return s.x + (w[0] * d + w[1] * d1 + w[2] * d2 + w[3] * d3), LMSState((d, d1, d2))


def _heun(s: _Step, state: HeunState):
    # Karras et al. 2022, Alg. 1: even counters are the Euler predictor to the next
    # sigma, odd ones the trapezoid corrector from the saved start point.
    d = s.derivative()
    first = s.c % 2 == 0
    dt = s.plan.sigmas[s.i + 1] - s.plan.sigmas[s.i]
    x_pred = s.x + d * dt
    x_corr = state.x + (state.derivative + d) / 2 * state.dt
    new_state = HeunState(
        jnp.where(first, d, state.derivative),
        jnp.where(first, dt, state.dt),
        jnp.where(first, s.x, state.x),
    )
    return jnp.where(first, x_pred, x_corr), new_state


def _dpmpp_2m(s: _Step, state: DPMState):
    # x_next = a x + b m + c (m - m_prev): first order at the first and last steps.
    m, _ = s.x0_eps()
    c = jnp.where((s.c >= 1) & ~s.last, s.coef("c"), 0.0)
    return s.coef("a") * s.x + s.coef("b") * m + c * (m - state.x0_prev), DPMState(m)


def _unipc(s: _Step, state: UniPCState):
    # The output at x_i is converted before x_i is corrected (as diffusers does).
    m, _ = s.x0_eps()
    m1, m2 = state.x0_prev, state.x0_prev2
    q2 = s.c >= 2  # the previous predictor was second order
    x_corr = (
        s.coef("ca") * state.x_prev
        + s.coef("cb") * m1
        + jnp.where(q2, s.coef("cl2"), s.coef("cl1")) * (m - m1)
        + jnp.where(q2, s.coef("cd2"), 0.0) * (m2 - m1)
    )
    x = jnp.where(s.c >= 1, x_corr, s.x)
    pc = jnp.where((s.c >= 1) & ~s.last, s.coef("pc"), 0.0)
    x_new = s.coef("pa") * x + s.coef("pb") * m + pc * (m1 - m)
    return x_new, UniPCState(m, m1, x)


_SOLVERS: dict[str, Callable[[_Step, Any], tuple[jax.Array, Any]]] = {
    "ddim": _ddim,
    "ddpm": _ddpm,
    "pndm": _pndm,
    "euler": _euler,
    "euler_a": _euler_a,
    "lms": _lms,
    "heun": _heun,
    "dpmpp_2m": _dpmpp_2m,
    "unipc": _unipc,
}


# -- noise, start points, the loop ----------------------------------------------------


def _is_key_batch(rng: jax.Array) -> bool:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def step_noise(rng: jax.Array, index: jax.Array | int, shape: tuple[int, ...], dtype=jnp.float32):
    """The standard-normal noise a stochastic sampler adds at scan index ``index``.

    With one key: normal(fold_in(rng, index), shape). With a batch of keys (one per
    example, shape [B] typed or [B, 2] raw): example b gets normal(fold_in(rng[b],
    index), shape[1:]), so its samples do not depend on the batch it is in or on how
    the batch is split across devices (pmap).

    Args:
      rng: a PRNG key, or [B] keys.
      index: scan step index (absolute, 0..S-1).
      shape: [B, ...] latent shape.
      dtype: noise dtype.

    Returns:
      Noise of ``shape``.
    """
    if _is_key_batch(rng):
        if rng.shape[0] != shape[0]:
            raise ValueError(f"got {rng.shape[0]} PRNG keys for a batch of {shape[0]}")

        def one(key):
            return jax.random.normal(jax.random.fold_in(key, index), shape[1:], dtype)

        return jax.vmap(one)(rng)
    return jax.random.normal(jax.random.fold_in(rng, index), shape, dtype)


def initial_latents(plan: SamplerPlan, noise: jax.Array) -> jax.Array:
    """Text-to-image start point: pure noise scaled by ``init_noise_sigma``.

    Args:
      plan: the sampling plan.
      noise: [B, ...] standard normal.

    Returns:
      x_init in the sampler's own space.
    """
    return noise * jnp.asarray(plan.init_noise_sigma, noise.dtype)


def noise_latents(plan: SamplerPlan, x0: jax.Array, noise: jax.Array, index) -> jax.Array:
    """diffusers' ``scheduler.add_noise(x0, noise, timesteps[index])`` in the sampler's
    own space (with ``set_begin_index`` semantics for the sigma-based ones).

    Used for image-to-image start latents (index = start_index) and for inpainting's
    re-blend after each step (index = next_index; index S gives x0 itself).

    Args:
      plan: the sampling plan.
      x0: [B, ...] clean latents.
      noise: [B, ...] standard normal.
      index: int in [0, S], may be traced.

    Returns:
      [B, ...] noised latents.
    """
    a = jnp.asarray(plan.noise_signal)[index].astype(x0.dtype)
    s = jnp.asarray(plan.noise_sigma)[index].astype(x0.dtype)
    return a * x0 + s * noise


def start_index_for_strength(plan: SamplerPlan, strength) -> jax.Array:
    """diffusers img2img: the first step index run for a given ``strength``.

    init_timestep = min(int(n * strength), n); t_start = max(n - init_timestep, 0);
    index = t_start * order.

    Args:
      plan: the sampling plan.
      strength: in [0, 1]. A Python float follows diffusers' float64 arithmetic
        exactly; prefer computing the index on the host and passing it to ``sample``
        as a traced ``start_index``. A traced float32 strength gives the exact
        floor(n * strength) of the decimal the user meant (a relative nudge of 2^-20
        undoes float32 rounding: 0.7 * 10 -> 7); diffusers' float64 product differs
        from that in rare cases, e.g. int(100 * 0.29) = 28.

    Returns:
      int32 scalar index.
    """
    n = plan.num_steps
    if isinstance(strength, (int, float)):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        init = min(int(n * strength), n)
        return jnp.asarray(max(n - init, 0) * plan.order, jnp.int32)
    prod = jnp.asarray(strength, jnp.float32) * n * (1 + 2.0**-20)
    init = jnp.minimum(jnp.floor(prod).astype(jnp.int32), n)
    return jnp.maximum(n - init, 0) * plan.order


_BARS: dict[int, Any] = {}


def _progress_tick(i, total, start) -> None:
    from tqdm.auto import tqdm  # only when progress=True

    i, total, start = int(i), int(total), int(start)
    bar = _BARS.get(total)
    if bar is None or i == start:
        if bar is not None:
            bar.close()
        bar = _BARS[total] = tqdm(total=total - start, desc="sampling", leave=False)
    bar.update(1)
    if i == total - 1:
        bar.close()
        _BARS.pop(total, None)


def sample(
    model_fn: ModelFn,
    x_init: jax.Array,
    plan: SamplerPlan,
    *,
    rng: jax.Array | None,
    eta: jax.Array | float = 0.0,
    start_index: jax.Array | int = 0,
    step_hook: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    progress: bool = False,
) -> jax.Array:
    """Runs the sampler: one ``lax.scan`` over the plan's S steps.

    Args:
      model_fn: model_fn(x_in, t) -> raw output in ``plan.prediction_type``; x_in is
        already scaled (``plan.in_scale``), t a float32 scalar (``plan.timesteps[i]``).
      x_init: [B, ...] start latents in the sampler's own space (``initial_latents`` /
        ``noise_latents``). Their dtype is the carry's: keep float32 (as diffusers'
        schedulers compute) and cast inside model_fn for a bf16 network.
      plan: from ``make_plan``; closed over or passed in as a jit argument.
      rng: PRNG key or [B] keys for the per-step noise of ddpm / euler_a / ddim with
        eta > 0 (see ``step_noise``); None is allowed for the deterministic samplers.
      eta: DDIM's eta (0 deterministic, 1 DDPM-like); traced, other samplers ignore it.
      start_index: first step to run (image-to-image); may be traced, then earlier
        steps are skipped with ``lax.cond``. Multistep solvers start fresh there.
      step_hook: step_hook(x, next_index) -> x, applied after every step (inpainting's
        re-blend with ``noise_latents(plan, x0, noise, next_index)``).
      progress: tick a tqdm bar per step through ``jax.debug.callback``.

    Returns:
      [B, ...] final latents (x_0 for text-to-image).
    """
    if not isinstance(plan, SamplerPlan):
        raise ValueError(f"plan must be a SamplerPlan from make_plan, got {type(plan).__name__}")
    x_init = jnp.asarray(x_init)
    if not jnp.issubdtype(x_init.dtype, jnp.floating):
        raise ValueError(f"x_init must be floating point, got {x_init.dtype}")
    needs_noise = plan.sampler in _STOCHASTIC
    if needs_noise and rng is None:
        if plan.sampler != "ddim" or not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError(f"sampler {plan.sampler!r} needs rng (a PRNG key) for its noise")
        needs_noise = False
    s_len = plan.length
    static_start = isinstance(start_index, (int, np.integer)) and not isinstance(start_index, bool)
    if static_start and not 0 <= start_index <= s_len:
        raise ValueError(f"start_index must be in [0, {s_len}], got {start_index}")
    start = jnp.asarray(start_index, jnp.int32)
    plan = jax.tree.map(jnp.asarray, plan)  # numpy leaves cannot be indexed by tracers

    def step(i, carry):
        x, state = carry
        c = i - start
        x_in = x * plan.in_scale[i].astype(x.dtype)
        out = model_fn(x_in, plan.timesteps[i])
        if out.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {out.shape} for an input of shape {x.shape}; "
                "it must return the raw prediction shaped like its input"
            )
        # Drawn in float32 so a run's noise does not depend on the latent dtype.
        noise = step_noise(rng, i, x.shape).astype(x.dtype) if needs_noise else jnp.zeros_like(x)
        ctx = _Step(plan, i, c, x, x_in, out, noise, jnp.asarray(eta, x.dtype))
        x_new, new_state = _SOLVERS[plan.sampler](ctx, state)
        if step_hook is not None:
            x_new = step_hook(x_new, i + 1)
        if progress:
            jax.debug.callback(_progress_tick, i, s_len, start)
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        return x_new.astype(x.dtype), new_state

    def body(carry, i):
        if static_start:
            return step(i, carry), None
        return jax.lax.cond(i >= start, step, lambda _, cr: cr, i, carry), None

    first = int(start_index) if static_start else 0
    carry = (x_init, _init_state(plan.sampler, x_init))
    (x, _), _ = jax.lax.scan(body, carry, jnp.arange(first, s_len, dtype=jnp.int32))
    return x
