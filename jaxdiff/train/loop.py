"""The training loop: ``train_and_evaluate(config, workdir)``.

A run is one or two phases, each a loop of one jitted, sharded, donated pure
step over host batches, with the same logging, checkpointing and resume:

1. ``vae`` (from-scratch models with ``vae_train.steps > 0``): the KL
   autoencoder alone (:mod:`jaxdiff.train.vae_step`);
2. ``diffusion`` (``total_steps > 0``): the networks in ``train.trainable``
   (UNet, text encoder) against the frozen VAE (:mod:`jaxdiff.train.step`).
   The VAE comes from phase 1, or from ``model.pretrained``.

The workdir holds ``checkpoints/<phase>/<step>`` (params, EMA, optimizer
state, step, rng, data-iterator position, config), ``config.json``,
``metrics.jsonl``, ``tensorboard/``, ``samples/step_N.png``, the tokenizer of a
from-scratch model and, when the last phase completes, ``export/``: a
diffusers-format model (EMA weights when EMA is on). Then ``config.eval``
may evaluate that export (:mod:`jaxdiff.train.final_eval`; for the digits:
``samples/final_grid.png`` and ``report.json``). Rerunning the same command
resumes from the newest readable checkpoint; SIGTERM/SIGINT save and return.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff import parallel
from jaxdiff.checkpoint import Checkpointer, PreemptionFlag, preemption_guard
from jaxdiff.models.sd import SDConfig
from jaxdiff.train import final_eval, samples, setup
from jaxdiff.train.data import HostBatches, batch_digest, tokenize
from jaxdiff.train.metrics import MetricsLogger
from jaxdiff.train.phases import DIFFUSION, VAE, Phase, diffusion_phase, host_copy, vae_phase
from jaxdiff.train.step import TrainState, param_norm

# ------------------------------------------------------------------ small helpers


def _is_main() -> bool:
    return jax.process_index() == 0


def gather(tree: Any) -> Any:
    """Device arrays -> numpy on every host (an all-gather when arrays span processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _config_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


# ------------------------------------------------------------------ one phase


@dataclasses.dataclass
class PhaseResult:
    """How a phase ended: its state, step, whether it was preempted, and its logged losses."""

    state: TrainState
    step: int
    preempted: bool
    losses: list[float]
    resumed_from: int | None


class PendingMetrics:
    """Metrics of steps not yet fetched from the devices (fetching every step would stall)."""

    def __init__(self, phase: str, batch_size: int):
        self.phase = phase
        self.batch_size = batch_size
        self.items: list[tuple[int, dict]] = []
        self.since = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.items.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        """Fetches and averages the pending metrics; raises on the first non-finite loss."""
        if not self.items:
            return None
        fetched = jax.device_get([m for _, m in self.items])
        for (step, _), m in zip(self.items, fetched):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"{self.phase} phase: non-finite loss {loss} at step {step} (lower the "
                    "learning rate, enable clipping or check the data)"
                )
        now = time.perf_counter()
        out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if "lr" in out:
            out["lr"] = float(fetched[-1]["lr"])
        out["images_per_s"] = self.batch_size * len(fetched) / max(now - self.since, 1e-9)
        self.items, self.since = [], now
        return out


