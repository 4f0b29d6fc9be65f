"""The optimizer's own pieces: clipping that records the norm, small leaves packed.

``optim.clip_by_global_norm`` must clip as optax's does; ``optim.pack_small_leaves``
must give the updates the wrapped transformation gives leaf by leaf, whatever the
tree (masked branches of ``multi_transform``, two dtypes, leaves on both sides of the
threshold); ``make_optimizer`` packs by default and no more than FSDP replicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from jaxdiff import parallel
from jaxdiff.train import optim


def _tree(seed: int = 0) -> dict:
    """Params-like: two large kernels (a conv kernel of 2^14 elements or more, as the
    optimizer leaves unpacked), many small leaves, one of them bf16."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    normal = lambda shape, dtype=jnp.float32: jax.random.normal(next(keys), shape, dtype)  # noqa: E731
    return {
        "unet": {
            "conv": {"kernel": normal((3, 3, 32, 64)), "bias": normal((64,))},
            "norm": {"scale": normal((32,)), "bias": normal((32,))},
            "dense": {"kernel": normal((64, 300)), "bias": normal((300,))},
            "half": normal((24,), jnp.bfloat16),
        },
        "vae": {"w": normal((8, 8)), "big": normal((70, 70))},
    }


def _grads(tree: dict, scale: float, seed: int = 1) -> dict:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            (scale * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
            for k, a in zip(keys, leaves, strict=True)
        ],
    )


def _run(tx: optax.GradientTransformation, params: dict, steps: int = 3):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(steps):
        updates, state = update(_grads(params, 0.3 + i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_matches_optax_and_records_the_norm(scale):
    tree = _tree()["unet"]
    grads = _grads(tree, scale)
    ours = optim.clip_by_global_norm(1.0)
    clipped, state = ours.update(grads, ours.init(tree))
    expected, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-7)
    norm = float(optax.tree.norm(grads))
    assert (norm > 1.0) == (scale > 1.0)  # one case clips, the other does not
    assert float(state.grad_norm) == pytest.approx(norm, rel=1e-6)
    # None records the norm and lets the gradients through.
    same, state = optim.clip_by_global_norm(None).update(grads, state)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(grads), strict=True))
    assert float(state.grad_norm) == pytest.approx(norm, rel=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_by_global_norm(0.0)


def test_packed_leaves_take_the_per_leaf_steps():
    """Three AdamW steps with clipping (one clips) through `pack_small_leaves` inside a
    multi_transform with a frozen branch: the same params as leaf by leaf, two packed
    vectors (float32 and bfloat16) per moment, the frozen branch untouched."""
    params = _tree()
    labels = optim.trainable_labels(params, ("unet",))

    def tx(below):
        inner = optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-2))
        if below:
            inner = optim.pack_small_leaves(inner, below)
        return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)

    plain, plain_state = _run(tx(0), params)
    packed, packed_state = _run(tx(1000), params)
    for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(plain), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(packed["vae"]["big"], params["vae"]["big"])
    assert not np.array_equal(packed["unet"]["norm"]["scale"], params["unet"]["norm"]["scale"])

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(packed_state)]
    packed_paths = [p for p in paths if parallel.REPLICATED_KEY in p]
    # mu and nu, each one float32 and one bfloat16 vector.
    assert len(packed_paths) == 4
    assert any("float32" in p for p in packed_paths) and any("bfloat16" in p for p in packed_paths)
    small = [a for a in jax.tree.leaves(params["unet"]) if a.size < 1000]
    assert len(jax.tree.leaves(plain_state)) - len(jax.tree.leaves(packed_state)) == 2 * (
        len(small) - 2
    )
    with pytest.raises(ValueError, match="below"):
        optim.pack_small_leaves(optax.adamw(1e-2), 0)


def test_make_optimizer_packs_only_what_fsdp_replicates(monkeypatch):
    params = _tree()
    labels = optim.trainable_labels(params, ("unet",))

    def packed_sizes(**kw):
        state = optim.make_optimizer(labels, optax.constant_schedule(1e-3), **kw).init(params)
        return sorted(
            a.size
            for p, a in jax.tree_util.tree_leaves_with_path(state)
            if parallel.REPLICATED_KEY in jax.tree_util.keystr(p)
        )

    unet = jax.tree.leaves(params["unet"])
    f32_small = sum(a.size for a in unet if a.dtype == jnp.float32 and a.size < 2**14)
    # Default: every small leaf (mu and nu; the bf16 leaf in a vector of its own).
    assert packed_sizes() == sorted([24, 24, f32_small, f32_small])
    # A smaller FSDP threshold: the leaves it shards stay out of the vector.
    below_300 = sum(a.size for a in unet if a.dtype == jnp.float32 and a.size < 300)
    assert packed_sizes(fsdp_min_size=300) == sorted([24, 24, below_300, below_300])
    monkeypatch.setattr(optim, "_PACK_SMALL_BELOW", 0)
    assert packed_sizes() == []


