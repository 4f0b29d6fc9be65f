"""Noise schedules as arrays, the forward process q(x_t | x_0), training targets.

Everything here follows the discrete-time DDPM view (Ho et al. 2020): a beta schedule
beta_1..beta_T defines alpha_bar_t = prod_{s<=t} (1 - beta_s), and

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,        eps ~ N(0, I).

The equivalent "variance exploding" view used by the k-diffusion samplers rescales
x_t by 1/sqrt(alpha_bar_t): x = x_0 + sigma eps with sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t) (Karras et al. 2022, "Elucidating the design space ...").

Two kinds of functions live here:

* static schedule builders (numpy, run once at plan time): ``betas``, ``alphas_cumprod``,
  ``spaced_timesteps``, ``karras_sigmas``, ``exponential_sigmas``, ``sigma_to_t``;
* traced array functions (jax, usable under jit/vmap/pmap): ``add_noise``,
  ``get_velocity``, ``training_target``, ``snr``, ``min_snr_weights``.

``SchedulerConfig`` reads diffusers' ``scheduler_config.json``. It follows diffusers'
``Scheduler.from_config`` semantics: keys present in the file carry over to whichever
sampler is chosen, keys absent take the defaults of the diffusers scheduler class that
implements that sampler (``SchedulerConfig.resolve``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

# diffusers scheduler class <-> our sampler name.
CLASS_TO_SAMPLER: dict[str, str] = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
}
SAMPLER_TO_CLASS: dict[str, str] = {v: k for k, v in CLASS_TO_SAMPLER.items()}

# The values diffusers' own classes use for keys a scheduler_config.json leaves out
# (their __init__ defaults, diffusers 0.42.1; tests/test_schedules.py re-reads them from
# diffusers so this table cannot drift). A key missing from a class's dict is not an
# argument of that class: diffusers ignores it when swapping to that class, and so do we.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}
_SIGMA_SCHEDULE_DEFAULTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {
        **_COMMON_DEFAULTS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
        "variance_type": "fixed_small",
    },
    "DDIMScheduler": {
        **_COMMON_DEFAULTS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_COMMON_DEFAULTS, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "LMSDiscreteScheduler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
    },
    "EulerDiscreteScheduler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
    "EulerAncestralDiscreteScheduler": {
        **_COMMON_DEFAULTS,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_SCHEDULE_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
    },
    "DPMSolverMultistepScheduler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
        "variance_type": None,
    },
    "UniPCMultistepScheduler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_SCHEDULE_DEFAULTS,
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
}

# Keys a scheduler_config.json may hold that change nothing here. Metadata, or
# settings that only act together with a feature we reject when it is switched on.
IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "_diffusers_version",  # metadata
        "_use_default_values",  # diffusers' bookkeeping; honoured in from_dict
        "_name_or_path",  # metadata
        "skip_prk_steps",  # our pndm always runs PLMS with skip_prk_steps=True (as SD ships)
        "dynamic_thresholding_ratio",  # only used with thresholding=True (rejected)
        "sample_max_value",  # only used with thresholding=True (rejected)
        "flow_shift",  # only used with use_flow_sigmas=True (rejected)
        "time_shift_type",  # only used with use_dynamic_shifting=True (rejected)
    }
)

# Keys we accept only at the value(s) our samplers implement; anything else is a
# ValueError rather than a silently different sampler. None means JSON null.
PINNED_KEYS: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "shift_terminal": (None,),
    "solver_p": (None,),
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    # diffusers maps midpoint -> bh2 for UniPC and bh2 -> midpoint for DPM-Solver, so
    # both values mean "the default" for both samplers.
    "solver_type": ("midpoint", "bh2"),
    "lower_order_final": (True,),
    "euler_at_final": (False,),
    "predict_x0": (True,),
    "lambda_min_clipped": (-math.inf,),
    "disable_corrector": ((),),
}


def _valid(name: str, value: Any, options: tuple[Any, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; valid values: {list(options)}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Noise-schedule settings, as in diffusers' ``scheduler_config.json``.

    A field left as None means "not given": ``resolve(sampler)`` fills it with the
    default of the diffusers class behind that sampler, exactly as diffusers'
    ``NewScheduler.from_config(old.config)`` does when a pipeline swaps schedulers.
    ``SchedulerConfig()`` therefore means "diffusers defaults" (linear 1e-4..0.02),
    and ``SchedulerConfig.stable_diffusion()`` is the schedule SD 1.x/2.x ship.

    Attributes:
      num_train_timesteps: T, the number of training noise levels.
      beta_start, beta_end: first and last beta of the (scaled_)linear schedule.
      beta_schedule: one of BETA_SCHEDULES.
      trained_betas: explicit betas (length T) overriding the schedule.
      steps_offset: added to "leading" timesteps (SD uses 1).
      timestep_spacing: one of TIMESTEP_SPACINGS (Lin et al. 2023, Table 2).
      prediction_type: what the network predicts, one of PREDICTION_TYPES.
      set_alpha_to_one: DDIM/PNDM: alpha_bar after the last step is 1 (else alpha_bar_0).
      clip_sample, clip_sample_range: DDIM/DDPM/Heun clamp predicted x_0.
      use_karras_sigmas, use_exponential_sigmas: sigma-space step schedules.
      rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2023, Alg. 1).
      variance_type: DDPM posterior variance, one of VARIANCE_TYPES.
      class_name: diffusers ``_class_name``; picks ``default_sampler``.
    """

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    steps_offset: int | None = None
    timestep_spacing: str | None = None
    prediction_type: str | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    use_karras_sigmas: bool | None = None
    use_exponential_sigmas: bool | None = None
    rescale_betas_zero_snr: bool | None = None
    variance_type: str | None = None
    class_name: str | None = None

    def __post_init__(self) -> None:
        if self.beta_schedule is not None:
            _valid("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.timestep_spacing is not None:
            _valid("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.prediction_type is not None:
            _valid("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.variance_type is not None:
            _valid("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.class_name is not None:
            _valid("_class_name", self.class_name, tuple(CLASS_TO_SAMPLER))
        t = self.num_train_timesteps
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 2):
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {t!r}")
        if self.steps_offset is not None and (
            not isinstance(self.steps_offset, int) or self.steps_offset < 0
        ):
            raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if v is not None and not 0.0 < float(v) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if self.trained_betas is not None:
            tb = np.asarray(self.trained_betas, np.float64)
            if tb.ndim != 1 or not np.all((tb > 0) & (tb <= 1)):
                raise ValueError("trained_betas must be a 1-D sequence of values in (0, 1]")
            if t is not None and len(tb) != t:
                raise ValueError(
                    f"trained_betas has {len(tb)} values but num_train_timesteps is {t}"
                )
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas are exclusive")

    # -- diffusers JSON ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Reads a diffusers ``scheduler_config.json`` dict.

        Args:
          d: the parsed JSON. Keys are modelled fields (see the class), ``_class_name``,
            IGNORED_KEYS (metadata / no effect), or PINNED_KEYS (accepted only at the
            value our samplers implement). Keys named in ``_use_default_values`` count
            as not given, as in diffusers.

        Returns:
          The config; fields absent from ``d`` are None (resolved per sampler).

        Raises:
          ValueError: an unknown key, an unsupported pinned value or an invalid value.
        """
        fields = {f.name for f in dataclasses.fields(cls)} - {"class_name"}
        use_default = set(d.get("_use_default_values", None) or ())
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "_class_name":
                kwargs["class_name"] = value
            elif key in fields:
                if key in use_default:
                    continue
                if key == "trained_betas" and value is not None:
                    value = tuple(float(b) for b in np.asarray(value).reshape(-1))
                kwargs[key] = value
            elif key in IGNORED_KEYS:
                continue
            elif key in PINNED_KEYS:
                ok = PINNED_KEYS[key]
                v = tuple(value) if isinstance(value, list) else value
                if v not in ok:
                    raise ValueError(
                        f"scheduler config {key}={value!r} is not supported; "
                        f"jaxdiff implements only {key} in {list(ok)}"
                    )
            else:
                known = sorted(fields | {"_class_name"} | IGNORED_KEYS | set(PINNED_KEYS))
                raise ValueError(f"unknown scheduler config key {key!r}; known keys: {known}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SchedulerConfig:
        """Reads ``scheduler_config.json`` (or a directory holding it); see from_dict."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def stable_diffusion(cls, prediction_type: str | None = None) -> SchedulerConfig:
        """The scheduler_config.json shipped with SD 1.x (SD 2.x-v adds
        prediction_type="v_prediction")."""
        extra = {} if prediction_type is None else {"prediction_type": prediction_type}
        return cls.from_dict(
            {
                **extra,
                "_class_name": "PNDMScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "set_alpha_to_one": False,
                "skip_prk_steps": True,
                "steps_offset": 1,
                "trained_betas": None,
                "clip_sample": False,
            }
        )

    def to_dict(self, sampler: str | None = None) -> dict[str, Any]:
        """A diffusers ``scheduler_config.json`` dict for ``sampler``'s class.

        Args:
          sampler: which scheduler class to write (default: ``default_sampler``).

        Returns:
          All arguments of that diffusers class that we model, resolved.
        """
        sampler = sampler or self.default_sampler
        _valid("sampler", sampler, tuple(SAMPLER_TO_CLASS))
        cls_name = SAMPLER_TO_CLASS[sampler]
        r = self.resolve(sampler)
        out: dict[str, Any] = {"_class_name": cls_name}
        for key in CLASS_DEFAULTS[cls_name]:
            v = getattr(r, key)
            out[key] = list(v) if isinstance(v, tuple) else v
        if cls_name == "PNDMScheduler":
            out["skip_prk_steps"] = True  # what our pndm implements
        return out

    # -- per-sampler resolution -------------------------------------------------------

    @property
    def default_sampler(self) -> str:
        """The sampler named by ``_class_name`` ("pndm", as SD ships, when absent)."""
        return CLASS_TO_SAMPLER[self.class_name] if self.class_name else "pndm"

    def resolve(self, sampler: str) -> SchedulerConfig:
        """Fills fields not given with the defaults of ``sampler``'s diffusers class.

        Keys that class does not take are set to their "off" value whatever the file
        said (diffusers ignores them when swapping too): e.g. ``use_karras_sigmas`` for
        ddim, ``rescale_betas_zero_snr`` for pndm/lms/heun.

        Args:
          sampler: a name from ``samplers.SAMPLERS``.

        Returns:
          A config with every field set.
        """
        _valid("sampler", sampler, tuple(SAMPLER_TO_CLASS))
        defaults = CLASS_DEFAULTS[SAMPLER_TO_CLASS[sampler]]
        off = {
            "set_alpha_to_one": False,
            "clip_sample": False,
            "clip_sample_range": 1.0,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "rescale_betas_zero_snr": False,
            "variance_type": "fixed_small",
        }
        values = {}
        for f in dataclasses.fields(self):
            if f.name == "class_name":
                continue
            given = getattr(self, f.name)
            if f.name not in defaults:
                values[f.name] = off[f.name]
            elif given is not None:
                values[f.name] = given
            else:
                values[f.name] = defaults[f.name]
        if sampler == "ddpm" and values["variance_type"] is None:
            values["variance_type"] = "fixed_small"  # DDPMScheduler treats null as default
        return SchedulerConfig(**values, class_name=self.class_name)


# -- static schedules (numpy) ---------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2),
    # s = 0.008, betas from ratios of consecutive alpha_bar, capped at max_beta.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    t = num_train_timesteps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)],
        dtype=np.float32,
    )


def rescale_betas_zero_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is
    unchanged.

    Args:
      betas: [T] betas.

    Returns:
      [T] float32 betas with alpha_bar_T == 0 exactly.
    """
    alphas = 1.0 - np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def betas(config: SchedulerConfig) -> np.ndarray:
    """The beta schedule of ``config`` (unset fields resolved as for "ddpm", the class
    diffusers' training scripts load).

    Args:
      config: scheduler settings.

    Returns:
      [T] float32 betas (after the zero-terminal-SNR rescale if asked for).
    """
    c = config.resolve("ddpm") if _has_unset(config) else config
    t = c.num_train_timesteps
    if c.trained_betas is not None:
        if len(c.trained_betas) != t:
            raise ValueError(f"trained_betas has {len(c.trained_betas)} values, expected {t}")
        b = np.asarray(c.trained_betas, np.float32)
    elif c.beta_schedule == "linear":
        b = np.linspace(c.beta_start, c.beta_end, t).astype(np.float32)
    elif c.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta) (the LDM / SD schedule).
        b = np.linspace(c.beta_start**0.5, c.beta_end**0.5, t).astype(np.float32) ** 2
    else:
        b = _cosine_betas(t)
    if c.rescale_betas_zero_snr:
        b = rescale_betas_zero_snr(b)
    return b


def _has_unset(config: SchedulerConfig) -> bool:
    return any(
        getattr(config, f.name) is None
        for f in dataclasses.fields(config)
        if f.name not in ("trained_betas", "class_name")
    )


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1.

    Args:
      config: scheduler settings (unset fields resolved as for "ddpm").

    Returns:
      [T] float32. The product is accumulated in float64 and rounded once, which is
      what torch.cumprod does for float32 on CPU.
    """
    alphas = 1.0 - betas(config)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def spaced_timesteps(
    spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0
) -> np.ndarray:
    """Descending integer timesteps for ``num_steps`` inference steps.

    "leading": 0, r, 2r, ... (r = T // n) reversed, plus steps_offset;
    "trailing": round(T, T - T/n, ...) - 1 (n points), so the first step is T - 1;
    "linspace": round(linspace(0, T - 1, n)) reversed (Lin et al. 2023, Table 2).

    Args:
      spacing: one of TIMESTEP_SPACINGS.
      num_steps: n >= 1.
      num_train_timesteps: T.
      steps_offset: only used by "leading".

    Returns:
      [n] int64, descending.
    """
    _valid("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    n, t = num_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (t // n))[::-1].astype(np.int64) + steps_offset
    # diffusers writes np.arange(T, 0, -T/n), which for 62 of the n in 1..1000 (e.g. 61)
    # yields an extra point and a final timestep of -1; we keep exactly n points.
    return np.round(t - np.arange(n) * (t / n)).astype(np.int64) - 1


def train_sigmas(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32 as diffusers computes it.

    Args:
      alphas_cumprod_: [T] alpha_bar.

    Returns:
      [T] float32, ascending in t.
    """
    ac = np.asarray(alphas_cumprod_, np.float32)
    return ((1 - ac) / ac) ** np.float32(0.5)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0):
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho.

    Args:
      sigma_min, sigma_max: end points.
      num_steps: n.
      rho: 7 as in the paper.

    Returns:
      [n] float64, descending from sigma_max to sigma_min.
    """
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma (diffusers' use_exponential_sigmas).

    Returns:
      [n] float64, descending from sigma_max to sigma_min.
    """
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose sigma is ``sigmas``, interpolating linearly in log sigma.

    Args:
      sigmas: [n] sigmas (> 0).
      log_train_sigmas: [T] ascending log sigma_t of the training schedule.

    Returns:
      [n] float64 timesteps in [0, T-1] (clamped at the ends).
    """
    log_s = np.asarray(log_train_sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    low = np.searchsorted(log_s, log_sigma, side="right") - 1
    low = np.clip(low, 0, len(log_s) - 2)
    w = (log_s[low] - log_sigma) / (log_s[low] - log_s[low + 1])
    w = np.clip(w, 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


# -- forward process and training targets (traced) ------------------------------------


def _per_example(alphas_cumprod_: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    ab = jnp.asarray(alphas_cumprod_)[jnp.asarray(t)]
    return ab.reshape(ab.shape + (1,) * (ndim - ab.ndim))


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, alphas_cumprod_) -> jnp.ndarray:
    """Samples q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Args:
      x0: [B, ...] clean data.
      noise: eps, same shape.
      t: [B] (or scalar) integer timesteps.
      alphas_cumprod_: [T] alpha_bar.

    Returns:
      x_t, shape of x0.
    """
    ab = _per_example(alphas_cumprod_, t, x0.ndim).astype(x0.dtype)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise


def get_velocity(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, alphas_cumprod_):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4).

    Args:
      x0: [B, ...] clean data.
      noise: eps, same shape.
      t: [B] integer timesteps.
      alphas_cumprod_: [T] alpha_bar.

    Returns:
      v, shape of x0.
    """
    ab = _per_example(alphas_cumprod_, t, x0.ndim).astype(x0.dtype)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0


def training_target(
    prediction_type: str, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray, alphas_cumprod_
) -> jnp.ndarray:
    """What the network should output at x_t = add_noise(x0, noise, t).

    Args:
      prediction_type: "epsilon" (eps), "v_prediction" (v) or "sample" (x_0).
      x0, noise: [B, ...].
      t: [B] integer timesteps.
      alphas_cumprod_: [T] alpha_bar.

    Returns:
      The regression target, shape of x0.
    """
    _valid("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(x0, noise, t, alphas_cumprod_)
    return x0


def snr(t: jnp.ndarray, alphas_cumprod_) -> jnp.ndarray:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps ``t``."""
    ab = jnp.asarray(alphas_cumprod_)[jnp.asarray(t)]
    return ab / (1 - ab)


def min_snr_weights(
    t: jnp.ndarray, alphas_cumprod_, gamma: float, prediction_type: str
) -> jnp.ndarray:
    """Min-SNR-gamma loss weights (Hang et al. 2023), for an MSE on the network output.

    The paper weights the x_0-space loss by min(SNR, gamma); expressed on the
    network's own target that is min(SNR, gamma)/SNR for epsilon, min(SNR,
    gamma)/(SNR + 1) for v_prediction and min(SNR, gamma) for sample (as diffusers'
    train_text_to_image.py). For epsilon at SNR = 0 (zero terminal SNR) the 0/0 is
    taken at its limit, 1.

    Args:
      t: [B] integer timesteps.
      alphas_cumprod_: [T] alpha_bar.
      gamma: the clamp (5 in the paper).
      prediction_type: one of PREDICTION_TYPES.

    Returns:
      [B] float32 weights.
    """
    _valid("prediction_type", prediction_type, PREDICTION_TYPES)
    s = snr(t, alphas_cumprod_)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        return jnp.where(s > gamma, gamma / jnp.where(s > 0, s, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped
