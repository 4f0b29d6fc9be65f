"""UNet parity with diffusers' PyTorch UNet2DConditionModel at tiny random configs.

Reference outputs come from diffusers itself (seeded random weights), never
from stored numbers. Layout transposes (NCHW <-> NHWC) happen only here.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.models.downsampling import Downsample2D as TorchDownsample2D  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D  # noqa: E402

from jaxdiff.models import attention as attention_mod  # noqa: E402
from jaxdiff.models import unet as unet_mod  # noqa: E402
from jaxdiff.models.attention import (  # noqa: E402
    CROSS_KV,
    MERGED,
    cross_attention_kv,
    dot_product_attention,
)
from jaxdiff.models.layers import (  # noqa: E402
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv_general_dilated,
    timestep_embedding,
)
from jaxdiff.models.sd import apply_unet  # noqa: E402
from jaxdiff.models.unet import (  # noqa: E402
    UNet2DConditionModel,
    UNetConfig,
    fuse_projections,
    init_unet,
    merged_weights,
    ohwi_kernels,
    unet_abstract_params,
)
from jaxdiff.weights.common import (  # noqa: E402
    WeightsMismatchError,
    params_to_state_dict,
    state_dict_to_params,
)

TOL = 1e-4
# XLA CPU options that halve compile time; used where a test checks math
# equivalence (remat), not the optimised code users run.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Tiny diffusers configs. GroupNorm groups must divide every channel count,
# including the up path's concatenations (32 + 64 = 96 etc.).
CONFIGS = {
    # SD 1.x shape: conv projections, attention_head_dim an int (= heads).
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=16,
    ),
    # SD 2.x shape: linear projections, per-block heads, upcast attention,
    # three levels, two transformer blocks per spatial transformer.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4, 8],
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
        cross_attention_dim=48,
        transformer_layers_per_block=2,
        norm_num_groups=8,
        sample_size=16,
    ),
    # Inpainting input (9 channels), the other timestep-feature convention,
    # and an odd latent size that exercises the up path's resize-to-skip.
    "inpaint9": dict(
        in_channels=9,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=32,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_num_groups=8,
        sample_size=9,
    ),
}
# (H, W, context length, timesteps) per config.
INPUTS = {
    "sd1": (16, 16, 7, np.array([10, 999], np.int64)),
    "sd2": (16, 16, 5, np.array([0.5, 750.25], np.float32)),
    "inpaint9": (9, 11, 6, 500.5),  # a Python float scalar
}


def _torch_unet(name: str | dict, seed: int = 0):
    """diffusers' UNet for ``CONFIGS[name]`` (or a config dict), every tensor random."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.UNet2DConditionModel(**(CONFIGS[name] if isinstance(name, str) else name))
    model.eval()
    # Default init zeroes some output convs; randomise every tensor so that a
    # wrongly routed weight cannot hide behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _numpy_state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def torch_unets():
    return {name: _torch_unet(name) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name, torch_unets):
    tm = torch_unets[name]
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    sd = _numpy_state_dict(tm)
    params = state_dict_to_params(sd, unet_abstract_params(cfg), what=name)

    h, w, seq, t = INPUTS[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((2, seq, cfg.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        t_torch = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
        ref = tm(torch.from_numpy(x), t_torch, torch.from_numpy(ctx)).sample.numpy()

    model = UNet2DConditionModel(cfg)
    out = jax.jit(model.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape == (2, cfg.out_channels, h, w)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n[{name}] max|diff| = {diff:.3g}  (max|ref| = {np.max(np.abs(ref)):.3g})")
    assert diff <= TOL

    # Export: back to exactly the torch state dict, key for key, bit for bit.
    back = params_to_state_dict(params)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    # The exported config rebuilds the same architecture in diffusers.
    exported = cfg.to_diffusers()
    assert UNetConfig.from_diffusers(exported) == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = diffusers.UNet2DConditionModel(**exported)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in tm.state_dict().items()
    }


# A down path that starts without cross-attention (as SDXL's): the shared sample
# then stays at its own batch through a whole level, skips included.
_PLAIN_FIRST = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
)


def _tiled_reference(tm, x: np.ndarray, t, ctx: np.ndarray, k: int) -> np.ndarray:
    """diffusers' output for the sample x (NCHW) tiled k times with its timesteps:
    classifier-free guidance's batch for k = 2."""
    with torch.no_grad():
        return tm(
            torch.from_numpy(np.tile(x, (k, 1, 1, 1))),
            torch.from_numpy(np.tile(t, k)),
            torch.from_numpy(ctx),
        ).sample.numpy()


@pytest.mark.parametrize("case", ["sd1", "plain_first"])
def test_sample_shared_by_contexts_matches_tiled_reference(case, torch_unets):
    # encoder_hidden_states with k times the sample's batch: the output must be the
    # reference's for the sample tiled k times ([x; x; ...], classifier-free guidance's
    # layout), although jaxdiff runs the layers before the first cross-attention once.
    if case == "sd1":
        tm, b, k, (h, w, seq, _) = torch_unets["sd1"], 2, 2, INPUTS["sd1"]
    else:
        tm, b, k, (h, w, seq) = _torch_unet(_PLAIN_FIRST, seed=3), 1, 3, (8, 8, 5)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = state_dict_to_params(_numpy_state_dict(tm), unet_abstract_params(cfg))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((k * b, seq, cfg.cross_attention_dim)).astype(np.float32)
    t = np.array([20, 640][:b], np.int64)
    ref = _tiled_reference(tm, x, t, ctx, k)

    model = UNet2DConditionModel(cfg)
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape == (k * b, cfg.out_channels, h, w)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n[{case} shared by {k}] max|diff| = {diff:.3g} (max|ref| = {np.abs(ref).max():.3g})")
    assert diff <= TOL
    # The k outputs differ (each context is read), and equal the tiled call's.
    assert float(np.max(np.abs(out[:b] - out[b : 2 * b]))) > 1e-3
    x_tiled = np.tile(x, (k, 1, 1, 1)).transpose(0, 2, 3, 1)
    tiled = apply({"params": params}, x_tiled, np.tile(t, k), ctx)
    np.testing.assert_allclose(out, np.asarray(tiled).transpose(0, 3, 1, 2), rtol=0, atol=1e-5)


def _precomputed_case(tm, name: str, k: int, seed: int):
    """diffusers' UNet ``tm`` as params, with inputs (a sample shared by k contexts)
    and the reference output: for the UNet given precomputed variables."""
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = state_dict_to_params(_numpy_state_dict(tm), unet_abstract_params(cfg))
    h, w, seq, t = INPUTS[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((k * 2, seq, cfg.cross_attention_dim)).astype(np.float32)
    return cfg, params, x, t, ctx, _tiled_reference(tm, x, t, ctx, k)


def _check_precomputed(cfg, params, x, t, ctx, ref, collection: str, values, label: str):
    """The UNet given ``values`` as its ``collection`` variables matches the reference
    and the plain call. Returns (the plain call, the call with them), both of
    ``(values, x)`` with x NHWC."""
    model = UNet2DConditionModel(cfg)
    xh = x.transpose(0, 2, 3, 1)
    plain = lambda _, x: model.apply({"params": params}, x, t, ctx)  # noqa: E731
    given = lambda v, x: model.apply({"params": params, collection: v}, x, t, ctx)  # noqa: E731
    out = np.asarray(jax.jit(given)(values, xh)).transpose(0, 3, 1, 2)
    without = np.asarray(jax.jit(plain)(values, xh)).transpose(0, 3, 1, 2)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n[{label}] max|diff| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(out, without, rtol=0, atol=1e-5)
    return plain, given


def _dots(fn, *args) -> int:
    # Matmuls in fn's jaxpr, traced afresh (a new function: no cached trace).
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("dot_general")


@pytest.mark.parametrize("name, k", [("sd2", 1), ("sd1", 2)])
def test_precomputed_cross_kv_matches_diffusers(name, k, torch_unets):
    # The cross-attentions' keys and values computed once outside the UNet (as the
    # pipeline does for its sampling loop): the reference's output, the plain call's
    # numbers, and no to_k/to_v matmul left in the call.
    tm = torch_unets[name]
    cfg, params, x, t, ctx, ref = _precomputed_case(tm, name, k, 11)
    kv = jax.jit(cross_attention_kv)(params, ctx)

    # One {"k", "v"} per cross-attention, where its params are.
    def keys(tree):
        return [tuple(e.key for e in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]

    want = {p[: p.index("attn2") + 1] for p in keys(params) if "attn2" in p}
    assert sorted(keys(kv)) == sorted(p + (kind,) for p in want for kind in "kv")
    assert len(want) == sum(n.endswith(".attn2") for n, _ in tm.named_modules())

    label = f"{name} precomputed K/V"
    plain, with_kv = _check_precomputed(cfg, params, x, t, ctx, ref, CROSS_KV, kv, label)
    xh = x.transpose(0, 2, 3, 1)
    assert _dots(with_kv, kv, xh) == _dots(plain, kv, xh) - 2 * len(want)

    # Keys of another context's length are refused by name.
    short = jax.tree.map(lambda a: a[:, :-1], kv)
    with pytest.raises(ValueError, match="attn2: precomputed keys"):
        with_kv(short, xh)


@pytest.mark.parametrize("name, k", [("sd2", 1), ("sd1", 2)])
def test_merged_weights_match_diffusers(name, k, torch_unets, monkeypatch):
    # The self-attentions' q/k/v and the resnets' time-embedding projections from
    # weights joined once outside the UNet (as the pipeline does for its sampling
    # loop): the reference's output, the plain call's numbers, fewer matmuls.
    tm = torch_unets[name]
    cfg, params, x, t, ctx, ref = _precomputed_case(tm, name, k, 12)
    merged = jax.jit(merged_weights, static_argnums=1)(params, cfg)
    n_self = sum(n.endswith(".attn1") for n, _ in tm.named_modules())
    n_resnets = sum(n.endswith(".time_emb_proj") for n, _ in tm.named_modules())
    assert n_self > 0 and n_resnets > 1
    joined = jax.tree_util.tree_leaves_with_path(merged)
    assert sum(jax.tree_util.keystr(p).endswith("['attn1']['qkv_kernel']") for p, _ in joined) == (
        n_self
    )
    widths = [m.out_features for n, m in tm.named_modules() if n.endswith(".time_emb_proj")]
    assert merged["time_emb_kernel"].shape == (cfg.time_embed_dim, sum(widths))
    assert merged["time_emb_bias"].shape == (sum(widths),)

    label = f"{name} merged weights"
    plain, with_merged = _check_precomputed(cfg, params, x, t, ctx, ref, MERGED, merged, label)
    xh = x.transpose(0, 2, 3, 1)
    n_dots = _dots(plain, merged, xh)
    assert _dots(with_merged, merged, xh) == n_dots - 2 * n_self - (n_resnets - 1)
    # Self-attention products above the size limit stay three matmuls.
    monkeypatch.setattr(attention_mod, "_MERGED_QKV_MAX_BYTES", 0)
    assert _dots(with_merged, merged, xh) == n_dots - (n_resnets - 1)

    # Joined weights that do not fit are refused by name.
    bad = dict(merged, time_emb_kernel=merged["time_emb_kernel"][:, :-1])
    with pytest.raises(ValueError, match="merged time-embedding kernel"):
        with_merged(bad, xh)
    monkeypatch.undo()
    bad = jax.tree_util.tree_map_with_path(
        lambda p, a: a[:-1] if jax.tree_util.keystr(p).endswith("['qkv_kernel']") else a, merged
    )
    with pytest.raises(ValueError, match="attn1: merged q/k/v kernel"):
        with_merged(bad, xh)


@pytest.mark.parametrize("name, k", [("sd2", 1), ("sd1", 2)])
def test_fused_projections_match_diffusers(name, k, torch_unets, monkeypatch):
    # fuse_projections: the params without the projections the merged weights replace
    # (q/k/v, the cross-attentions' k/v as one product of the context, the resnets'
    # time embeddings) give the reference's output through apply_unet, with fewer
    # arrays and matmuls, also where a self-attention is too large to merge.
    tm = torch_unets[name]
    cfg, params, x, t, ctx, ref = _precomputed_case(tm, name, k, 13)
    fused, merged = jax.jit(fuse_projections, static_argnums=1)(params, cfg)
    names = [m for m, _ in tm.named_modules()]
    n_self, n_cross = (sum(m.endswith(a) for m in names) for a in (".attn1", ".attn2"))
    n_resnets = sum(m.endswith(".time_emb_proj") for m in names)
    assert n_self > 0 and n_cross > 1 and n_resnets > 1

    def paths(tree):
        return [jax.tree_util.keystr(q) for q, _ in jax.tree_util.tree_leaves_with_path(tree)]

    gone = sorted(set(paths(params)) - set(paths(fused)))
    assert set(paths(fused)) < set(paths(params))
    kernels = [g for g in gone if g.endswith("['kernel']")]
    assert len(kernels) == 3 * n_self + 2 * n_cross + n_resnets
    assert all(
        any(
            f"['{a}']['{b}']" in g
            for a, b in [
                ("attn1", "to_q"),
                ("attn1", "to_k"),
                ("attn1", "to_v"),
                ("attn2", "to_k"),
                ("attn2", "to_v"),
            ]
        )
        or "['time_emb_proj']" in g
        for g in gone
    )
    width = sum(
        m.to_k.out_features + m.to_v.out_features
        for n, m in tm.named_modules()
        if n.endswith(".attn2")
    )
    assert merged["cross_kv"]["kernel"].shape == (cfg.cross_attention_dim, width)

    sd = type("SD", (), {"unet": cfg})
    xh = x.transpose(0, 2, 3, 1)
    plain = lambda p, m, x: apply_unet(p, x, t, ctx, sd)  # noqa: E731
    given = lambda p, m, x: apply_unet(p, x, t, ctx, sd, merged=m)  # noqa: E731
    want = np.asarray(jax.jit(plain)(params, None, xh)).transpose(0, 3, 1, 2)
    out = np.asarray(jax.jit(given)(fused, merged, xh)).transpose(0, 3, 1, 2)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n[{name} fused projections] max|diff| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    # Params whose dicts come in another key order (jit rebuilds them sorted, so this
    # runs eagerly) split the joined keys and values the same way.
    split = cross_attention_kv(_reverse_keys(fused), ctx, joined=merged["cross_kv"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
        split,
        cross_attention_kv(params, ctx),
    )
    n_dots = _dots(plain, params, None, xh)
    fewer = 2 * n_self + (n_resnets - 1) + (2 * n_cross - 1)
    assert _dots(given, fused, merged, xh) == n_dots - fewer
    # Too large to merge: three products of the joined kernel's columns.
    monkeypatch.setattr(attention_mod, "_MERGED_QKV_MAX_BYTES", 0)
    out = jax.jit(lambda *a: given(*a))(fused, merged, xh)  # (traced afresh)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    assert _dots(given, fused, merged, xh) == n_dots - fewer + 2 * n_self
    monkeypatch.undo()

    # The full-resolution resnets' time-embedding offsets held apart (from a size on):
    # an optimization barrier in the program, the same numbers.
    def barriers():
        return str(jax.make_jaxpr(lambda *a: given(*a))(fused, merged, xh)).count(
            "optimization_barrier"
        )

    n_barriers = barriers()
    monkeypatch.setattr(unet_mod, "_TEMB_APART_POSITIONS", 1)
    assert barriers() == n_barriers + 1
    out = jax.jit(lambda *a: given(*a))(fused, merged, xh)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want, rtol=0, atol=1e-5)
    monkeypatch.undo()

    # A joined cross-attention kernel that does not fit is refused by name.
    bad = dict(merged, cross_kv={"kernel": merged["cross_kv"]["kernel"][:, :-2]})
    with pytest.raises(ValueError, match="cross_attention_kv: joined kernel"):
        given(fused, bad, xh)


def test_ohwi_kernels_same_numbers(torch_unets):
    # Convolution kernels kept in cuDNN's [O, H, W, I] and turned back inside the call:
    # every 4-D kernel (and nothing else) permuted, the inverse exact, and the same
    # output as Flax's order, with plain and with fused projections.
    tm = torch_unets["sd1"]
    cfg, params, x, t, ctx, ref = _precomputed_case(tm, "sd1", 2, 14)
    laid = ohwi_kernels(params)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(laid), strict=True)
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in tm.modules())
    seen = 0
    for a, b in pairs:
        if a.ndim == 4:
            seen += 1
            assert b.shape == (a.shape[3], *a.shape[:3])
            np.testing.assert_array_equal(np.asarray(b), np.transpose(np.asarray(a), (3, 0, 1, 2)))
        else:
            assert b is a
    assert seen == n_conv
    back = ohwi_kernels(laid, inverse=True)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    sd = type("SD", (), {"unet": cfg})
    xh = x.transpose(0, 2, 3, 1)
    call = jax.jit(
        lambda p, m, x, o: apply_unet(p, x, t, ctx, sd, merged=m, ohwi_kernels=o),
        static_argnums=3,
    )
    want = np.asarray(call(params, None, xh, False))
    np.testing.assert_allclose(np.asarray(call(laid, None, xh, True)), want, rtol=0, atol=1e-6)
    fused, merged = fuse_projections(params, cfg)
    out = np.asarray(call(ohwi_kernels(fused), merged, xh, True)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, want.transpose(0, 3, 1, 2), rtol=0, atol=1e-5)
    assert float(np.max(np.abs(out - ref))) <= TOL


def _reverse_keys(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _reverse_keys(tree[k]) for k in reversed(list(tree))}


def test_bf16_compute_tracks_fp32_reference(torch_unets):
    # SD 2.x-like (upcast attention, linear projections) in bf16 compute with
    # fp32 params: finite, and within bf16's few-percent of the fp32 reference.
    tm = torch_unets["sd2"]
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = state_dict_to_params(_numpy_state_dict(tm), unet_abstract_params(cfg))
    h, w, seq, t = INPUTS["sd2"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((2, seq, cfg.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    model = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
    assert np.all(np.isfinite(out))
    rel_rms = float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref**2)))
    print(f"\n[sd2 bf16] relative RMS error = {rel_rms:.3g}")
    assert rel_rms < 0.03


# Released configs (unet/config.json of stable-diffusion-inpainting, SD 1.x with
# 9 input channels, and stable-diffusion-2-1), private keys included.
_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
RELEASED = {
    "sd15-inpainting": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": _SD_DOWN,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 9,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": _SD_UP,
    },
    "sd21": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "cross_attention_dim": 1024,
        "down_block_types": _SD_DOWN,
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "resnet_time_scale_shift": "default",
        "sample_size": 96,
        "up_block_types": _SD_UP,
        "upcast_attention": True,
        "use_linear_projection": True,
    },
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_load_full_size_state_dicts(name):
    # Full-size shapes without allocating: diffusers on torch's meta device,
    # zero-stride numpy views standing in for the tensors.
    config = RELEASED[name]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = diffusers.UNet2DConditionModel.from_config(config)
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in tm.state_dict().items()}
    cfg = UNetConfig.from_diffusers(config)
    params = state_dict_to_params(sd, unet_abstract_params(cfg), what=name)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n_params == sum(int(np.prod(v.shape)) for v in sd.values())
    assert n_params > 8.5e8  # the ~860M-parameter UNet of SD 1.x / 2.x
    heads = cfg.num_heads
    assert heads == ((8,) * 4 if name.startswith("sd15") else (5, 10, 20, 20))


