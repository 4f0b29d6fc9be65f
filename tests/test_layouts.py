"""Compiler-chosen parameter layouts (jaxdiff.layouts) and the pipeline's use of them.

The CPU's compiler keeps the default layouts, so the tests also force a transposed
layout (the kind XLA picks for GPU convolution kernels) to show that arguments are
moved into the layouts the executable was built for and the numbers do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import layouts


def _reversed_formats(tree):
    """Every array of ``tree`` laid out with its dimensions in reverse order."""
    return jax.tree.map(
        lambda a: Format(Layout(major_to_minor=tuple(reversed(range(a.ndim)))), a.sharding), tree
    )


@pytest.fixture()
def matmul_args():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    w = jax.device_put(jnp.arange(12.0).reshape(3, 4), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.linspace(-1, 1, 24).reshape(8, 3), NamedSharding(mesh, P("data")))
    return {"w": w}, x


def _matmul(p, x):
    return x @ p["w"]


def test_compile_with_chosen_layouts_matches_plain_jit(matmul_args):
    params, x = matmul_args
    compiled, (placed, x2) = layouts.compile_with_layouts(_matmul, (params, x), (0,))
    assert x2 is x  # arguments without chosen layouts are passed through
    assert placed["w"].format == compiled.input_formats[0][0]["w"]
    np.testing.assert_array_equal(compiled(placed, x), jax.jit(_matmul)(params, x))


def test_given_formats_move_the_arguments_and_are_enforced(matmul_args):
    params, x = matmul_args
    forced = _reversed_formats(params)
    compiled, (placed, _) = layouts.compile_with_layouts(
        _matmul, (params, x), (0,), formats={0: forced}
    )
    assert placed["w"].format.layout.major_to_minor == (1, 0)
    assert layouts.layouts_differ(params, forced) == ["['w']"]
    assert layouts.layouts_differ(placed, forced) == []
    np.testing.assert_array_equal(placed["w"], params["w"])  # same values, other layout
    np.testing.assert_array_equal(compiled(placed, x), jax.jit(_matmul)(params, x))
    with pytest.raises(ValueError, match="layouts"):
        compiled(params, x)  # the default layout is refused, not silently misread


def test_layout_cache_compiles_later_keys_for_the_first_layouts(matmul_args, monkeypatch):
    params, x = matmul_args
    seen = []
    real = layouts.compile_with_layouts

    def recording(fn, args, argnums, *, formats=None, **kw):
        seen.append(formats)
        return real(fn, args, argnums, formats=formats, **kw)

    monkeypatch.setattr(layouts, "compile_with_layouts", recording)
    cache = layouts.LayoutCache(0)
    out, (params, _) = cache.call("a", _matmul, (params, x))
    out2, (params, _) = cache.call("a", _matmul, (params, x + 1))  # compiled once per key
    x4 = jax.device_put(x[:4], NamedSharding(x.sharding.mesh, P()))
    out3, _ = cache.call("b", _matmul, (params, x4))
    assert seen == [{}, {0: cache.formats}]
    w = np.asarray(params["w"])
    np.testing.assert_allclose(out3, np.asarray(x4) @ w, rtol=1e-6)
    np.testing.assert_allclose(out2, (np.asarray(x) + 1) @ w, rtol=1e-6)  # the new x was used


def test_layout_cache_reports_a_failure_once(matmul_args, monkeypatch):
    def refuse(*a, **k):
        raise NotImplementedError("no layouts here")

    monkeypatch.setattr(layouts, "compile_with_layouts", refuse)
    errors = []
    cache = layouts.LayoutCache(0, errors.append)
    assert cache.call("a", _matmul, matmul_args) is None
    assert cache.call("b", _matmul, matmul_args) is None
    assert errors == ["NotImplementedError: no layouts here"]


def test_a_donated_state_keeps_its_layouts_from_step_to_step():
    """A train step's state in and out with chosen layouts (PRNG keys and scalars keep
    their own), as the GPU benchmark's ``train_layouts`` experiment runs it."""

    def step(state, x):
        key, sub = jax.random.split(state["key"])
        w = state["w"] - 0.1 * x.T @ (x @ state["w"]) + 0.01 * jax.random.normal(sub, (3, 4))
        return {"w": w, "count": state["count"] + 1, "key": key}, jnp.sum(w)

    def fresh():
        return {"w": jnp.ones((3, 4)), "count": jnp.int32(0), "key": jax.random.key(0)}

    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    state = fresh()
    compiled, (state, _) = layouts.compile_with_layouts(
        step,
        (state, x),
        (0,),
        donate_argnums=(0,),
        out_shardings=(layouts.auto_formats(state), None),
    )
    assert (
        layouts.format_differences(compiled.output_formats[0], compiled.input_formats[0][0]) == []
    )
    plain, ref = jax.jit(step), fresh()
    for _ in range(3):
        state, total = compiled(state, x)
        ref, ref_total = plain(ref, x)
    np.testing.assert_allclose(state["w"], ref["w"], rtol=1e-6)
    assert int(state["count"]) == 3 and float(total) == pytest.approx(float(ref_total), rel=1e-6)
