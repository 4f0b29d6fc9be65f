"""The train step's layout and optimizer switches compute the same step.

``benchmarks/gpu.py`` times these forms of the step on a GPU (experiments
``train_grad_layout`` and ``train_flat_optimizer``); here, at a tiny config on an
FSDP-sharded state (2 x 4 CPU devices), each must give the parameters the plain
step gives (no layout constraints, per-leaf AdamW), so that a speed-up measured
there is a speed-up of the same computation.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import gpu
from jaxdiff import layouts, parallel
from jaxdiff.models.sd import abstract_params
from jaxdiff.models.unet import ohwi_kernels
from jaxdiff.train import optim
from jaxdiff.train.step import StepConfig, init_state, jit_train_step, make_train_step


@pytest.fixture(scope="module")
def setup():
    cfg = gpu.CONFIGS["tiny"]
    config = gpu.sd_config(cfg, 300, 0, 1)
    params = gpu.random_params(abstract_params(config))
    rng = np.random.default_rng(0)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32)),
        "input_ids": jnp.asarray(rng.integers(0, 300, (2, 77)), jnp.int32),
    }
    return config, params, batch, parallel.make_mesh(data=2, fsdp=4)


# The tests' FSDP threshold: small enough that the tiny model's kernels are sharded.
MIN_SIZE = 64


def _sharded(state, mesh):
    """(the state placed on the FSDP mesh, ``jit_train_step``'s sharding kwargs).

    The steps are jitted with these shardings in and out, as the training loop jits
    them: without out-shardings XLA may return a small leaf sharded where the input
    had it replicated, and the second step would compile the program again.
    """
    shardings = parallel.param_shardings(state, mesh, MIN_SIZE)
    rep = parallel.replicated(mesh)  # the tests' batch of 2 does not split 8 ways
    kw = dict(state_shardings=shardings, batch_sharding=rep, replicated=rep)
    return jax.device_put(state, shardings), kw


def _two_steps(setup, frozen_apart=False):
    """(lowered text, UNet params after two steps, last loss, optimizer state leaves).

    ``frozen_apart``: jitted as the library does (``jit_train_step``: the frozen
    networks' params not donated); else plain ``jax.jit`` with the whole state donated.
    """
    config, params, batch, mesh = setup
    # The optimizer is built here, after any switch is set (make_optimizer reads it).
    tx, step_cfg = gpu.train_setup(params["unet"], jnp.bfloat16, MIN_SIZE)
    fresh = jax.tree.map(jnp.copy, params)  # (the step donates the state)
    state = init_state(fresh, tx, step_cfg, jax.random.key(0))
    state, shardings = _sharded(state, mesh)
    if frozen_apart:
        step = jit_train_step(
            make_train_step(config, step_cfg, tx), step_cfg.trainable, **shardings
        )
    else:
        state_sh, rep = shardings["state_shardings"], shardings["replicated"]
        step = jax.jit(
            make_train_step(config, step_cfg, tx),
            donate_argnums=0,
            in_shardings=(state_sh, rep, rep),
            out_shardings=(state_sh, rep),
        )
    text = step.lower(state, batch, jax.random.key(1)).as_text()
    for _ in range(2):
        before = state
        state, metrics = step(state, batch, jax.random.key(1))
    if frozen_apart:
        # The frozen networks' arrays are the ones passed in, still alive; the rest of
        # the state was donated.
        for name in ("vae", "text_encoder"):
            old, new = jax.tree.leaves(before.params[name]), jax.tree.leaves(state.params[name])
            assert all(a is b and not a.is_deleted() for a, b in zip(old, new, strict=True))
        assert all(a.is_deleted() for a in jax.tree.leaves(before.params["unet"]))
        # The optimizer state too, but the norm the clipping recorded: the step never
        # reads it, so jax prunes that argument instead of donating it.
        kept = [
            jax.tree_util.keystr(path)
            for path, a in jax.tree_util.tree_leaves_with_path(before.opt_state)
            if not a.is_deleted()
        ]
        assert len(kept) == 1 and kept[0].endswith(".grad_norm"), kept
    leaves = len(jax.tree.leaves(state.opt_state))
    return text, jax.device_get(state.params["unet"]), float(metrics["loss"]), leaves


@contextlib.contextmanager
def _grad_layout(pin):
    """``train.optim._GRAD_LAYOUT`` set to ``pin`` (steps built inside read it)."""
    saved = optim._GRAD_LAYOUT
    optim._GRAD_LAYOUT = pin
    try:
        yield
    finally:
        optim._GRAD_LAYOUT = saved


@pytest.fixture(scope="module")
def default_run(setup):
    """The plain step: gradients in whatever layout XLA picks, AdamW leaf by leaf."""
    saved = optim._PACK_SMALL_BELOW
    optim._PACK_SMALL_BELOW = 0
    try:
        with _grad_layout(False):
            return _two_steps(setup)
    finally:
        optim._PACK_SMALL_BELOW = saved


def _assert_same_step(setup, run, default_run, rtol):
    _, params, loss, _ = run
    _, ref, ref_loss, _ = default_run
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    start = jax.device_get(setup[1]["unet"])
    moved = 0
    for a, b, a0 in zip(
        jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(start), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7)
        moved += int(not np.array_equal(a, a0))
    assert moved == len(jax.tree.leaves(start))  # every parameter took both steps


@pytest.fixture(scope="module")
def library_run(setup):
    """The step as the library builds it: layouts pinned, small leaves packed."""
    return _two_steps(setup)


def test_conv_gradients_pinned_to_default_layouts(setup, default_run, library_run):
    """``train.optim._GRAD_LAYOUT`` (the default on CPU and GPU): one layout constraint
    per 4-D gradient, same step as the plain one."""
    tree = {"k": jnp.arange(72.0).reshape(3, 3, 2, 4), "b": jnp.ones(4)}
    pinned = jax.jit(layouts.default_layouts)(tree)
    assert set(pinned) == {"k", "b"}
    for name in tree:  # values unchanged
        np.testing.assert_array_equal(pinned[name], tree[name])
    # Only the 4-D leaf is pinned.
    assert jax.jit(layouts.default_layouts).lower(tree).as_text().count("LayoutConstraint") == 1
    assert optim._GRAD_LAYOUT is None  # the library's default: by backend
    assert jax.default_backend() == "cpu" and optim._pin_grad_layouts()
    run = library_run
    kernels = [a for a in jax.tree.leaves(default_run[1]) if a.ndim == 4]
    assert run[0].count("LayoutConstraint") == len(kernels) > 0
    assert "LayoutConstraint" not in default_run[0]
    _assert_same_step(setup, run, default_run, rtol=1e-6)


def test_frozen_params_read_not_donated(setup, library_run):
    """``jit_train_step`` (the training loop's jit): the frozen VAE and text encoder
    are an argument the step only reads, not donated with the state nor returned;
    the same step as the plain jit of the whole state."""
    run = _two_steps(setup, frozen_apart=True)  # asserts the donations
    assert run[3] == library_run[3]
    _assert_same_step(setup, run, library_run, rtol=1e-6)


def test_flat_optimizer(setup, default_run, monkeypatch):
    """``train.optim._FLAT_OPTIMIZER``: clipping and AdamW over one flat vector, same
    step up to the order of the global norm's sum, far fewer optimizer-state arrays."""
    monkeypatch.setattr(optim, "_FLAT_OPTIMIZER", True)
    run = _two_steps(setup)
    assert run[3] < default_run[3] // 10, (run[3], default_run[3])
    _assert_same_step(setup, run, default_run, rtol=2e-5)


def _compiled_collectives(setup, pack_below: int) -> dict[str, int]:
    """Collectives in the step compiled for the FSDP mesh, with the small leaves below
    ``pack_below`` elements packed (0: none), the state sharded at ``MIN_SIZE`` and a
    batch of 8 split over the mesh as the training loop splits it."""
    config, params, _, mesh = setup
    split = parallel.batch_sharding(mesh)
    batch = {
        "latents": jax.ShapeDtypeStruct((8, 8, 8, 4), jnp.float32, sharding=split),
        "input_ids": jax.ShapeDtypeStruct((8, 77), jnp.int32, sharding=split),
    }
    saved = optim._PACK_SMALL_BELOW
    optim._PACK_SMALL_BELOW = pack_below
    try:
        # As the library builds it (phases): packing no leaf that FSDP shards.
        tx, step_cfg = gpu.train_setup(params["unet"], jnp.bfloat16, MIN_SIZE)
        abstract = jax.eval_shape(lambda p: init_state(p, tx, step_cfg, jax.random.key(0)), params)
        shardings = parallel.param_shardings(abstract, mesh, MIN_SIZE)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        step = jax.jit(make_train_step(config, step_cfg, tx), donate_argnums=0)
        text = step.lower(abstract, batch, jax.random.key(1)).compile().as_text()
    finally:
        optim._PACK_SMALL_BELOW = saved
    return {op: text.count(f"{op}(") for op in ("all-gather", "all-reduce", "collective-permute")}


def test_small_leaves_packed(setup, default_run, library_run):
    """The default optimizer packs the leaves that FSDP leaves replicated into one vector
    (`optim.pack_small_leaves`): the same step as AdamW leaf by leaf (up to the order of
    the norm's sums), two moment arrays for all those leaves, replicated, and no more
    collectives on the FSDP mesh than the per-leaf step."""
    assert optim._PACK_SMALL_BELOW == parallel.DEFAULT_MIN_FSDP_SIZE
    _, params, _, mesh = setup
    unet = jax.tree.leaves(params["unet"])
    small = [a for a in unet if a.size < MIN_SIZE]
    assert 0 < len(small) < len(unet)
    run = library_run  # packed (and pinned) against the per-leaf, unpinned step
    # mu and nu: one array each for the small leaves instead of one per leaf.
    assert default_run[3] - run[3] == 2 * (len(small) - 1)
    _assert_same_step(setup, run, default_run, rtol=2e-5)

    # The packed moments stay replicated even where their size would be sharded.
    tx, step_cfg = gpu.train_setup(params["unet"], jnp.bfloat16, MIN_SIZE)
    state = jax.eval_shape(lambda p: init_state(p, tx, step_cfg, jax.random.key(0)), params)
    shardings = jax.tree_util.tree_leaves_with_path(
        parallel.param_shardings(state, mesh, min_size=8)
    )
    packed = [sh for path, sh in shardings if parallel.REPLICATED_KEY in jax.tree_util.keystr(path)]
    assert len(packed) == 2  # mu, nu
    assert all(sh.spec == jax.sharding.PartitionSpec() for sh in packed)

    plain = _compiled_collectives(setup, 0)
    with_packing = _compiled_collectives(setup, optim._PACK_SMALL_BELOW)
    assert plain["all-gather"] > 0
    for op, n in with_packing.items():
        assert n <= plain[op], (op, with_packing, plain)


def test_ohwi_kernel_state(setup):
    # The UNet's convolution kernels kept in cuDNN's order in the state
    # (StepConfig.ohwi_kernels), FSDP-sharded by their new shapes: the same gradients.
    # Compared through two plain SGD steps, linear in the gradients (AdamW's first
    # steps are ~lr * sign(gradient), which a reordered sum flips where it is ~0).
    config, params, batch, mesh = setup
    tx = optax.sgd(1e-2)
    out = {}
    for ohwi in (False, True):
        step_cfg = StepConfig(trainable=("unet",), ema_decay=None, ohwi_kernels=ohwi)
        fresh = jax.tree.map(jnp.copy, params)
        if ohwi:
            fresh = dict(fresh, unet=ohwi_kernels(fresh["unet"]))
        state = init_state(fresh, tx, step_cfg, jax.random.key(0))
        state, shardings = _sharded(state, mesh)
        step = jit_train_step(
            make_train_step(config, step_cfg, tx), step_cfg.trainable, **shardings
        )
        for _ in range(2):
            state, metrics = step(state, batch, jax.random.key(1))
        unet = state.params["unet"]
        out[ohwi] = (ohwi_kernels(unet, inverse=True) if ohwi else unet, float(metrics["loss"]))
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-6)
    start = jax.tree.leaves(params["unet"])
    for a, b, a0 in zip(*(jax.tree.leaves(out[k][0]) for k in (True, False)), start, strict=True):
        assert a.ndim != 4 or not np.array_equal(b, a0)  # every conv kernel moved
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vae_step_pins_gradients_to_the_same_step(setup):
    """The autoencoder's step pins its conv gradients too (the default on CPU and GPU):
    one layout constraint per 4-D gradient, the same parameters after two steps."""
    from jaxdiff.models.autoencoder import init_autoencoder
    from jaxdiff.train.vae_step import VAEStepConfig, make_vae_train_step

    vae_config = setup[0].vae
    params = {"vae": init_autoencoder(vae_config, jax.random.key(3))}
    pixels = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    cfg = VAEStepConfig()

    def two_steps(pin):
        labels = optim.trainable_labels(params, ("vae",))
        # The tests' FSDP threshold: the kernels are not packed into the small-leaf
        # vector, so each is pinned.
        tx = optim.make_optimizer(labels, optax.constant_schedule(1e-3), fsdp_min_size=MIN_SIZE)
        state = init_state(jax.tree.map(jnp.copy, params), tx, cfg, jax.random.key(0))
        with _grad_layout(pin):  # read when the step is traced
            step = jax.jit(make_vae_train_step(vae_config, cfg, tx))
            text = step.lower(state, {"pixels": pixels}, jax.random.key(1)).as_text()
            for _ in range(2):
                state, _ = step(state, {"pixels": pixels}, jax.random.key(1))
        return text, jax.device_get(state.params["vae"])

    plain_text, plain = two_steps(False)
    pinned_text, pinned = two_steps(None)
    kernels = [a for a in jax.tree.leaves(params) if a.ndim == 4 and a.size >= MIN_SIZE]
    assert pinned_text.count("LayoutConstraint") == len(kernels) > 0
    assert "LayoutConstraint" not in plain_text
    start = jax.device_get(params["vae"])
    for a, b, a0 in zip(
        jax.tree.leaves(pinned), jax.tree.leaves(plain), jax.tree.leaves(start), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(a, a0)