def test_wrong_checkpoint_lists_every_problem(torch_unets):
    cfg = UNetConfig.from_diffusers(dict(torch_unets["sd1"].config))
    abstract = unet_abstract_params(cfg)
    sd = _numpy_state_dict(torch_unets["sd1"])
    del sd["conv_in.bias"]
    sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    sd["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    with pytest.raises(WeightsMismatchError) as e:
        state_dict_to_params(sd, abstract)
    # (common.py also lists a mis-shaped key under missing, since it did not load.)
    assert "conv_in.bias" in e.value.missing
    assert e.value.unexpected == ["down_blocks.0.resnets.0.extra.weight"]
    assert [m[0] for m in e.value.misshaped] == ["conv_out.weight"]
    assert "conv_in.bias" in str(e.value) and "conv_out.weight" in str(e.value)

    # Another architecture's checkpoint is rejected as a whole, not half-loaded.
    with pytest.raises(WeightsMismatchError) as e:
        state_dict_to_params(_numpy_state_dict(torch_unets["sd2"]), abstract)
    assert e.value.missing and e.value.unexpected and e.value.misshaped


@pytest.mark.parametrize(
    "change, match",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"dual_cross_attention": True}, "dual_cross_attention"),
        ({"only_cross_attention": [True, False]}, "only_cross_attention"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"mid_block_type": None}, "mid_block_type"),
        ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "AttnDownBlock2D"),
        ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),
        ({"attention_head_dim": [8, 8, 8]}, "attention_head_dim"),
        ({"norm_num_groups": 7}, "norm_num_groups"),
        ({"some_future_flag": 1}, "some_future_flag"),
    ],
)
def test_from_diffusers_rejects_unsupported(change, match):
    base = {"_class_name": "UNet2DConditionModel", **CONFIGS["sd1"]}
    UNetConfig.from_diffusers(base)  # the base is fine
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers({**base, **change})


