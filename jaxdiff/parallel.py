"""Device meshes, shardings and multi-host set-up.

One way to run across devices (DESIGN rule 4): `jax.jit` with `NamedSharding`
over a 2-D mesh with axes ("data", "fsdp"). The batch is split over both axes
(every device sees a distinct slice of the batch); parameters and optimizer
state are split over "fsdp" only (ZeRO-3 style), so with `fsdp=1` this is plain
data parallelism with replicated parameters.

Everything here works on arbitrary pytrees and imports no model code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The batch's leading axis is split over both mesh axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Arrays smaller than this (elements) stay replicated under FSDP: gathering a
# bias or a norm scale costs more in latency than its replicas cost in memory.
DEFAULT_MIN_FSDP_SIZE = 2**14
# A dict key starting with this marks a subtree that `param_shardings` keeps replicated
# whatever its shapes (the optimizer's packed vector of small leaves, themselves below
# the FSDP threshold: `jaxdiff.train.optim.pack_small_leaves`).
REPLICATED_KEY = "replicated:"

# Environment variables read by `initialize_distributed`.
ENV_COORDINATOR = "JAXDIFF_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIFF_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIFF_PROCESS_ID"

# Set by Cloud TPU VMs; jax.distributed.initialize() then finds everything itself.
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "TPU_ACCELERATOR_TYPE")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ("data", "fsdp") device mesh.

    Args:
      data: size of the data-parallel axis; -1 means "all devices not used by fsdp".
      fsdp: size of the parameter-sharding axis; -1 means "all devices not used by data".
      devices: devices to use (default: `jax.devices()`, all processes).

    Returns:
      A `Mesh` of shape [data, fsdp] with axis names ("data", "fsdp").

    Raises:
      ValueError: if sizes are not positive (or -1), both are -1, or
        data * fsdp differs from the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh: no devices given")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size != -1 and size < 1:
            raise ValueError(f"make_mesh: {name}={size} must be a positive int or -1")
    if data == -1 and fsdp == -1:
        raise ValueError("make_mesh: at most one of data, fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"make_mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if n % data:
            raise ValueError(f"make_mesh: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(
            f"make_mesh: data * fsdp = {data} * {fsdp} = {data * fsdp} but there are {n} devices"
        )
    try:
        # Orders devices so that neighbouring mesh coordinates are physically close
        # (ICI rings on TPU); falls back to the given order where it cannot.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def fsdp_spec(
    shape: Sequence[int], mesh: Mesh, min_size: int = DEFAULT_MIN_FSDP_SIZE
) -> PartitionSpec:
    """Partition spec for one parameter-like array under FSDP.

    Shards the largest dimension divisible by the "fsdp" axis size (ties: the
    last such dimension, the usual output-feature axis of a kernel).

    Args:
      shape: the array's shape.
      mesh: a mesh from `make_mesh`.
      min_size: arrays with fewer elements stay replicated.

    Returns:
      `PartitionSpec` with "fsdp" at the chosen dimension, or `PartitionSpec()`
      (replicated) for scalars, tiny arrays, fsdp size 1, or when no dimension divides.
    """
    n = mesh.shape[FSDP_AXIS]
    shape = tuple(int(d) for d in shape)
    if n == 1 or not shape or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    best = None
    for axis, dim in enumerate(shape):
        if dim % n == 0 and (best is None or dim >= shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[best] = FSDP_AXIS
    return PartitionSpec(*spec)


def param_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
    """Maps a tree of shapes to a tree of FSDP `NamedSharding`s.

    Args:
      abstract_tree: pytree whose leaves have `.shape` (ShapeDtypeStruct, arrays),
        e.g. the output of `jax.eval_shape(init_fn, ...)`.
      mesh: a mesh from `make_mesh`.
      min_size: see `fsdp_spec`.

    Returns:
      A pytree of the same structure with a `NamedSharding` per leaf; leaves under
      a dict key starting with `REPLICATED_KEY` are replicated.

    Raises:
      ValueError: if a leaf has no shape.
    """

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            raise ValueError(
                f"param_shardings: leaf at {jax.tree_util.keystr(path)} has no shape "
                f"({type(leaf).__name__}); pass a tree of arrays or ShapeDtypeStructs"
            )
        if any(str(getattr(k, "key", "")).startswith(REPLICATED_KEY) for k in path):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fsdp_spec(leaf.shape, mesh, min_size))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that places a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for batches: the leading (batch) axis split over ("data", "fsdp").

    Args:
      mesh: a mesh from `make_mesh`.

    Returns:
      `NamedSharding(mesh, PartitionSpec(("data", "fsdp")))`; trailing axes replicated.
    """
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def sharded_init(
    init_fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    min_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> Any:
    """Runs `init_fn(*args)` so that each output is born sharded.

    Shapes come from `jax.eval_shape` (no FLOPs, no memory), shardings from
    `param_shardings`, and the jitted init writes each shard straight to its
    device, so a model larger than one device's memory never lands on one device.

    Args:
      init_fn: function of arrays (e.g. PRNG keys) returning a pytree of arrays.
        Close over static arguments (configs, shapes) with functools.partial.
      *args: array arguments for `init_fn`.
      mesh: a mesh from `make_mesh`.
      min_size: see `fsdp_spec`.

    Returns:
      The pytree `init_fn(*args)` with FSDP shardings on `mesh`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, min_size)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins this process to a multi-process JAX job (call before any other JAX use).

    Values come from the arguments, else from the environment variables
    JAXDIFF_COORDINATOR ("host:port"), JAXDIFF_NUM_PROCESSES and JAXDIFF_PROCESS_ID.
    With none of them set, on a Cloud TPU VM, `jax.distributed.initialize()`
    detects everything itself; otherwise this is a single process and a no-op.

    On CPU the cross-process collectives go through gloo, which is selected first.

    Args:
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).

    Returns:
      True if `jax.distributed.initialize` was called, False for a single process.

    Raises:
      ValueError: if the values are partial or inconsistent.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)

    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit):
        if any(os.environ.get(v) for v in _TPU_ENV_VARS):
            jax.distributed.initialize()
            return True
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"initialize_distributed: num_processes={num_processes} must be >= 1")
    if num_processes == 1 and process_id in (None, 0):
        return False
    if any(v is None for v in explicit):
        raise ValueError(
            "initialize_distributed: coordinator_address, num_processes and process_id must "
            f"all be given (arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID});"
            f" got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize_distributed: process_id={process_id} not in [0, {num_processes})"
        )
    # Without this, CPU computations spanning processes have no collectives
    # backend; the setting only concerns the CPU client, so it is harmless on GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def process_shard() -> tuple[int, int]:
    """Which slice of the data this host reads.

    Returns:
      (process_index, process_count) of this JAX process.
    """
    return jax.process_index(), jax.process_count()


def host_batch_to_global(local_batch_tree: Any, mesh: Mesh) -> Any:
    """Assembles per-host batches into global arrays sharded by `batch_sharding`.

    Each process passes its own slice of the global batch (leading axis
    = global batch / process_count); the result is the global batch as jax.Arrays
    whose leading axis is split over ("data", "fsdp").

    Args:
      local_batch_tree: pytree of numeric numpy arrays, each [B_local, ...].
      mesh: a mesh from `make_mesh`.

    Returns:
      A pytree of jax.Arrays, each [B_local * process_count, ...].

    Raises:
      ValueError: for non-numeric leaves (e.g. captions: tokenize them first),
        scalars, or a global batch not divisible by the number of batch shards.
    """
    sharding = batch_sharding(mesh)
    n_shards = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
    n_proc = jax.process_count()

    def one(path, leaf):
        where = jax.tree_util.keystr(path) or "<root>"
        arr = np.asarray(leaf)
        if arr.dtype.kind not in "biufc":
            raise ValueError(
                f"host_batch_to_global: leaf {where} has dtype {arr.dtype}; only numeric "
                "arrays can go to devices (tokenize captions before this call)"
            )
        if arr.ndim == 0:
            raise ValueError(f"host_batch_to_global: leaf {where} is a scalar; need [B, ...]")
        global_batch = arr.shape[0] * n_proc
        if global_batch % n_shards:
            raise ValueError(
                f"host_batch_to_global: leaf {where} gives global batch {global_batch} "
                f"({arr.shape[0]} per host x {n_proc} hosts), not divisible by the "
                f"{n_shards} batch shards of the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, arr)

    return jax.tree_util.tree_map_with_path(one, local_batch_tree)


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (all processes must call it).

    For decisions every host must take together, e.g. "a preemption signal
    arrived somewhere: save and stop".

    Args:
      flag: this process's value.

    Returns:
      The logical OR over all processes (just `flag` for a single process).
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
    return bool(np.any(flags))