def run_phase(
    phase: Phase,
    *,
    config: Any,
    mesh: Mesh,
    workdir: Path,
    logger: MetricsLogger,
    stop: PreemptionFlag,
) -> PhaseResult:
    """Restores or initialises, then trains ``phase`` to its total steps or a stop signal.

    Args:
      phase: the phase's pieces.
      config: the run's config (batch_size, log_every, save_every, data, ...).
      mesh: the device mesh.
      workdir: the run directory.
      logger: where metrics go.
      stop: set by SIGTERM/SIGINT: save the current step and return.

    Returns:
      A :class:`PhaseResult`.
    """
    from tqdm.auto import tqdm

    save_every = max(int(config.save_every), 1)
    log_every = max(int(config.log_every), 1)
    log_hashes = bool((config.get("debug") or {}).get("log_batch_hashes", False))
    ckpt = Checkpointer(
        workdir / "checkpoints" / phase.name,
        max_to_keep=int(config.get("keep_checkpoints", 3)) or None,
        save_every=save_every,
        async_save=bool(config.get("async_checkpoints", True)),
    )
    data = HostBatches(config)
    try:
        restored = ckpt.restore_latest(phase.abstract_state)
        resumed_from = None
        if restored is None:
            state, step = phase.init(), 0
        else:
            step, state, data_state = restored
            resumed_from = step
            if data_state is not None:
                data.set_state(data_state)
            elif _is_main():
                print(f"[{phase.name}] no data-iterator state for step {step}: data restarts")
            logger.resume(phase.name, step)
            if _is_main():
                print(f"[{phase.name}] resumed from step {step} ({ckpt.directory / str(step)})")
        if step >= phase.total_steps:
            return PhaseResult(state, step, False, [], resumed_from)

        if _is_main():
            print(f"[{phase.name}] training steps {step + 1}..{phase.total_steps}", flush=True)
        train_step = phase.build_step(state)
        # The base key stays on the host side: the state (and its rng) is donated each step.
        rng = jax.device_put(host_copy(state.rng), parallel.replicated(mesh))
        pending = PendingMetrics(phase.name, int(config.batch_size))
        # Read at logging steps only: per step it would be one more pass over the params.
        norm_of = jax.jit(functools.partial(param_norm, trainable=phase.trainable))
        losses: list[float] = []
        preempted = False
        bar = tqdm(
            total=phase.total_steps,
            initial=step,
            desc=phase.name,
            disable=not _is_main(),
            dynamic_ncols=True,
            # Steps are dispatched asynchronously and block only when metrics are read:
            # the rate since the start gives a steady ETA, a moving average does not.
            smoothing=0.0,
        )
        with bar:
            while step < phase.total_steps:
                host = phase.make_batch(next(data))
                if log_hashes:
                    logger.batch_digest(phase.name, step + 1, batch_digest(host))
                batch = parallel.host_batch_to_global(host, mesh)
                state, metrics = train_step(state, batch, rng)
                step += 1
                pending.add(step, metrics)
                bar.update(1)
                # A signal may reach only some hosts; all of them must stop together.
                preempted = parallel.any_process(stop.requested)
                last = step == phase.total_steps or preempted
                saving = last or step % save_every == 0
                if saving or step % log_every == 0:
                    # Before saving: a NaN state must never become the checkpoint to resume.
                    summary = pending.flush()
                    summary["param_norm"] = float(host_copy(norm_of(state)))
                    logger.write(phase.name, step, summary)
                    losses.append(summary["loss"])
                if saving:
                    ckpt.save(
                        step, state, data.get_state(), config=_config_dict(config), force=last
                    )
                if phase.on_step is not None:
                    phase.on_step(step, state)
                if preempted:
                    print(
                        f"[{phase.name}] stop signal: saved step {step}; rerun the same command "
                        "to resume",
                        flush=True,
                    )
                    break
        ckpt.wait()
        return PhaseResult(state, step, preempted, losses, resumed_from)
    finally:
        data.close()
        ckpt.close()


# ------------------------------------------------------------------ sample grids


def sample_hook(
    config: Any,
    model: setup.Model,
    mesh: Mesh,
    workdir: Path,
    get_config: Callable[[], SDConfig],
) -> Callable[[int, TrainState], None] | None:
    """``on_step(step, state)`` writing ``workdir/samples/step_N.png`` every ``sample_every`` steps.

    Samples ``config.sample.prompts`` with the EMA weights where EMA is on.
    ``get_config`` gives the final model configs (known once training starts).
    Returns None when ``sample_every`` is 0.
    """
    every = int(config.get("sample_every", 0) or 0)
    if every <= 0:
        return None
    s = config.sample
    prompts = [str(p) for p in s.prompts]
    # Small inputs, replicated on every device (and the same on every host).
    rep = parallel.replicated(mesh)
    ids = jax.device_put(tokenize(model.tokenizer, prompts, model.max_length), rep)
    uncond = jax.device_put(tokenize(model.tokenizer, [""] * len(prompts), model.max_length), rep)
    rng = jax.device_put(np.asarray(jax.random.PRNGKey(int(s.seed))), rep)
    guidance = jax.device_put(np.float32(s.guidance_scale), rep)
    cache: dict[str, Callable] = {}

    def on_step(step: int, state: TrainState) -> None:
        if step % every:
            return
        if "fn" not in cache:
            res = int(s.get("resolution", 0) or config.data.resolution)
            cache["fn"] = samples.make_sampler(get_config(), str(s.sampler), int(s.steps), res)
        params = {**state.params, **state.ema_params}
        images = cache["fn"](params, ids, uncond, rng, guidance)
        images = gather(images)
        if _is_main():
            samples.save_grid(images, workdir / "samples" / f"step_{step}.png")

    return on_step


# ------------------------------------------------------------------ the run


def _initialize_distributed(config: Any) -> None:
    d = config.get("distributed")
    if d is None:
        parallel.initialize_distributed()
        return
    parallel.initialize_distributed(
        coordinator_address=str(d.get("coordinator_address", "") or "") or None,
        num_processes=int(d.get("num_processes", 0) or 0) or None,
        process_id=None if int(d.get("process_id", -1)) < 0 else int(d.process_id),
    )