def test_from_diffusers_heads_and_defaults():
    # SD 1.x: an int attention_head_dim is the head count of every block.
    cfg = UNetConfig.from_diffusers({"attention_head_dim": 8, "cross_attention_dim": 768})
    assert cfg.num_heads == (8, 8, 8, 8)
    assert cfg.block_out_channels == (320, 640, 1280, 1280)
    # SD 2.x: a list is per block; missing keys take diffusers' defaults.
    cfg = UNetConfig.from_diffusers({"attention_head_dim": [5, 10, 20, 20]})
    assert cfg.num_heads == (5, 10, 20, 20)
    assert cfg.cross_attention_dim == 1280
    # Values equal to the default are accepted, also as per-block lists.
    UNetConfig.from_diffusers({"only_cross_attention": [False] * 4, "mid_block_scale_factor": 1.0})


def test_timestep_embedding_matches_diffusers():
    t = np.array([0, 1, 17, 500, 999.5], np.float32)
    for dim, flip, shift in [(32, True, 0), (32, False, 1), (33, True, 1), (8, False, 0)]:
        ref = get_timestep_embedding(
            torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
        ).numpy()
        out = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift))
        assert out.shape == ref.shape == (5, dim)
        np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)  # sin/cos of ~1e3 in fp32


def _apply(module, torch_module, x, **static):
    """Load a diffusers module's weights into ours and apply it (``static`` kwargs untraced)."""
    fn = lambda m, *a: m(*a, **static)
    sd = _numpy_state_dict(torch_module)
    abstract = jax.eval_shape(lambda r: module.init(r, x, method=fn), jax.random.key(0))["params"]
    # diffusers' Downsample2D built with name="conv" also registers its conv as
    # an alias `Conv2d_0`; the UNet and VAE build it as name="op", without the alias.
    params = state_dict_to_params(sd, abstract, ignore=[r"^Conv2d_0\."])
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=fn))(params, x)