def test_grad_norm_metric_is_the_clippings():
    params = _tree()["unet"]
    grads = _grads(params, 2.0)
    labels = optim.trainable_labels({"unet": params}, ("unet",))
    tx = optim.make_optimizer(labels, optax.constant_schedule(1e-3))
    _, state = tx.update({"unet": grads}, tx.init({"unet": params}), {"unet": params})
    recorded = optim.grad_norm_metric({"unet": grads}, state)
    assert float(recorded) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
    # Read from the state, not computed again from the gradients it is given.
    other = jax.tree.map(lambda g: 3.0 * g, {"unet": grads})
    assert float(optim.grad_norm_metric(other, state)) == float(recorded)
    # With accumulation the optimizer runs every k-th call: the micro-batch's own norm.
    tx2 = optim.make_optimizer(labels, optax.constant_schedule(1e-3), accumulation_steps=2)
    _, state2 = tx2.update({"unet": grads}, tx2.init({"unet": params}), {"unet": params})
    half = jax.tree.map(lambda g: 0.5 * g, grads)
    assert float(optim.grad_norm_metric({"unet": half}, state2)) == pytest.approx(
        0.5 * float(optax.tree.norm(grads)), rel=1e-6
    )


def test_param_shardings_keep_the_packed_vectors_replicated():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    tree = {
        "mu": {
            f"{parallel.REPLICATED_KEY}float32": jax.ShapeDtypeStruct((2**16,), jnp.float32),
            "large": [jax.ShapeDtypeStruct((64, 2**10), jnp.float32)],
        }
    }
    shardings = parallel.param_shardings(tree, mesh)
    assert shardings["mu"][f"{parallel.REPLICATED_KEY}float32"].spec == PartitionSpec()
    assert shardings["mu"]["large"][0].spec == PartitionSpec(None, parallel.FSDP_AXIS)


@pytest.mark.parametrize("after_clip", [True, False])
def test_layouts_pinned_after_the_clipping(monkeypatch, after_clip):
    """`make_optimizer` pins the conv-kernel gradients' layouts after the clipping's norm
    (`optim._PIN_AFTER_CLIP`), so that the norm reads them in the layout they come in;
    the other order is kept for the A/B. Both give the same updates."""
    monkeypatch.setattr(optim, "_GRAD_LAYOUT", True)
    monkeypatch.setattr(optim, "_PIN_AFTER_CLIP", after_clip)
    params = _tree()
    labels = optim.trainable_labels(params, ("unet",))
    tx = optim.make_optimizer(labels, optax.constant_schedule(1e-3))
    state = tx.init(params)
    grads = _grads(params, 5.0)
    text = jax.jit(tx.update).lower(grads, state, params).as_text()
    # The norm is the first reduction traced; the pin is one constraint per 4-D leaf.
    first_pin, first_reduce = text.index("LayoutConstraint"), text.index("stablehlo.reduce")
    assert (first_reduce < first_pin) == after_clip
    kernels = [a for a in jax.tree.leaves(params["unet"]) if a.ndim == 4]
    assert text.count("LayoutConstraint") == len(kernels) == 1
    updates, _ = jax.jit(tx.update)(grads, state, params)
    monkeypatch.setattr(optim, "_GRAD_LAYOUT", False)
    plain, _ = jax.jit(optim.make_optimizer(labels, optax.constant_schedule(1e-3)).update)(
        grads, state, params
    )
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bf16_first_moment():
    """``make_optimizer(mu_dtype=bf16)`` (config ``optimizer.mu_dtype``): every first
    moment, the packed one included, is bf16 and every second moment keeps its
    param's dtype; the steps
    stay those of the fp32 moments up to bf16's rounding of mu."""
    from jaxdiff.train import phases

    params = _tree()
    labels = optim.trainable_labels(params, ("unet",))
    sched = optax.constant_schedule(1e-2)
    ref, ref_state = _run(optim.make_optimizer(labels, sched), params)
    out, state = _run(optim.make_optimizer(labels, sched, mu_dtype=jnp.bfloat16), params)
    adam, ref_adam = (
        [s for s in jax.tree.leaves(t, is_leaf=_is_adam) if _is_adam(s)] for t in (state, ref_state)
    )
    assert adam and all(a.dtype == jnp.bfloat16 for s in adam for a in jax.tree.leaves(s.mu))
    # The second moments keep the params' dtypes (fp32 but for the one bf16 leaf's).
    nu = [a.dtype for s in adam for a in jax.tree.leaves(s.nu)]
    assert nu == [a.dtype for s in ref_adam for a in jax.tree.leaves(s.nu)]
    assert nu.count(jnp.float32) >= 2
    packed = [k for s in adam for k in s.mu if k.startswith(parallel.REPLICATED_KEY)]
    assert packed  # the small leaves' vector has a bf16 moment too
    for a, b, p in zip(
        jax.tree.leaves(out["unet"]), jax.tree.leaves(ref["unet"]), jax.tree.leaves(params["unet"])
    ):
        moved = np.max(np.abs(np.asarray(b, np.float32) - np.asarray(p, np.float32)))
        diff = np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
        assert moved > 0 and diff <= 0.02 * moved, (diff, moved)
    assert phases._mu_dtype({"mu_dtype": "bfloat16"}) == jnp.bfloat16
    assert phases._mu_dtype({}) is None  # the fp32 params' own dtype
    with pytest.raises(ValueError, match="mu_dtype"):
        phases._mu_dtype({"mu_dtype": "float16"})


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)
