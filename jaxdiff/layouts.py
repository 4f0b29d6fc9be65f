"""Parameters kept in the memory layouts the compiled program reads them in.

``jax.jit`` hands XLA its arguments in the default row-major layout and XLA picks
the layout of everything else. On GPU, cuDNN's NHWC convolutions read their kernels
as [out, h, w, in], while Flax stores them [h, w, in, out]: every call of an SD 1.5
UNet starts with 98 kernel transposes (1.1 ms of a 36.5 ms batch-16 forward on an
H200). Compiling with ``Layout.AUTO`` for the
parameters lets XLA choose their layouts as it does for intermediates; moving the
parameters into those layouts once takes the transposes out of every later call.

:func:`compile_with_layouts` does that for any function; :class:`LayoutCache` keeps
the layouts the first compile chose and gives them to later compiles (other shapes,
other samplers) so one copy of the parameters serves them all;
:class:`~jaxdiff.pipeline.StableDiffusion` uses it with ``param_layouts=True``. Off by
default: see ``AUTO_BACKENDS`` for what an H200 showed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.layout import Format, Layout, with_layout_constraint

# Where the pipeline lets XLA pick the parameters' layouts by default: none. On an
# H200 (session 9) XLA moved the UNet's 98 conv kernels to [out, h, w, in] and the
# per-call transposes (1.1 ms of GPU time) went away, but the wall time of a UNet call
# did not drop (b2 10.4 vs 10.3 ms, b16 36.5 vs 35.5 ms, in different processes), the
# sampler's compile was slower (29.8 vs 19.9 s, different runs) and cuDNN failed to
# record a convolution into a CUDA graph with the command-buffer flag set. The CPU's
# preferred layouts are the default ones; TPUs are untested here.
AUTO_BACKENDS: tuple[str, ...] = ()


def _arg_shardings(arg: Any) -> Any:
    """The shardings of ``arg``'s arrays (None for host values: jit places them)."""
    return jax.tree.map(lambda a: a.sharding if isinstance(a, jax.Array) else None, arg)


def _is_key(a: Any) -> bool:
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def auto_formats(arg: Any) -> Any:
    """``Layout.AUTO`` for every array of ``arg`` with two or more dimensions, each on
    its current sharding; smaller ones (scalars, biases, PRNG keys) keep their own
    layout."""

    def one(a):
        if not isinstance(a, jax.Array):
            raise TypeError(
                f"arguments given compiler-chosen layouts must be jax arrays; got {type(a)}"
            )
        if a.ndim < 2 or _is_key(a):
            return a.sharding
        return Format(Layout.AUTO, a.sharding)

    return jax.tree.map(one, arg)


def compile_with_layouts(
    fn: Callable,
    args: Sequence[Any],
    layout_argnums: Sequence[int],
    *,
    formats: dict[int, Any] | None = None,
    donate_argnums: Sequence[int] = (),
    out_shardings: Any = None,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Any, tuple]:
    """Compile ``fn(*args)`` with the arguments in ``layout_argnums`` in layouts XLA
    picks, and move those arguments into them.

    Args:
      fn: the function (not jitted; static choices bound with ``functools.partial``).
      args: example arguments, jax arrays where a layout is chosen; the others keep
        their own shardings.
      layout_argnums: which arguments get compiler-chosen layouts.
      formats: ``{argnum: formats pytree}`` to use instead of ``Layout.AUTO`` for some
        of ``layout_argnums`` (layouts an earlier compile chose, see
        :class:`LayoutCache`).
      donate_argnums: as ``jax.jit``'s.
      out_shardings: as ``jax.jit``'s; formats from :func:`auto_formats` let XLA lay
        out outputs too (a train state that comes back as the next step's input).
      compiler_options: XLA options, as ``jax.jit``'s.

    Returns:
      ``(compiled, args)``: the executable (call it with arguments in the same layouts:
      ``compiled.input_formats``) and ``args`` with the ``layout_argnums`` ones moved
      into the chosen layouts (a no-op for arrays already in them).
    """
    formats = formats or {}
    in_shardings = tuple(
        (formats[i] if i in formats else auto_formats(a))
        if i in layout_argnums
        else _arg_shardings(a)
        for i, a in enumerate(args)
    )
    jit_kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    if compiler_options:
        jit_kwargs["compiler_options"] = dict(compiler_options)
    jitted = jax.jit(
        fn,
        in_shardings=in_shardings,
        donate_argnums=tuple(donate_argnums),
        **jit_kwargs,
    )
    # Lowered from shapes: a concrete array's own (default) layout would clash with AUTO.
    specs = tuple(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), a)
        if i in layout_argnums
        else a
        for i, a in enumerate(args)
    )
    compiled = jitted.lower(*specs).compile()
    chosen = compiled.input_formats[0]
    placed = tuple(
        jax.tree.map(lambda a, f: a if _is_key(a) else jax.device_put(a, f), a, chosen[i])
        if i in layout_argnums
        else a
        for i, a in enumerate(args)
    )
    return compiled, placed