def test_layers_match_diffusers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 7, 9)).astype(np.float32)  # NCHW, odd sizes
    x_nhwc = x.transpose(0, 2, 3, 1)
    torch.manual_seed(3)
    cases = [
        # The autoencoder's variant: pad (0, 1, 0, 1), then an unpadded stride-2 conv.
        (Downsample2D(24, padding=0), TorchDownsample2D(16, True, 24, padding=0), {}, {}),
        (Downsample2D(24, padding=1), TorchDownsample2D(16, True, 24, padding=1), {}, {}),
        (Upsample2D(8), TorchUpsample2D(16, True, out_channels=8), {}, {}),
        # Resize to an explicit odd size, as the UNet does for odd latents.
        (
            Upsample2D(8),
            TorchUpsample2D(16, True, out_channels=8),
            {"output_size": (13, 19)},
            {"output_size": (13, 19)},
        ),
        # No temb: the autoencoder's resnet, without time_emb_proj params.
        (
            ResnetBlock2D(32, groups=4, eps=1e-6),
            TorchResnetBlock2D(in_channels=16, out_channels=32, temb_channels=None, groups=4),
            {"temb": None},
            {},
        ),
    ]
    for ours, ref_module, torch_kw, our_kw in cases:
        ref_module.eval()
        with torch.no_grad():
            ref = ref_module(torch.from_numpy(x), **torch_kw).numpy()
        out = np.asarray(_apply(ours, ref_module, x_nhwc, **our_kw)).transpose(0, 3, 1, 2)
        assert out.shape == ref.shape, type(ours).__name__
        assert np.max(np.abs(out - ref)) <= TOL, type(ours).__name__


@pytest.mark.parametrize("hw", [(2, 2), (2, 3), (2, 5), (3, 3)])
def test_layers_on_maps_smaller_than_the_kernel(hw):
    """Output maps below 3x3 take the patches-times-matrix conv on CPU: same numbers as torch."""
    h, w = hw
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8, h, w)).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1)
    torch.manual_seed(5)
    cases = [
        (Downsample2D(12, padding=0), TorchDownsample2D(8, True, 12, padding=0)),
        (Downsample2D(12, padding=1), TorchDownsample2D(8, True, 12, padding=1)),
        (
            ResnetBlock2D(16, groups=4, eps=1e-6),
            TorchResnetBlock2D(in_channels=8, out_channels=16, temb_channels=None, groups=4),
        ),
    ]
    for ours, ref_module in cases:
        ref_module.eval()
        kw = {"temb": None} if isinstance(ours, ResnetBlock2D) else {}
        with torch.no_grad():
            ref = ref_module(torch.from_numpy(x), **kw).numpy()
        out = np.asarray(_apply(ours, ref_module, x_nhwc, **kw)).transpose(0, 3, 1, 2)
        assert out.shape == ref.shape, type(ours).__name__
        assert np.max(np.abs(out - ref)) <= TOL, type(ours).__name__