def _write_config(config: Any, workdir: Path) -> None:
    path = workdir / "config.json"
    text = json.dumps(_config_dict(config), indent=2, sort_keys=True)
    if path.is_file() and path.read_text() != text:
        print(f"note: {path} differs from this run's config; overwriting it (resume continues)")
    path.write_text(text)


def train_and_evaluate(config: Any, workdir: str | Path) -> dict:
    """Trains the model a config describes, resuming from ``workdir`` if it holds checkpoints.

    Args:
      config: a ConfigDict (see ``configs/digits.py``).
      workdir: the run directory (created).

    Returns:
      A summary: per phase ``{"step", "losses", "preempted", "resumed_from"}``,
      ``"preempted"`` (True if a stop signal ended the run early), ``"export"``
      (the exported model's path, or None), ``"report"`` (the final evaluation's
      metrics, when ``config.eval`` asks for one), ``"state"`` (the last phase's
      TrainState, for callers in the same process) and ``"model_config"``.
    """
    setup.check_config(config)
    with preemption_guard() as stop:
        # Before anything else touches JAX (the signal handler is already in place).
        _initialize_distributed(config)
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        if _is_main():
            _write_config(config, workdir)
        mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
        model = setup.build_model(config, workdir)
        logger = MetricsLogger(workdir, enabled=_is_main(), echo=_echo)
        summary: dict[str, Any] = {"preempted": False, "export": None}
        try:
            return _run(config, workdir, mesh, model, logger, stop, summary)
        finally:
            logger.close()


def _echo(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)


def _run(
    config: Any,
    workdir: Path,
    mesh: Mesh,
    model: setup.Model,
    logger: MetricsLogger,
    stop: PreemptionFlag,
    summary: dict,
) -> dict:
    """Runs the phases the config asks for, then exports; fills and returns ``summary``."""
    pretrained = model.params is not None
    run_vae = not pretrained and int(config.vae_train.steps) > 0
    run_diffusion = int(config.total_steps) > 0
    diffusion_started = _has_checkpoints(workdir / "checkpoints" / DIFFUSION)
    common = dict(config=config, mesh=mesh, workdir=workdir, logger=logger, stop=stop)

    vae_params = None
    if run_vae and not (run_diffusion and diffusion_started):
        result = run_phase(vae_phase(config, model, mesh), **common)
        summary[VAE] = _phase_summary(result)
        summary["state"] = result.state
        if result.preempted:
            summary["preempted"] = True
            return summary
        # EMA weights, when kept, are the better autoencoder.
        vae_params = result.state.ema_params.get("vae", result.state.params["vae"])
    if not run_diffusion:
        summary["model_config"] = model.config
        return summary

    final_config = {"config": model.config}
    phase = diffusion_phase(
        config, model, mesh, vae_params, lambda c: final_config.update(config=c)
    )
    phase.on_step = sample_hook(config, model, mesh, workdir, lambda: final_config["config"])
    result = run_phase(phase, **common)
    summary[DIFFUSION] = _phase_summary(result)
    summary["state"] = result.state
    summary["model_config"] = final_config["config"]
    if result.preempted:
        summary["preempted"] = True
        return summary
    if result.resumed_from is not None and result.resumed_from >= phase.total_steps:
        # Nothing trained now: the final config (scaling factor) still needs the VAE params.
        phase.build_step(result.state)
        summary["model_config"] = final_config["config"]
    summary["export"] = export(
        workdir / "export", summary["model_config"], result.state, model.tokenizer_dir
    )
    if summary["export"] is not None:  # process 0 evaluates what it exported
        evaluated = final_eval.evaluate(config, workdir, summary["export"])
        if evaluated is not None:
            summary["report"] = evaluated["report"]
            print(
                f"grid: {evaluated['grid']}, report: {evaluated['report_path']}, "
                f"export: {summary['export']}",
                flush=True,
            )
    return summary


def _has_checkpoints(directory: Path) -> bool:
    # Finished steps are directories named by their number (orbax renames them when complete).
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _phase_summary(result: PhaseResult) -> dict:
    return {
        "step": result.step,
        "losses": result.losses,
        "preempted": result.preempted,
        "resumed_from": result.resumed_from,
    }


def export(path: Path, sd_config: SDConfig, state: TrainState, tokenizer_dir: Path) -> Path | None:
    """Writes a diffusers-format model (EMA weights where kept) from process 0.

    Args:
      path: the output directory.
      sd_config: the final model configs.
      state: the diffusion phase's state.
      tokenizer_dir: copied into ``path/tokenizer``.

    Returns:
      ``path`` (None on processes other than 0).
    """
    from jaxdiff.weights.pretrained import save_pretrained

    params = gather({**state.params, **state.ema_params})  # a collective: every process joins
    if not _is_main():
        return None
    save_pretrained(path, sd_config, params, tokenizer_dir)
    print(f"exported {path}")
    return path