def format_differences(have: Any, want: Any) -> list[str]:
    """Paths where two pytrees of formats (``array.format``, an executable's
    ``input_formats`` / ``output_formats``) lay an array out differently."""
    diffs = []
    for (path, h), w in zip(
        jax.tree_util.tree_flatten_with_path(have)[0], jax.tree.leaves(want), strict=True
    ):
        a, b = h.layout, w.layout
        if a is None or b is None:
            continue
        # A layout written by hand leaves its tiling None ("any"); an array's is concrete.
        tiling_differs = a.tiling is not None and b.tiling is not None and a.tiling != b.tiling
        if a.major_to_minor != b.major_to_minor or tiling_differs:
            diffs.append(jax.tree_util.keystr(path))
    return diffs


def layouts_differ(arg: Any, formats: Any) -> list[str]:
    """Paths of ``arg``'s arrays whose layout is not the one in ``formats`` (to check
    that parameters are where an executable wants them)."""
    return format_differences(jax.tree.map(lambda a: a.format, arg), formats)


class LayoutCache:
    """Compiled executables of one function whose argument ``argnum`` (the
    parameters) stays in the layouts its first compile chose.

    The first :meth:`compile` lets XLA pick the parameters' layouts and moves them
    there; later ones (new shapes or static choices) are compiled for those same
    layouts, so the parameters are never copied twice. If compiling with chosen
    layouts fails (a backend without layout support), ``fallback`` (a warning
    callback) gets the error and :meth:`call` returns None from then on.
    ``compiler_options`` (XLA options, as ``jax.jit``'s) go to every compile.
    """

    def __init__(
        self,
        argnum: int = 0,
        fallback: Callable[[str], None] | None = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.argnum = argnum
        self.compiler_options = dict(compiler_options or {})
        self.formats: Any = None  # the parameters' formats, once chosen
        self.failed: str | None = None
        self._fallback = fallback
        self._compiled: dict[Any, Any] = {}

    def call(self, key: Any, fn: Callable, args: tuple) -> tuple[Any, tuple] | None:
        """``(fn(*args), args)``, compiling for ``key`` (which must determine ``fn``
        and the arguments' shapes, dtypes and shardings) on first use; the returned
        ``args`` hold the parameters in their chosen layouts (keep those). None once
        compiling with chosen layouts has failed: the caller runs its plain jit."""
        args = self.compile(key, fn, args)
        if args is None:
            return None
        return self._compiled[key](*args), args

    def compile(self, key: Any, fn: Callable, args: tuple) -> tuple | None:
        """What :meth:`call` does before running: compile for ``key`` unless done, and
        return ``args`` with the parameters in their chosen layouts (None once
        compiling with chosen layouts has failed)."""
        if self.failed is None and key not in self._compiled:
            try:
                known = {} if self.formats is None else {self.argnum: self.formats}
                compiled, args = compile_with_layouts(
                    fn,
                    args,
                    (self.argnum,),
                    formats=known,
                    compiler_options=self.compiler_options,
                )
            except Exception as e:  # noqa: BLE001 - any backend refusal: plain jit instead
                self.failed = f"{type(e).__name__}: {e}"
                if self._fallback is not None:
                    self._fallback(self.failed)
            else:
                self._compiled[key] = compiled
                if self.formats is None:
                    self.formats = compiled.input_formats[0][self.argnum]
        if self.failed is not None:
            return None
        return args

    def executable(self, key: Any) -> Any:
        """The executable compiled for ``key``, or None (not compiled yet, or failed)."""
        return self._compiled.get(key)


def default_layouts(tree: Any, ndim: int = 4) -> Any:
    """``tree`` with each ``ndim``-dimensional leaf pinned to the default row-major
    layout (``jax.experimental.layout.with_layout_constraint``; values unchanged), for
    use inside a jitted function: XLA transposes such a value where it is pinned
    rather than carrying another layout into its consumers (the train step's conv
    gradients, ``train.optim._GRAD_LAYOUT``)."""

    def pin(a):
        if a.ndim != ndim:
            return a
        return with_layout_constraint(a, Layout(tuple(range(a.ndim))))

    return jax.tree.map(pin, tree)