@pytest.mark.parametrize(
    "shape, size, strides, padding",
    [
        ((4, 2, 2, 6), 3, (1, 1), ((1, 1), (1, 1))),
        ((4, 4, 3, 6), 3, (2, 2), ((1, 1), (1, 1))),
        ((4, 4, 4, 6), 3, (2, 2), ((0, 1), (0, 1))),
        ((4, 1, 7, 6), 3, (1, 2), ((1, 1), (0, 2))),
        ((4, 8, 8, 6), 3, (1, 1), ((1, 1), (1, 1))),  # large enough: lax itself
        ((2, 5, 3, 6), 1, (1, 1), ((0, 0), (0, 0))),  # 1x1: a dot
        ((2, 5, 3, 6), 1, (1, 1), "SAME"),
        ((2, 5, 4, 6), 1, (2, 2), "VALID"),  # strided 1x1: lax
    ],
)
def test_conv_general_dilated_matches_lax(shape, size, strides, padding):
    """Values and both gradients of the CPU path equal ``lax.conv_general_dilated``'s."""
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (size, size, shape[-1], 5)) * 0.2
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def run(conv):
        def loss(x, k):
            y = conv(x, k, strides, padding, dimension_numbers=dn)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
        return y, grads

    y, (gx, gk) = run(conv_general_dilated)
    y_ref, (gx_ref, gk_ref) = run(jax.lax.conv_general_dilated)
    assert y.shape == y_ref.shape
    for a, b in ((y, y_ref), (gx, gx_ref), (gk, gk_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


def test_gpu_1x1_convs_as_dots(monkeypatch):
    """``layers._GPU_1X1_DOT``: on a GPU backend a stride-1 1x1 conv becomes one dot
    (values and gradients of lax's conv) only when switched on; 3x3 convs and strided
    1x1 ones stay convolutions; other backends are untouched."""
    import jaxdiff.models.layers as layers

    kx, kk = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.normal(kx, (2, 5, 3, 6))
    k1 = jax.random.normal(kk, (1, 1, 6, 5)) * 0.3
    k3 = jax.random.normal(kk, (3, 3, 6, 5)) * 0.3
    dn = jax.lax.conv_dimension_numbers(x.shape, k1.shape, ("NHWC", "HWIO", "NHWC"))

    def prims(kernel, strides=(1, 1), pad="SAME"):
        conv = lambda x, k: conv_general_dilated(x, k, strides, pad, dimension_numbers=dn)  # noqa: E731
        return str(jax.make_jaxpr(conv)(x, kernel))

    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert "conv_general_dilated" in prims(k1)  # off by default
    monkeypatch.setattr(layers, "_GPU_1X1_DOT", True)
    assert "conv_general_dilated" not in prims(k1) and "dot_general" in prims(k1)
    assert "conv_general_dilated" in prims(k3)
    assert "conv_general_dilated" in prims(k1, (2, 2), "VALID")

    def loss(conv):
        def f(x, k):
            y = conv(x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)
            return jnp.sum(jnp.sin(y)), y

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    (_, y), grads = loss(conv_general_dilated)(x, k1)
    (_, y_ref), grads_ref = loss(jax.lax.conv_general_dilated)(x, k1)
    for a, b in zip((y, *grads), (y_ref, *grads_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "tpu")
    assert "conv_general_dilated" in prims(k1)


def test_eigen_form_of_3x3_convs(monkeypatch):
    """The rule's shapes, its wiring (one CPU device only), values and both gradients."""
    import jaxdiff.models.layers as layers

    faster = layers._eigen_conv_is_faster
    assert faster((2, 32, 32, 64), 64) and faster((8, 32, 32, 192), 64)
    assert faster((1, 256, 256, 32), 32) and not faster((64, 16, 16, 32), 32)
    assert not faster((2, 32, 32, 128), 128)  # 128 outputs: Eigen measured slower
    assert not faster((1, 128, 128, 64), 64)  # large maps: slower
    assert not faster((2, 32, 32, 4), 64) and not faster((2, 32, 32, 64), 4)

    kx, kk, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (2, 6, 5, 64))
    kernel = jax.random.normal(kk, (3, 3, 64, 64)) * 0.05
    weight = jax.random.normal(kg, (2, 6, 5, 64))
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        pad = ((1, 1), (1, 1))
        return lambda x, k: jnp.sum(weight * conv(x, k, (1, 1), pad, dimension_numbers=dn))

    # The test process has 8 CPU devices: the plain convolution.
    assert "custom_vjp" not in str(jax.make_jaxpr(loss(conv_general_dilated))(x, kernel))
    monkeypatch.setattr(layers.jax, "local_device_count", lambda *a, **k: 1)
    jaxpr = str(jax.make_jaxpr(loss(conv_general_dilated))(x, kernel))
    assert "custom_vjp" in jaxpr and "(1, 2)" in jaxpr  # one extra output column
    # A map smaller than the kernel keeps the patches-and-dot path (3-18x faster there).
    tiny_conv = lambda x, k: conv_general_dilated(  # noqa: E731
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn
    )
    tiny_jaxpr = str(jax.make_jaxpr(tiny_conv)(jnp.zeros((2, 2, 2, 64)), kernel))
    assert "custom_vjp" not in tiny_jaxpr and "conv_general_dilated" not in tiny_jaxpr
    ours = jax.jit(jax.value_and_grad(loss(conv_general_dilated), argnums=(0, 1)))(x, kernel)
    ref = jax.jit(jax.value_and_grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1)))(x, kernel)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-4)
    y = conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    y_ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    assert y.shape == y_ref.shape == (2, 6, 5, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


def test_cpu_attention_chunk_rules():
    """Chunks of the CPU attention: whole heads while they fit, else query blocks;
    backward key blocks: the largest divisor of S within the budget, else all keys."""
    from jaxdiff.models.attention import _forward_chunks, _key_block

    assert _forward_chunks(8, 2, 1024, 1024) == (8, 1024)  # 2^24 in all: one kernel
    assert _forward_chunks(8, 4, 1024, 1024) == (1, 1024)  # a head of batch 4 = 2^22
    assert _forward_chunks(8, 3, 1024, 1024) == (1, 1024)
    assert _forward_chunks(16, 1, 2048, 1024) == (2, 2048)  # 2 heads = 2^22
    assert _forward_chunks(12, 1, 2048, 1024) == (2, 2048)  # largest divisor of N <= 2
    assert _forward_chunks(8, 8, 1024, 1024) == (1, 1024)  # one head at least
    assert _forward_chunks(8, 8, 1024, 77) == (8, 1024)  # cross-attention: all at once
    assert _forward_chunks(32, 8, 1024, 77) == (4, 1024)  # 4 heads of 2^19.3 each
    assert _forward_chunks(8, 1, 4096, 4096) == (1, 4096)  # a head of 2^24: still whole
    assert _forward_chunks(8, 2, 4096, 4096) == (1, 2048)  # 2^25: query blocks
    assert _key_block(2, 1024, 1024) == 1024  # [2, 1024, 1024] = 2^21: one block
    assert _key_block(4, 1024, 1024) == 512
    assert _key_block(8, 1024, 1024) == 256
    assert _key_block(1, 4096, 4096) == 512
    assert _key_block(4, 1024, 77) == 77
    assert _key_block(64, 1024, 96) == 32  # a divisor that fits and is wide enough
    assert _key_block(128, 1024, 96) == 96  # 16-key blocks would be too narrow: all keys


@pytest.mark.parametrize("chunking", ["none", "heads", "queries"])
@pytest.mark.parametrize("b, t, s, n, h", [(2, 128, 128, 2, 8), (1, 192, 7, 3, 4)])
def test_attention_values_and_gradients_match_torch(monkeypatch, chunking, b, t, s, n, h):
    """The CPU attention (chunked forward, key-blocked backward) against torch's SDPA
    autograd."""
    import jaxdiff.models.attention as attention_module

    # The chunk sizes come from logit budgets; shrink them so the small cases run the
    # chunked paths: one head per chunk, or query blocks of 32, and backward key
    # blocks of 32 of the 128 keys (S = 7 is below the smallest block: one block).
    big = 2**40
    heads, queries = {"none": (big, big), "heads": (b * t * s, big), "queries": (big, b * s * 32)}[
        chunking
    ]
    monkeypatch.setattr(
        attention_module, "_CPU_UNCHUNKED_LOGITS", 2**40 if chunking == "none" else 0
    )
    monkeypatch.setattr(attention_module, "_CPU_HEAD_CHUNK_LOGITS", heads)
    monkeypatch.setattr(attention_module, "_CPU_QUERY_BLOCK_LOGITS", queries)
    if chunking != "none":
        monkeypatch.setattr(attention_module, "_CPU_BWD_BLOCK_LOGITS", b * 32 * t)
    expected = {"none": (n, t), "heads": (1, t), "queries": (1, 32)}[chunking]
    assert attention_module._forward_chunks(n, b, t, s) == expected
    assert attention_module._key_block(b, t, s) == (s if chunking == "none" or s < 32 else 32)
    rng = np.random.default_rng(7)
    q, k, v, d_out = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h))
    )
    scale = 0.3

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, scale=scale)
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    tq, tk, tv = (
        torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_() for a in (q, k, v)
    )
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
    ref.backward(torch.from_numpy(d_out.transpose(0, 2, 1, 3).copy()))
    to_bthn = lambda x: x.detach().numpy().transpose(0, 2, 1, 3)  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), to_bthn(ref), atol=2e-5)
    # The forward without a gradient (inference): the fused softmax, then the
    # normalisation deferred to the [T, H] output (used up to 256 keys).
    for keys in (0, 2**30):
        monkeypatch.setattr(attention_module, "_CPU_DEFERRED_NORM_KEYS", keys)
        primal = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=scale))(q, k, v)
        np.testing.assert_allclose(np.asarray(primal), to_bthn(ref), atol=2e-5, err_msg=str(keys))
    for name, ours, theirs in zip("qkv", grads, (tq.grad, tk.grad, tv.grad), strict=True):
        np.testing.assert_allclose(np.asarray(ours), to_bthn(theirs), atol=5e-5, err_msg=name)


