"""Checkpoint round trips, retention, corruption fallback and the preemption flag."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel
from jaxdiff.checkpoint import Checkpointer, preemption_guard

# After a failed restore, tensorstore reads still in flight may complete after
# orbax closed its asyncio loop; their callbacks then report "Event loop is
# closed" as an unraisable exception. Harmless noise from the fallback path.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def _state(mesh, offset=0.0):
    """A train-state-like pytree with FSDP-sharded, replicated and key leaves."""
    shard = NamedSharding(mesh, P(None, "fsdp"))
    rep = NamedSharding(mesh, P())
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) + offset
    return {
        "params": {"w": jax.device_put(w, shard), "b": jax.device_put(jnp.ones(3) + offset, rep)},
        "ema": {"w": jax.device_put(w * 0.5, shard)},
        "opt": {"mu": jax.device_put(jnp.full((8, 16), offset, jnp.bfloat16), shard)},
        "step": jax.device_put(jnp.int32(7 + offset), rep),
        "rng": jax.device_put(jax.random.key(3), rep),
    }


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        assert x.sharding.spec == y.sharding.spec
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(data=2, fsdp=4)


def test_round_trip_state_data_and_config(tmp_path, mesh):
    state = _state(mesh)
    config = {"lr": 1e-4, "model": {"name": "tiny", "channels": [32, 64]}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore_latest(_abstract(state)) is None
        assert ckpt.save(5, state, data_state={"next_index": 42}, config=config)
        ckpt.wait()
        step, restored, data_state = ckpt.restore_latest(_abstract(state))
        assert step == 5
        assert data_state == {"next_index": 42}
        assert ckpt.config() == config
        _assert_same(restored, state)
        assert restored["params"]["w"].sharding.spec == P(None, "fsdp")
        # The target decides the shardings: restore the same bytes fully replicated.
        rep = NamedSharding(parallel.make_mesh(data=8), P())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
        _, replicated, _ = ckpt.restore_latest(target)
        assert replicated["params"]["w"].sharding.spec == P()
        np.testing.assert_array_equal(replicated["params"]["w"], state["params"]["w"])


def test_save_without_data_and_config_and_bad_json(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, state)
        step, _, data_state = ckpt.restore_latest(_abstract(state))
        assert (step, data_state) == (1, None)
        assert ckpt.config() is None
        with pytest.raises(ValueError, match="config is not JSON"):
            ckpt.save(2, state, config={"fn": print})
        # A repeated step (forced save right after a periodic one) is a no-op.
        ckpt.wait()
        assert ckpt.save(1, state, force=True) is False


def test_data_state_from_another_process_count_is_dropped(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, data_state={"next_index": 9})
    item = tmp_path / "3" / "data" / "metadata"
    saved = json.loads(item.read_text())
    assert saved == {"process_count": 1, "per_process": [{"next_index": 9}]}
    # As if written by a two-host job: this single process cannot use it.
    item.write_text(json.dumps({"process_count": 2, "per_process": [{}, {}]}))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(RuntimeWarning, match="for 2 processes but this job has 1"):
            step, restored, data_state = ckpt.restore_latest(_abstract(state))
    assert (step, data_state) == (3, None)
    _assert_same(restored, state)


def test_save_every_and_max_to_keep(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path, max_to_keep=2, save_every=2) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state)]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_corrupted_latest_falls_back_to_previous(tmp_path, mesh):
    s1, s2 = _state(mesh, 1.0), _state(mesh, 2.0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, s1, data_state={"next_index": 1})
        ckpt.save(2, s2, data_state={"next_index": 2})
        ckpt.wait()
    # Truncate the array store's manifest of step 2, as a crash or full disk would.
    manifest = tmp_path / "2" / "state" / "manifest.ocdbt"
    assert manifest.is_file()
    with open(manifest, "r+b") as f:
        f.truncate(manifest.stat().st_size // 2)

    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(RuntimeWarning, match="step 2") as record:
            step, restored, data_state = ckpt.restore_latest(_abstract(s1))
        assert str(tmp_path / "2") in str(record[0].message)
        assert (step, data_state) == (1, {"next_index": 1})
        _assert_same(restored, s1)
        # Moved aside: not listed, and step 2 can be saved again after resuming.
        assert ckpt.all_steps() == [1]
        assert (tmp_path / "2.corrupt").is_dir()
        assert ckpt.save(2, s2)
        ckpt.wait()
        assert ckpt.restore_latest(_abstract(s2))[0] == 2


def test_nothing_restorable_raises_and_moves_nothing(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    # A target that does not match (new code, old checkpoints) must not be
    # mistaken for corruption: every step fails, so nothing is moved aside.
    wrong = dict(_abstract(state), extra=jax.ShapeDtypeStruct((2,), jnp.float32))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(RuntimeError, match="step 2: .*step 1: "):
            ckpt.restore_latest(wrong)
        assert ckpt.all_steps() == [1, 2]
    shutil.rmtree(tmp_path / "1" / "state" / "d")  # the array data files
    shutil.rmtree(tmp_path / "2" / "state" / "d")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(RuntimeError, match="could be restored"):
            ckpt.restore_latest(_abstract(state))
        assert ckpt.all_steps() == [1, 2]


def test_unfinished_tmp_checkpoint_is_ignored(tmp_path, mesh):
    s1, s2 = _state(mesh, 1.0), _state(mesh, 2.0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, s1)
    with Checkpointer(tmp_path / "other") as other:
        other.save(9, s2)
    # A complete-looking step 9 that was never renamed from its tmp name, as
    # left by a crash between writing and finalising.
    tmp = tmp_path / "9.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "other" / "9", tmp)
    shutil.rmtree(tmp_path / "other")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        step, restored, _ = ckpt.restore_latest(_abstract(s1))
        assert step == 1
        _assert_same(restored, s1)
    assert not tmp.exists()  # cleaned up when the manager opened the directory


def test_preemption_guard_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with preemption_guard() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        # Python runs the handler between bytecodes of the main thread; wait for it.
        for _ in range(1000):
            if flag.requested:
                break
        assert flag.requested
        assert flag.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with preemption_guard(signals=(signal.SIGINT,)) as flag:
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt unguarded
        for _ in range(1000):
            if flag.requested:
                break
        assert flag.signal == signal.SIGINT
