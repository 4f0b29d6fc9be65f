"""Training checkpoints: a thin layer over orbax's `CheckpointManager`.

Each step directory holds three items:

  state   any pytree of jax arrays (params, EMA, optimizer state, step, rng),
          written shard-by-shard by every process and restored straight into
          the shardings of an abstract target;
  data    the data iterator's state (grain `get_state()`) of every process, JSON;
  config  the run's config, JSON.

Orbax writes each step into a temporary directory and renames it when complete,
so an interrupted save is never listed as a step. A step that is listed but
cannot be read (a truncated or deleted file) is reported, moved aside to
`<step>.corrupt` once an older step has restored instead.

`preemption_guard` turns SIGTERM/SIGINT into a flag the training loop polls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

from jaxdiff.parallel import any_process

STATE, DATA, CONFIG = "state", "data", "config"


def _to_json(name: str, value: Any) -> Any:
    """Checks now (not in the async writer) that `value` serialises to JSON."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Checkpointer.save: {name} is not JSON-serialisable: {e}") from None
    return value


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON value, in process order (a collective on multi-host).

    Each host's data iterator is at its own position (hosts read different
    shards, and skipped records differ), so all of them are saved.
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(len(raw), np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(raw)] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(gathered, lengths)]


def _abstract(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStructs carrying their sharding; ShapeDtypeStructs pass."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves and restores training state, data-iterator state and config.

    Every process of a multi-host job must make the same calls (they are
    collectives: orbax coordinates the array writes, each process's data state
    is gathered and process 0 writes the JSON items).

    Args:
      directory: root directory; step `s` lives in `directory/s`.
      max_to_keep: keep only the newest this many steps (None: keep all).
      save_every: `save` writes only at steps divisible by this (unless `force`).
      async_save: write in a background thread; `save` returns once the arrays
        are copied off the devices, so the caller may donate/overwrite them.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        save_every: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"Checkpointer: max_to_keep={max_to_keep} must be >= 1 or None")
        if save_every < 1:
            raise ValueError(f"Checkpointer: save_every={save_every} must be >= 1")
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Strict multiples of save_every (orbax's default also saves the first
            # step it sees); preemption-triggered saves stay on.
            should_save_fn=lambda step, _last: step % save_every == 0,
            enable_async_checkpointing=async_save,
            # Half-written tmp dirs from a crash are never restored; delete them.
            cleanup_tmp_directories=True,
        )
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any] | None = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves a step if `step` is due (a multiple of `save_every`) or `force`.

        Args:
          step: training step number.
          state: pytree of jax arrays (any shardings).
          data_state: this process's JSON-serialisable iterator state, e.g.
            `iterator.get_state()`; each process gets its own back on restore.
          config: JSON-serialisable dict or a ConfigDict.
          force: save regardless of `save_every` (e.g. on preemption).

        Returns:
          True if a save was started (it may still be running: see `wait`).

        Raises:
          ValueError: if `data_state` or `config` is not JSON-serialisable.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            per_process = _gather_json(_to_json("data_state", data_state))
            items[DATA] = ocp.args.JsonSave(
                {"process_count": len(per_process), "per_process": per_process}
            )
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_to_json("config", config))
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
        except StepAlreadyExistsError:
            # A repeated save of one step (e.g. a forced save on preemption right
            # after the periodic one) is a no-op rather than an error.
            return False

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
        """Restores the newest readable checkpoint.

        Steps are tried newest first. If an older step restores after newer ones
        failed, the newer ones were unreadable (truncated, deleted files): each
        is reported with a warning naming its step and path, and moved aside to
        `<step>.corrupt` so a resumed run can save that step again. If no step
        restores, nothing is moved: that is more likely a target that does not
        match the saved state (a code change) than damage to every checkpoint.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `sharding` set (or
            arrays): the structure, dtypes and target shardings of the state.

        Returns:
          (step, state, data_state) with this process's data_state (None if none
          was saved or the number of processes changed), or None if the
          directory holds no checkpoint.

        Raises:
          RuntimeError: if checkpoints exist but none can be restored (the
            message carries each step's error).
        """
        self.wait()
        target = _abstract(abstract_state)
        failed: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            error = None
            try:
                state, data_state = self._restore(step, target)
            except Exception as e:  # orbax/tensorstore raise many kinds
                error = f"{type(e).__name__}: {str(e)[:300]}"
            # All processes must take the same branch, even if only one failed to read.
            if any_process(error is not None):
                failed.append((step, error or "failed on another process"))
                continue
            for bad_step, bad_error in failed:
                moved = self._move_aside(bad_step)
                warnings.warn(
                    f"checkpoint at step {bad_step} ({self.directory / str(bad_step)}) could "
                    f"not be restored ({bad_error}); moved to {moved}; restored step {step}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return step, state, data_state
        if failed:
            details = "; ".join(f"step {s}: {e}" for s, e in failed)
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored into the given "
                f"abstract_state (does its structure match the saved state?): {details}"
            )
        return None

    def _restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """(state, this process's data state) of one step; raises if unreadable."""
        items = {STATE: ocp.args.StandardRestore(target)}
        if (self.directory / str(step) / DATA).exists():
            items[DATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        data_state = self._own_data_state(restored[DATA], step) if DATA in items else None
        return restored[STATE], data_state

    def _own_data_state(self, saved: Mapping[str, Any], step: int) -> Any:
        """This process's iterator state, or None if the host count changed."""
        count = saved.get("process_count") if isinstance(saved, Mapping) else None
        if count is None or not isinstance(saved.get("per_process"), list):
            raise ValueError(f"data item of step {step} is malformed: {str(saved)[:200]}")
        if count != jax.process_count():
            # Shards are laid out per host; another host count means other shards.
            warnings.warn(
                f"checkpoint step {step} holds data-iterator state for {count} processes but "
                f"this job has {jax.process_count()}; the data pipeline starts afresh",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return saved["per_process"][jax.process_index()]

    def _move_aside(self, step: int) -> Path:
        """Renames a broken step dir so it is neither restored nor collides with a re-save."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        i = 1
        while dst.exists():
            dst = self.directory / f"{step}.corrupt{i}"
            i += 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxdiff_checkpoint_move_{step}")
        self._manager.close()
        self._manager = self._new_manager()
        return dst

    def config(self, step: int | None = None) -> dict | None:
        """The config saved with `step` (default: the latest step), or None."""
        self.wait()
        step = self._manager.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / CONFIG).exists():
            return None
        args = ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[CONFIG]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PreemptionFlag:
    """Set by a signal handler; the training loop polls `requested`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        """True once SIGTERM/SIGINT arrived: save now and exit cleanly."""
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        """Marks a stop request (called by the handler; tests may call it too)."""
        self.signal = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def preemption_guard(
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[PreemptionFlag]:
    """Turns termination signals into a polled flag for the block's duration.

    Instead of dying mid-step (and mid-save), the process keeps running; the
    loop checks `flag.requested` after each step (with `parallel.any_process`
    on multi-host jobs, since a signal may reach only some hosts), saves with
    `force=True` and returns. The previous handlers are restored on exit.

    Args:
      signals: signal numbers to catch.

    Yields:
      A `PreemptionFlag`.

    Raises:
      ValueError: if not called from the main thread (Python only delivers
        signals there).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("preemption_guard: signal handlers can only be set in the main thread")
    flag = PreemptionFlag()
    previous = {}

    def handler(signum, frame):
        flag.set(signum)

    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