def test_cpu_attention_keeps_a_split_batch_split(monkeypatch):
    """With the batch split over devices, the chunked CPU attention (forward and
    backward) runs on each device's share: no collective gathers the batch (a loop over
    a split axis would make XLA gather it and every device do all the work)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jaxdiff.models.attention as attention_module

    # Small budgets: the forward in chunks of 2 heads, the backward one head at a time.
    monkeypatch.setattr(attention_module, "_CPU_UNCHUNKED_LOGITS", 0)
    monkeypatch.setattr(attention_module, "_CPU_HEAD_CHUNK_LOGITS", 2 * 4 * 64 * 64)
    assert attention_module._forward_chunks(4, 4, 64, 64) == (2, 64)

    devices = np.asarray(jax.devices()[:2])
    if devices.size < 2:
        pytest.skip("needs 2 devices")
    split = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    rng = np.random.default_rng(0)
    q, k, v = (
        jax.device_put(rng.standard_normal((4, 64, 4, 8)).astype(np.float32), split)
        for _ in range(3)
    )

    def loss(q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v)))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert hlo.count(" while(") >= 2  # the loops over heads, forward and backward
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective


def test_gpu_attention_choice_and_fallback(monkeypatch):
    """The GPU branch: which kernel it tries, and XLA's attention when cuDNN refuses.

    Run on CPU with the backend reported as "gpu": cuDNN's attention then refuses
    at trace time ("cuDNN is not detected"), as it would on a GPU for inputs it
    does not take, so the automatic choice must fall back to XLA's path (same
    numbers as the reference) and a forced ``cudnn`` must raise.
    """
    import jaxdiff.models.attention as attention_module

    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kw):
        calls.append(implementation)
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_module.jax.nn, "dot_product_attention", spy)
    use = attention_module._use_cudnn
    bf16 = jnp.zeros((1, 4, 2, 40), jnp.bfloat16)
    monkeypatch.delenv(attention_module.ENV_ATTENTION, raising=False)
    assert use(bf16)
    assert not use(bf16.astype(jnp.float32))  # cuDNN takes fp16/bf16 only
    assert not use(jnp.zeros((1, 4, 1, 512), jnp.bfloat16))  # head size over 128
    head160 = jnp.zeros((1, 4, 8, 160), jnp.bfloat16)  # SD 1.5's 1280-channel blocks
    assert not use(head160)
    monkeypatch.setattr(attention_module, "_CUDNN_MAX_HEAD", 256)  # the experiment's switch
    assert use(head160) and not use(jnp.zeros((1, 4, 1, 512), jnp.bfloat16))
    assert not use(jnp.zeros((1, 4, 2, 12), jnp.bfloat16))  # not a multiple of 8
    monkeypatch.setenv(attention_module.ENV_ATTENTION, "xla")
    assert not use(bf16)
    monkeypatch.setenv(attention_module.ENV_ATTENTION, "CUDNN")
    assert use(bf16.astype(jnp.float32))
    monkeypatch.setenv(attention_module.ENV_ATTENTION, "flash")
    with pytest.raises(ValueError, match="auto, xla or cudnn"):
        use(bf16)

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    ref = real(q, k, v, scale=0.3, implementation="xla")
    monkeypatch.setenv(attention_module.ENV_ATTENTION, "auto")
    out = dot_product_attention(q, k, v, scale=0.3)
    assert calls == ["cudnn", "xla"] and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    monkeypatch.setenv(attention_module.ENV_ATTENTION, "cudnn")
    with pytest.raises(RuntimeError, match="cuDNN"):
        dot_product_attention(q, k, v, scale=0.3)


def test_groupnorm_statistics_in_fp32():
    # bf16 activations with a large common offset: a bf16 accumulation of
    # 64*64*4 values per group, or a one-pass E[x^2] - mean^2 variance, would
    # be far off; fp32 statistics leave only the bf16 output rounding.
    rng = np.random.default_rng(4)
    x = jnp.asarray(8.0 + rng.standard_normal((2, 64, 64, 32)), jnp.bfloat16)
    norm = GroupNorm(8, 1e-5, dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = jax.jit(norm.apply)(params, x)
    assert out.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64).reshape(2, 64, 64, 8, 4)
    mean = x64.mean(axis=(1, 2, 4), keepdims=True)
    var = x64.var(axis=(1, 2, 4), keepdims=True)
    ref = ((x64 - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    assert np.max(np.abs(np.asarray(out, np.float64) - ref)) < 0.04  # bf16 ulp at |4| is 0.03


def test_subpixel_upsample_matches_diffusers_and_reference_gradient(monkeypatch):
    """Upsample2D's sub-pixel form (nearest x2 + 3x3 conv from the low-res input)."""
    import jaxdiff.models.layers as layers

    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 16, 7, 9)).astype(np.float32)  # NCHW, odd sizes
    torch.manual_seed(7)
    ref_module = TorchUpsample2D(16, True, out_channels=8).eval()
    with torch.no_grad():
        ref = ref_module(torch.from_numpy(x)).numpy()
    monkeypatch.setattr(layers, "_SUBPIXEL_UPSAMPLE", True)
    module, x_nhwc = Upsample2D(8), x.transpose(0, 2, 3, 1)
    variables = jax.eval_shape(module.init, jax.random.key(0), x_nhwc)
    assert "custom_vjp" in str(jax.make_jaxpr(module.apply)(variables, x_nhwc))  # sub-pixel
    out = np.asarray(_apply(module, ref_module, x_nhwc))
    assert out.transpose(0, 3, 1, 2).shape == ref.shape == (2, 8, 14, 18)
    assert np.max(np.abs(out.transpose(0, 3, 1, 2) - ref)) <= TOL

    xs = jnp.asarray(x.transpose(0, 2, 3, 1))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)).astype(np.float32) / 12)
    bias = jnp.asarray(rng.standard_normal(8).astype(np.float32))
    weight = jnp.asarray(rng.standard_normal((2, 14, 18, 8)).astype(np.float32))
    forms = (layers.upsample2x_conv3x3, lambda x, k, b: layers._upsample_conv_reference(x, k) + b)
    grads = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(weight * f(*a)), argnums=(0, 1, 2)))(xs, k, bias)
        for f in forms
    ]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Without a bias: the plain convolution.
    np.testing.assert_allclose(
        np.asarray(layers.upsample2x_conv3x3(xs, k)),
        np.asarray(layers._upsample_conv_reference(xs, k)),
        rtol=1e-5,
        atol=1e-5,
    )

    # Both forms initialise the same params ("conv": kernel, bias), value for value.
    inits = []
    for form in (True, False):
        monkeypatch.setattr(layers, "_SUBPIXEL_UPSAMPLE", form)
        inits.append(Upsample2D(8).init(jax.random.key(3), x_nhwc))
    for a, b in zip(*(jax.tree.leaves(p) for p in inits)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])

    # "auto": on CPU from 32x32 inputs (the VAE decoder's), not below (the small UNet's).
    monkeypatch.setattr(layers, "_SUBPIXEL_UPSAMPLE", "auto")
    assert layers._use_subpixel(jnp.zeros((1, 32, 32, 4)))
    assert not layers._use_subpixel(jnp.zeros((1, 16, 16, 4)))
    # On GPU from 64x64 (the SD VAE decoder's, measured), not the SD 1.5 UNet's 32x32;
    # never on TPU (not measured there).
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert layers._use_subpixel(jnp.zeros((1, 64, 64, 4)))
    assert not layers._use_subpixel(jnp.zeros((1, 32, 32, 4)))
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "tpu")
    assert not layers._use_subpixel(jnp.zeros((1, 256, 256, 4)))


