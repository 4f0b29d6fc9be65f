"""Meshes, FSDP shardings, sharded init and batch assembly on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel


def test_make_mesh_shapes():
    assert jax.device_count() == 8
    mesh = parallel.make_mesh(data=8)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    mesh = parallel.make_mesh(data=2, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(parallel.make_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    # A sub-mesh over given devices.
    assert dict(parallel.make_mesh(devices=jax.devices()[:4]).shape) == {"data": 4, "fsdp": 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=3, fsdp=2), "6 but there are 8 devices"),
        (dict(data=4, fsdp=4), "16 but there are 8"),
        (dict(data=-1, fsdp=3), "fsdp=3 does not divide"),
        (dict(data=-1, fsdp=-1), "at most one"),
        (dict(data=0), "positive"),
    ],
)
def test_make_mesh_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(**kwargs)


def test_fsdp_spec_picks_largest_divisible_dim():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    assert parallel.fsdp_spec((6, 16), mesh, min_size=0) == P(None, "fsdp")
    assert parallel.fsdp_spec((16, 8), mesh, min_size=0) == P("fsdp", None)
    # 12 is larger than 8 but 12 % 4 == 0 too; 10 is largest but does not divide.
    assert parallel.fsdp_spec((3, 3, 12, 10), mesh, min_size=0) == P(None, None, "fsdp", None)
    # Ties go to the last dimension.
    assert parallel.fsdp_spec((8, 8), mesh, min_size=0) == P(None, "fsdp")
    # Nothing divides, scalars, tiny arrays: replicated.
    assert parallel.fsdp_spec((3, 5), mesh, min_size=0) == P()
    assert parallel.fsdp_spec((), mesh, min_size=0) == P()
    assert parallel.fsdp_spec((16, 8), mesh, min_size=1000) == P()
    assert parallel.fsdp_spec((64, 64), mesh, min_size=1000) == P(None, "fsdp")
    # With fsdp of size 1 everything is replicated.
    assert parallel.fsdp_spec((64, 64), parallel.make_mesh(data=8), min_size=0) == P()


def test_param_shardings_tree_and_bad_leaf():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    tree = {
        "dense": {"kernel": jax.ShapeDtypeStruct((32, 12), jnp.float32)},
        "bias": jax.ShapeDtypeStruct((7,), jnp.float32),
    }
    sh = parallel.param_shardings(tree, mesh, min_size=0)
    assert sh["dense"]["kernel"].spec == P("fsdp", None)
    assert sh["bias"].spec == P()
    assert sh["bias"].mesh is mesh
    with pytest.raises(ValueError, match=r"\['bad'\] has no shape"):
        parallel.param_shardings({"bad": "not an array"}, mesh)


def _init(key):
    k1, k2 = jax.random.split(key)
    return {
        "conv": jax.random.normal(k1, (3, 3, 8, 16)),
        "proj": jax.random.normal(k2, (20, 12)),
        "scale": jnp.ones((5,)),
        "step": jnp.zeros((), jnp.int32),
    }


def test_sharded_init_shardings_and_values():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    key = jax.random.key(0)
    out = parallel.sharded_init(_init, key, mesh=mesh, min_size=0)
    assert out["conv"].sharding.spec == P(None, None, None, "fsdp")
    assert out["proj"].sharding.spec == P("fsdp", None)
    assert out["scale"].sharding.spec == P()
    assert out["step"].sharding.spec == P()
    # Each device holds a quarter of the sharded kernels, not a copy.
    assert out["conv"].addressable_shards[0].data.shape == (3, 3, 8, 4)
    assert out["proj"].addressable_shards[0].data.shape == (5, 12)
    ref = _init(key)
    for name in ref:
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(ref[name]), rtol=1e-6)


def test_batch_sharding_and_host_batch_to_global():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
    local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "ids": np.arange(16)}
    out = parallel.host_batch_to_global(local, mesh)
    assert out["image"].shape == (16, 3)
    assert out["image"].sharding.spec == P(("data", "fsdp"))
    assert out["image"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
    np.testing.assert_array_equal(np.asarray(out["ids"]), local["ids"])
    with pytest.raises(ValueError, match="caption.*tokenize"):
        parallel.host_batch_to_global({"caption": np.array(["a", "b"] * 4)}, mesh)
    with pytest.raises(ValueError, match="global batch 6"):
        parallel.host_batch_to_global({"x": np.zeros((6, 2))}, mesh)


def test_process_shard_and_any_process_single_host():
    assert parallel.process_shard() == (0, 1)
    assert parallel.any_process(True) is True
    assert parallel.any_process(False) is False


def test_initialize_distributed_single_process_and_errors(monkeypatch):
    for var in (
        parallel.ENV_COORDINATOR,
        parallel.ENV_NUM_PROCESSES,
        parallel.ENV_PROCESS_ID,
        *parallel._TPU_ENV_VARS,
    ):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "1")
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match="must all be given"):
        parallel.initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id=2 not in \[0, 2\)"):
        parallel.initialize_distributed("127.0.0.1:1234", process_id=2)
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAXDIFF_NUM_PROCESSES='two'"):
        parallel.initialize_distributed()
