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
from jaxdiff.train import optim
from jaxdiff.train import step as train_step_module
from jaxdiff.train.step import init_state, make_train_step


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


def _two_steps(setup):
    """(lowered text, UNet params after two steps, last loss, optimizer state leaves)."""
    config, params, batch, mesh = setup
    # The optimizer is built here, after any switch is set (make_optimizer reads it).
    tx, step_cfg = gpu.train_setup(params["unet"], jnp.bfloat16)
    fresh = jax.tree.map(jnp.copy, params)  # (the step donates the state)
    state = init_state(fresh, tx, step_cfg, jax.random.key(0))
    state = jax.device_put(state, parallel.param_shardings(state, mesh, min_size=64))
    step = jax.jit(make_train_step(config, step_cfg, tx), donate_argnums=0)
    text = step.lower(state, batch, jax.random.key(1)).as_text()
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(1))
    leaves = len(jax.tree.leaves(state.opt_state))
    return text, jax.device_get(state.params["unet"]), float(metrics["loss"]), leaves


@contextlib.contextmanager
def _grad_layout(pin):
    """``train.step._GRAD_LAYOUT`` set to ``pin`` (steps built inside read it)."""
    saved = train_step_module._GRAD_LAYOUT
    train_step_module._GRAD_LAYOUT = pin
    try:
        yield
    finally:
        train_step_module._GRAD_LAYOUT = saved


@pytest.fixture(scope="module")
def default_run(setup):
    """The plain step: gradients in whatever layout XLA picks."""
    with _grad_layout(False):
        return _two_steps(setup)


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


def test_conv_gradients_pinned_to_default_layouts(setup, default_run):
    """``train.step._GRAD_LAYOUT`` (the default on CPU and GPU): one layout constraint
    per 4-D gradient, same step as the plain one."""
    tree = {"k": jnp.arange(72.0).reshape(3, 3, 2, 4), "b": jnp.ones(4)}
    pinned = jax.jit(layouts.default_layouts)(tree)
    assert set(pinned) == {"k", "b"}
    for name in tree:  # values unchanged
        np.testing.assert_array_equal(pinned[name], tree[name])
    # Only the 4-D leaf is pinned.
    assert jax.jit(layouts.default_layouts).lower(tree).as_text().count("LayoutConstraint") == 1
    assert train_step_module._GRAD_LAYOUT is None  # the library's default: by backend
    assert jax.default_backend() == "cpu" and train_step_module._pin_grad_layouts()
    run = _two_steps(setup)
    kernels = [a for a in jax.tree.leaves(default_run[1]) if a.ndim == 4]
    assert run[0].count("LayoutConstraint") == len(kernels) > 0
    assert "LayoutConstraint" not in default_run[0]
    _assert_same_step(setup, run, default_run, rtol=1e-6)


def test_flat_optimizer(setup, default_run, monkeypatch):
    """``train.optim._FLAT_OPTIMIZER``: clipping and AdamW over one flat vector, same
    step up to the order of the global norm's sum, far fewer optimizer-state arrays."""
    monkeypatch.setattr(optim, "_FLAT_OPTIMIZER", True)
    run = _two_steps(setup)
    assert run[3] < default_run[3] // 10, (run[3], default_run[3])
    _assert_same_step(setup, run, default_run, rtol=2e-5)


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
        tx = optim.make_optimizer(labels, optax.constant_schedule(1e-3))
        state = init_state(jax.tree.map(jnp.copy, params), tx, cfg, jax.random.key(0))
        with _grad_layout(pin):  # read when the step is traced
            step = jax.jit(make_vae_train_step(vae_config, cfg, tx))
            text = step.lower(state, {"pixels": pixels}, jax.random.key(1)).as_text()
            for _ in range(2):
                state, _ = step(state, {"pixels": pixels}, jax.random.key(1))
        return text, jax.device_get(state.params["vae"])

    plain_text, plain = two_steps(False)
    pinned_text, pinned = two_steps(None)
    kernels = [a for a in jax.tree.leaves(params) if a.ndim == 4]
    assert pinned_text.count("LayoutConstraint") == len(kernels) > 0
    assert "LayoutConstraint" not in plain_text
    start = jax.device_get(params["vae"])
    for a, b, a0 in zip(
        jax.tree.leaves(pinned), jax.tree.leaves(plain), jax.tree.leaves(start), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(a, a0)