def _groupnorm_and_grad(norm, params, x, weight) -> tuple[np.ndarray, np.ndarray]:
    """GroupNorm's output for ``x`` and the gradient of <output, weight> (numpy)."""
    y, vjp = jax.vjp(lambda x: norm.apply(params, x), jnp.asarray(x))
    return np.asarray(y), np.asarray(vjp(weight)[0])


@pytest.mark.parametrize("offset", [3.0, 1e4])
def test_groupnorm_one_pass_statistics_agree(monkeypatch, offset):
    """The shifted one-pass statistics (CPU default) against the two-pass ones and a
    float64 reference, also for groups whose |mean| >> std (where an unshifted
    E[x^2] - mean^2 loses every digit of the variance in fp32); the gradients too."""
    import jaxdiff.models.layers as layers

    rng = np.random.default_rng(5)
    x = (offset + 2.0 * rng.standard_normal((2, 8, 8, 64))).astype(np.float32)
    weight = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    norm = GroupNorm(16, 1e-6)
    params = norm.init(jax.random.key(0), x)
    results = {}
    for mode in (False, True):
        monkeypatch.setattr(layers, "_ONE_PASS_GROUPNORM", mode)
        jaxpr = str(jax.make_jaxpr(norm.apply)(params, x))
        assert ("stop_gradient" in jaxpr) == mode  # the shifted one-pass path was traced
        assert ("optimization_barrier" in jaxpr) == mode  # ...with its sums in two steps
        results[mode] = _groupnorm_and_grad(norm, params, x, weight)
    g = x.astype(np.float64).reshape(2, 8, 8, 16, 4)
    ref = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        g.var(axis=(1, 2, 4), keepdims=True) + 1e-6
    )
    # fp32 rounds x itself by ~offset * 6e-8, i.e. 3e-4 of a std at offset 1e4.
    atol = 2e-5 if offset < 10 else 2e-3
    np.testing.assert_allclose(results[True][0], ref.reshape(x.shape), atol=atol)
    np.testing.assert_allclose(results[True][0], results[False][0], atol=atol)
    np.testing.assert_allclose(results[True][1], results[False][1], atol=atol * 10)
    monkeypatch.setattr(layers, "_ONE_PASS_GROUPNORM", "auto")
    assert layers._cpu_unless_set(layers._ONE_PASS_GROUPNORM) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("offset", [3.0, 1e4])
def test_groupnorm_staged_sums_agree(monkeypatch, offset):
    """The two-pass statistics with each sum in two steps (the GPU experiment
    ``_GROUPNORM_STAGED_SUMS``) against the plain two-pass ones: values and gradients,
    for 4-D input (staged) and 3-D input (no second spatial axis: plain)."""
    import jaxdiff.models.layers as layers

    monkeypatch.setattr(layers, "_ONE_PASS_GROUPNORM", False)
    rng = np.random.default_rng(6)
    for shape in ((2, 8, 6, 64), (2, 12, 64)):
        x = (offset + 2.0 * rng.standard_normal(shape)).astype(np.float32)
        weight = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        norm = GroupNorm(16, 1e-6)
        params = norm.init(jax.random.key(0), x)
        results = {}
        for staged in (False, True):
            monkeypatch.setattr(layers, "_GROUPNORM_STAGED_SUMS", staged)
            jaxpr = str(jax.make_jaxpr(norm.apply)(params, x))
            assert ("optimization_barrier" in jaxpr) == (staged and len(shape) == 4)
            results[staged] = _groupnorm_and_grad(norm, params, x, weight)
        atol = 2e-5 if offset < 10 else 2e-3
        np.testing.assert_allclose(results[True][0], results[False][0], atol=atol)
        np.testing.assert_allclose(results[True][1], results[False][1], atol=atol * 10)
        assert np.abs(results[True][0]).max() > 0.5  # normalised, not zeros


@pytest.mark.parametrize("one_pass", [False, True])
def test_groupnorm_offset_equals_adding_it_first(monkeypatch, one_pass):
    """GroupNorm(x, offset) is GroupNorm(x + offset) (both statistics paths), gradients
    to x and the offset included; the resnet's two forms of its time embedding
    (inside norm2, the default, or added to conv1's output) agree."""
    import jaxdiff.models.layers as layers

    monkeypatch.setattr(layers, "_ONE_PASS_GROUPNORM", one_pass)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 32)), jnp.float32)
    offset = jnp.asarray(3.0 * rng.standard_normal((2, 32)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    norm = GroupNorm(8, 1e-5)
    params = norm.init(jax.random.key(0), x)

    def loss(x, offset, inside):
        y = (
            norm.apply(params, x, offset)
            if inside
            else norm.apply(params, x + offset[:, None, None])
        )
        return jnp.sum(y * weight)

    (a, ga), (b, gb) = (jax.value_and_grad(loss, (0, 1))(x, offset, i) for i in (True, False))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for u, v in zip(ga, gb, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5)
    assert float(jnp.abs(gb[1]).max()) > 1e-3  # the offset's gradient is not trivially 0

    temb = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    block_params = ResnetBlock2D(48, groups=8).init(jax.random.key(1), x, temb)
    outs = {}
    for form in (None, True, False):  # None: layers._TEMB_IN_NORM's default (True)
        block = ResnetBlock2D(48, groups=8, temb_in_norm=form)
        outs[form] = np.asarray(jax.jit(block.apply)(block_params, x, temb))
    np.testing.assert_array_equal(outs[None], outs[True])
    np.testing.assert_allclose(outs[True], outs[False], atol=2e-5)

    # The projection made outside (the UNet's merged weights) gives the same block.
    proj = block_params["params"]["time_emb_proj"]
    made = jax.nn.silu(temb) @ proj["kernel"] + proj["bias"]
    block = ResnetBlock2D(48, groups=8)
    outside = jax.jit(lambda p, x, m: block.apply(p, x, temb_proj=m))(block_params, x, made)
    np.testing.assert_allclose(np.asarray(outside), outs[None], atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        block.apply(block_params, x, temb, made)
    with pytest.raises(ValueError, match="temb_proj has 47 channels"):
        block.apply(block_params, x, temb_proj=made[:, :-1])


def test_dtypes_validation_and_attention_hook():
    cfg = UNetConfig.from_diffusers(CONFIGS["sd2"])
    abstract = unet_abstract_params(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
    x = jnp.zeros((2, 8, 8, 4))
    ctx = jnp.zeros((2, 3, 48))

    # bf16 compute keeps fp32 params and returns bf16 (traced only, no compile).
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    out = jax.eval_shape(lambda p: bf16.apply({"params": p}, x, 3, ctx), abstract)
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.bfloat16

    # Every attention of the UNet goes through the hook, self and cross.
    seen = []

    def hook(module, q, k, v):
        seen.append((module.name, "/".join(module.path), q.shape, k.shape))
        return dot_product_attention(q, k, v, scale=module.scale, upcast=module.upcast_attention)

    hooked = UNet2DConditionModel(cfg, attention_fn=hook)
    jax.eval_shape(lambda p: hooked.apply({"params": p}, x, 3, ctx), abstract)
    # sd2: 1 + 1 transformers down, 1 mid, 2 + 2 up; 2 blocks each; 2 attentions per block.
    assert len(seen) == 7 * 2 * 2
    assert {s[0] for s in seen} == {"attn1", "attn2"}
    assert all(s[3][1] == 3 for s in seen if s[0] == "attn2")  # keys from the 3 text tokens
    assert any(s[1].startswith("mid_block/attentions_0/transformer_blocks_1") for s in seen)

    bad = [
        (jnp.zeros((2, 8, 8, 5)), 3, ctx, "sample"),
        (x, 3, jnp.zeros((2, 3, 32)), "encoder_hidden_states"),
        (x, 3, jnp.zeros((1, 3, 48)), "batch"),
        (x, 3, jnp.zeros((3, 3, 48)), "multiple"),
        (x, jnp.zeros((3,)), ctx, "timesteps"),
    ]
    model = UNet2DConditionModel(cfg)
    for s, t, c, match in bad:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda p, s=s, t=t, c=c: model.apply({"params": p}, s, t, c), abstract)


def test_init_and_remat_gradients():
    # One level (no up/down sampling) keeps the two gradient compiles small;
    # remat only touches resnets and transformers, which it has.
    cfg = UNetConfig(
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        num_heads=(2,),
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    params = init_unet(cfg, jax.random.key(0))
    abstract = unet_abstract_params(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(
        p.shape == a.shape and p.dtype == a.dtype
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract))
    )
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert float(jnp.std(params["conv_in"]["kernel"])) > 0  # random, not zeros

    # remat changes memory, not params or math: the same params apply (a
    # renamed module would fail to find its params) and give the same gradients.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32)

    def grad(model):
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, 7, ctx)))
        return jax.jit(jax.grad(loss), compiler_options=_FAST_COMPILE)(params)

    g_plain = grad(UNet2DConditionModel(cfg))
    g_remat = grad(UNet2DConditionModel(cfg, remat=True))
    assert jax.tree.structure(g_remat) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(g_plain["conv_in"]["kernel"]))) > 0


def test_gelu_erf_is_torch_gelu():
    """The GEGLU / CLIP "gelu": PyTorch's exact GELU, the tails included; computed in
    fp32 for bf16 input."""
    import jaxdiff.models.layers as layers

    x = np.linspace(-9.0, 9.0, 6001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    out = np.asarray(layers.gelu_erf(jnp.asarray(x)))
    # Rounding only (9.5e-7 at most here, at |gelu| ~3.4); XLA's fp32 erf reaches -1 a
    # little earlier than PyTorch's, so far in the negative tail this gives 0 where
    # PyTorch gives ~-1e-7.
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    outb = layers.gelu_erf(xb)
    assert outb.dtype == jnp.bfloat16
    refb = torch.nn.functional.gelu(torch.from_numpy(np.asarray(xb, np.float32))).numpy()
    # One rounding to bf16 of the fp32 value: within half a bf16 ulp (2^-8 relative).
    np.testing.assert_allclose(np.asarray(outb, np.float32), refb, rtol=2**-8, atol=1e-6)


def test_geglu_gelu_switch_computes_the_same_function(monkeypatch):
    """The benchmark's ``geglu_jax_gelu`` experiment swaps GEGLU's GELU for
    jax.nn.gelu's erfc form: the same exact GELU in fp32, to rounding."""
    import jaxdiff.models.attention as attention

    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3
    geglu = attention.GEGLU(features=24)
    params = geglu.init(jax.random.key(1), x)
    erf_form = geglu.apply(params, x)
    monkeypatch.setattr(attention, "_GEGLU_GELU", "jax")
    erfc_form = geglu.apply(params, x)
    assert erfc_form.shape == (2, 5, 24)
    assert float(jnp.max(jnp.abs(erfc_form - erf_form))) > 0  # the other code path ran
    np.testing.assert_allclose(np.asarray(erfc_form), np.asarray(erf_form), rtol=1e-5, atol=1e-5)
