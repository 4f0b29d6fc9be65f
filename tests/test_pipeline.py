"""The Stable Diffusion pipeline against diffusers' PyTorch pipelines.

Tiny random models are built with diffusers/transformers, saved in diffusers
format and loaded by jaxdiff; both sides then sample from the same NHWC/NCHW
latents with the same prompts and must give the same uint8 images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from tiny_sd import build_tiny_sd

from jaxdiff import pipeline as pipeline_mod
from jaxdiff import samplers
from jaxdiff.models.sd import decode_latents, encode_images
from jaxdiff.pipeline import StableDiffusion

PROMPTS = ["a photo of a cat", "a watercolour painting of a lighthouse", "an astronaut"]
NEGATIVE = ["blurry", "", "low quality"]
STEPS = 10

# sampler name -> (diffusers scheduler class, extra from_config kwargs, our schedule)
REFERENCE = {
    "ddim": ("DDIMScheduler", {}, None),
    "pndm": ("PNDMScheduler", {}, None),
    "lms": ("LMSDiscreteScheduler", {}, None),
    "euler": ("EulerDiscreteScheduler", {}, None),
    "heun": ("HeunDiscreteScheduler", {}, None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, None),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras"),
    "unipc": ("UniPCMultistepScheduler", {}, None),
}


def _reload(cls, d):
    """The reference pipeline as a user gets it: loaded from the saved directory.

    (An in-memory scheduler remembers which keys took defaults and drops them when
    swapped with from_config; one loaded from scheduler_config.json does not.)
    """
    ref = cls.from_pretrained(d)
    ref.set_progress_bar_config(disable=True)
    ref.base_scheduler_config = ref.scheduler.config
    return ref


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1") / "model"
    ref = _reload(type(build_tiny_sd(d, "sd1")), d)
    return d, ref, StableDiffusion.from_pretrained(d)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd2") / "model"
    ref = _reload(type(build_tiny_sd(d, "sd2", scheduler="DDIMScheduler")), d)
    return d, ref, StableDiffusion.from_pretrained(d)


def _latents(b, seed=0, hw=8):
    return np.random.RandomState(seed).randn(b, hw, hw, 4).astype(np.float32)


def _reference(ref, sampler, latents, **kw):
    import diffusers

    cls, extra, _ = REFERENCE[sampler]
    # Swap from the saved scheduler_config.json each time, as a user loading the model
    # would: chaining from_config through earlier swaps would carry their defaults over.
    ref.scheduler = getattr(diffusers, cls).from_config(ref.base_scheduler_config, **extra)
    out = ref(
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
        output_type="np",
        **kw,
    ).images
    return (out * 255).round().astype(np.uint8)


def _mad(a, b) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_text_to_image_matches_diffusers_sd1(sd1, sampler):
    _, ref, pipe = sd1
    lat = _latents(3)
    ours = pipe.text_to_image(
        PROMPTS,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=7.5,
        sampler=sampler.replace("_karras", ""),
        schedule=REFERENCE[sampler][2],
        latents=lat,
        progress=False,
    )
    theirs = _reference(
        ref, sampler, lat, prompt=PROMPTS, negative_prompt=NEGATIVE,
        num_inference_steps=STEPS, guidance_scale=7.5,
    )  # fmt: skip
    assert ours.shape == theirs.shape == (3, 16, 16, 3) and ours.dtype == np.uint8
    assert ours.std() > 10, "images are flat: the comparison would be vacuous"
    mad = _mad(ours, theirs)
    print(f"\nSD1 text_to_image {sampler:16s} mean|diff| = {mad:.4f} uint8 levels")
    assert mad <= 1.0


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "unipc"])
def test_text_to_image_matches_diffusers_sd2_vpred(sd2, sampler):
    _, ref, pipe = sd2
    lat = _latents(2, seed=1)
    ours = pipe.text_to_image(
        PROMPTS[:2], steps=STEPS, guidance_scale=7.5, sampler=sampler, latents=lat,
        guidance_rescale=0.3, progress=False,
    )  # fmt: skip
    theirs = _reference(
        ref, sampler, lat, prompt=PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=7.5,
        guidance_rescale=0.3,
    )  # fmt: skip
    mad = _mad(ours, theirs)
    print(f"\nSD2 (v-pred) text_to_image {sampler:10s} mean|diff| = {mad:.4f}")
    assert ours.std() > 10
    assert mad <= 1.0


def test_default_sampler_comes_from_scheduler_config(sd2):
    _, _, pipe = sd2
    assert pipe.config.scheduler.default_sampler == "ddim"


@pytest.mark.parametrize("split_programs", [True, False])
def test_changing_traced_values_does_not_recompile(sd1, xla_compiles, split_programs):
    _, _, pipe = sd1
    pipe = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, split_programs=split_programs)
    kw = dict(steps=4, sampler="euler_a", progress=False)
    a = pipe.text_to_image("a photo of a cat", guidance_scale=7.5, seed=0, **kw)
    assert xla_compiles  # (the listener hears this jaxlib's compiles)
    xla_compiles.clear()
    b = pipe.text_to_image("an astronaut", guidance_scale=3.0, eta=0.5, seed=1, **kw)
    c = pipe.text_to_image("an astronaut", guidance_scale=3.0, eta=0.5, seed=2, **kw)
    assert xla_compiles == []
    assert _mad(a, b) > 0 and _mad(b, c) > 0  # the values did reach the computation
    d = pipe.text_to_image("an astronaut", guidance_scale=3.0, eta=0.5, seed=2, **kw)
    np.testing.assert_array_equal(c, d)  # and seeds are reproducible


def test_sharded_batch_matches_single_device(sd1):
    _, _, pipe = sd1
    one = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, devices=jax.devices()[:1])
    assert pipe.mesh.devices.size == 8
    kw = dict(steps=5, sampler="dpmpp_2m", num_images_per_prompt=1, progress=False)
    prompts = PROMPTS + ["a handwritten digit seven", "a photo of a cat"]  # 5: not / 8
    sharded = pipe.text_to_image(prompts, seed=3, **kw)
    single = one.text_to_image(prompts, seed=3, **kw)
    assert sharded.shape == (5, 16, 16, 3)
    assert _mad(sharded, single) <= 0.01 and np.abs(sharded.astype(int) - single).max() <= 1


def test_one_image_splits_the_guidance_pair_over_devices(sd1, monkeypatch):
    """One image on 2 devices: no padding, each device runs one half of the guidance
    pair and the decoder is split by rows; on 8 devices the image is padded to 4."""
    _, _, pipe = sd1
    kw = dict(steps=4, sampler="ddim", seed=5, progress=False)
    single = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, devices=jax.devices()[:1])
    two = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, devices=jax.devices()[:2])
    # On one device the UNet gets the latent once with both contexts (shared sample);
    # on several, the guidance pair [x; x] (checked against this image below).
    unet_batches = []
    apply_unet = pipeline_mod.apply_unet

    def recording_unet(params, x, t, context, *args, **kwargs):
        unet_batches.append((x.shape[0], context.shape[0]))
        return apply_unet(params, x, t, context, *args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "apply_unet", recording_unet)
    pipeline_mod._clear_program_caches()
    ref = single.text_to_image("a photo of a cat", **kw)
    assert set(unet_batches) == {(1, 2)}
    unet_batches.clear()
    # Which arrays generate() splits, seen while the 2- and 8-device calls are traced.
    split_calls = []
    original = pipeline_mod._split_over_mesh

    def recording(x, mesh, axis):
        out = original(x, mesh, axis)
        split_calls.append((mesh.devices.size, x.shape, axis, out is not x))
        return out

    monkeypatch.setattr(pipeline_mod, "_split_over_mesh", recording)
    pipeline_mod._clear_program_caches()
    # (A new 8-device pipeline: the fixture's may hold these programs compiled.)
    eight = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer)
    for other in (two, eight):
        out = other.text_to_image("a photo of a cat", **kw)
        assert out.shape == ref.shape == (1, 16, 16, 3)
        assert _mad(out, ref) <= 0.01 and np.abs(out.astype(int) - ref).max() <= 1
    hw = (16 // pipe.config.latent_factor,) * 2  # the latents of a 16x16 image
    two_dev = {(shape, axis, done) for n, shape, axis, done in split_calls if n == 2}
    assert ((2, *hw, 4), 0, True) in two_dev  # the guidance pair [uncond; cond], one image
    assert ((1, *hw, 4), 1, True) in two_dev  # the decoder's latents, by rows
    eight = {(shape[0], axis, done) for n, shape, axis, done in split_calls if n == 8}
    assert (8, 0, True) in eight  # padded to 4 images: a guidance batch of 8
    assert set(unet_batches) == {(2, 2), (8, 8)}


def _dots_in_loops(jaxpr, in_loop: bool = False) -> int:
    """Matmuls (dot_general) inside scan / while bodies of a jaxpr, nested jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += in_loop and eqn.primitive.name == "dot_general"
        loop = in_loop or eqn.primitive.name in ("scan", "while")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _dots_in_loops(sub, loop)
    return n


def test_loop_invariant_work_leaves_the_sampling_loop(sd1, monkeypatch):
    """The cross-attentions' keys and values are computed once per call, outside the
    loop (two matmuls fewer per cross-attention in the loop), and so are the UNet's
    merged weights (one matmul for each self-attention's q/k/v instead of three, one
    for every resnet's time-embedding projection); the same images either way (8
    devices and one)."""
    _, _, pipe = sd1
    one = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, devices=jax.devices()[:1])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pipe.params)]
    n_cross = sum(p.endswith("['attn2']['to_k']['kernel']") for p in paths)
    n_self = sum(p.endswith("['attn1']['to_k']['kernel']") for p in paths)
    n_resnets = sum(p.endswith("['time_emb_proj']['kernel']") for p in paths)
    assert n_cross > 0 and n_self > 0 and n_resnets > 1
    kw = dict(steps=3, sampler="dpmpp_2m", seed=4, progress=False)
    images, loop_dots = {}, {}
    for off in (None, "_PRECOMPUTE_CROSS_KV", "_MERGE_WEIGHTS"):
        for switch in ("_PRECOMPUTE_CROSS_KV", "_MERGE_WEIGHTS"):
            monkeypatch.setattr(pipeline_mod, switch, switch != off)
        pipeline_mod._clear_program_caches()
        for p in (pipe, one):
            p._parts.clear()
            images[off, p is one] = p.text_to_image(PROMPTS[:3], **kw)
        spec, inputs, _ = pipe._prepare("text_to_image", PROMPTS[:3], **kw)
        generate = functools.partial(pipeline_mod.generate, spec=spec)
        jaxpr = jax.make_jaxpr(generate)(pipe.params, inputs)
        loop_dots[off] = _dots_in_loops(jaxpr.jaxpr)
    assert loop_dots["_PRECOMPUTE_CROSS_KV"] - loop_dots[None] == 2 * n_cross
    assert loop_dots["_MERGE_WEIGHTS"] - loop_dots[None] == 2 * n_self + n_resnets - 1
    for off in ("_PRECOMPUTE_CROSS_KV", "_MERGE_WEIGHTS"):
        for devices_one in (False, True):
            a, b = images[None, devices_one], images[off, devices_one]
            assert _mad(a, b) <= 0.01 and np.abs(a.astype(int) - b).max() <= 1


def test_batch_padding_and_split_over_mesh():
    assert [pipeline_mod.batch_padding(b, 2) for b in (1, 2, 3)] == [0, 0, 0]
    assert [pipeline_mod.batch_padding(b, 8) for b in (1, 4, 5, 8)] == [3, 0, 3, 0]
    assert [pipeline_mod.batch_padding(b, 3) for b in (1, 3)] == [2, 0]
    with pytest.raises(ValueError, match="must be >= 1"):
        pipeline_mod.batch_padding(0, 2)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    split = jax.jit(lambda x, axis: pipeline_mod._split_over_mesh(x, mesh, axis), static_argnums=1)
    x = jax.device_put(np.zeros((2, 3, 4), np.float32), jax.sharding.NamedSharding(mesh, P()))
    assert split(x, 0).sharding.spec == P("data")
    assert split(x, 2).sharding.spec in (P(None, None, "data"), P(None, None, ("data",)))
    assert split(x, 1).sharding.is_fully_replicated  # 3 rows do not divide by 2
    assert pipeline_mod._split_over_mesh(x, None, 0) is x


def test_image_to_image_small_strength_is_the_vae_round_trip(tmp_path):
    # Unit-variance latents, as a trained SD VAE gives: the noise levels then mean what
    # they mean for a real model.
    build_tiny_sd(tmp_path / "m", "sd1", deterministic_vae=True, vae_scaling_factor=4.5)
    pipe = StableDiffusion.from_pretrained(tmp_path / "m")
    rng = np.random.RandomState(0)
    image = (rng.rand(2, 16, 16, 3) * 255).astype(np.uint8)
    x = jnp.asarray(image, jnp.float32) / 127.5 - 1
    # With a (near-)deterministic posterior, strength 0 runs no step and returns exactly
    # the VAE round trip; a small strength changes the image a little, strength 1 a lot.
    lat = encode_images(pipe.params["vae"], x, pipe.config)
    recon = decode_latents(pipe.params["vae"], lat, pipe.config)
    recon = np.asarray(jnp.round(jnp.clip(recon / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8))
    kw = dict(steps=20, sampler="ddim", progress=False, guidance_scale=1.0)
    zero = pipe.image_to_image(image, ["a photo of a cat"] * 2, strength=0.0, **kw)
    small = pipe.image_to_image(image, ["a photo of a cat"] * 2, strength=0.05, **kw)  # 1 step
    large = pipe.image_to_image(image, ["a photo of a cat"] * 2, strength=1.0, **kw)
    assert _mad(zero, recon) <= 0.01
    assert _mad(small, zero) < 4 < _mad(large, zero)
    print(f"\nimg2img vs VAE round trip: 0.05 {_mad(small, zero):.2f}, 1.0 {_mad(large, zero):.2f}")


def test_inpaint_4ch_pins_unmasked_latents_at_every_step(tmp_path, monkeypatch):
    d = tmp_path / "m"
    build_tiny_sd(d, "sd1", deterministic_vae=True)
    pipe = StableDiffusion.from_pretrained(d, devices=jax.devices()[:1])
    records = []
    real_sample = samplers.sample

    def spy(model_fn, x_init, plan, *, step_hook=None, **kw):
        def hook(x, idx):
            y = step_hook(x, idx)
            jax.debug.callback(lambda a, i: records.append((int(i), np.asarray(a))), y, idx)
            return y

        return real_sample(model_fn, x_init, plan, step_hook=hook, **kw)

    monkeypatch.setattr(pipeline_mod.samplers, "sample", spy)
    rng = np.random.RandomState(1)
    image = (rng.rand(1, 16, 16, 3) * 255).astype(np.uint8)
    mask = np.zeros((1, 16, 16), np.float32)
    mask[:, :8, :] = 1.0  # repaint the top half = latent rows 0..3
    runs = []
    for prompt, g in (("a photo of a cat", 7.5), ("an astronaut", 2.0)):
        records.clear()
        pipe.inpaint(image, mask, prompt, steps=6, sampler="euler", guidance_scale=g,
                     seed=5, progress=False)  # fmt: skip
        runs.append(sorted(records, key=lambda r: r[0]))
    assert [r[0] for r in runs[0]] == list(range(1, 7))
    x = jnp.asarray(image, jnp.float32) / 127.5 - 1
    image_latents = np.asarray(encode_images(pipe.params["vae"], x, pipe.config))
    for (i, a), (_, b) in zip(*runs):
        # Unmasked (bottom) latents do not depend on the prompt or guidance at any step...
        np.testing.assert_array_equal(a[:, 4:], b[:, 4:])
        # ... while the masked region does.
        assert np.abs(a[:, :4] - b[:, :4]).max() > 1e-3, i
    # After the last step the unmasked latents are exactly the image's latents.
    np.testing.assert_allclose(runs[0][-1][1][:, 4:], image_latents[:, 4:], atol=1e-5)


def test_inpaint_9ch_matches_diffusers(tmp_path):
    d = tmp_path / "m"
    ref = _reload(type(build_tiny_sd(d, "inpaint", deterministic_vae=True)), d)
    pipe = StableDiffusion.from_pretrained(d)
    rng = np.random.RandomState(2)
    image = (rng.rand(2, 16, 16, 3) * 255).astype(np.uint8)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[0, 4:12, 4:12] = 1.0
    mask[1, :, 8:] = 1.0
    lat = _latents(2, seed=4)
    prompts = PROMPTS[:2]
    ours = pipe.inpaint(image, mask, prompts, steps=STEPS, sampler="pndm", latents=lat,
                        progress=False)  # fmt: skip
    theirs = ref(
        prompt=prompts,
        image=torch.from_numpy(image.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1),
        mask_image=torch.from_numpy(mask[:, None]),
        height=16,
        width=16,
        num_inference_steps=STEPS,
        latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()),
        output_type="np",
    ).images
    theirs = (theirs * 255).round().astype(np.uint8)
    mad = _mad(ours, theirs)
    print(f"\n9-channel inpaint vs diffusers mean|diff| = {mad:.4f}")
    assert ours.std() > 10
    assert mad <= 1.0
    # One device: the guidance pair shares the sample, mask and masked-image latents
    # go in once (net_fn's 9-channel input at batch B, not 2B).
    one = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, devices=jax.devices()[:1])
    single = one.inpaint(image, mask, prompts, steps=STEPS, sampler="pndm", latents=lat,
                         progress=False)  # fmt: skip
    assert _mad(single, theirs) <= 1.0 and np.abs(single.astype(int) - ours).max() <= 1


def test_bfloat16_runs_and_stays_close(sd1):
    d, _, pipe = sd1
    bf = StableDiffusion.from_pretrained(d, dtype=jnp.bfloat16)
    # Every param in bf16 but the norms' (GroupNorm, LayerNorm), which stay fp32.
    dtypes = {
        jax.tree_util.keystr(path): a.dtype
        for path, a in jax.tree_util.tree_leaves_with_path(bf.params)
    }
    norms = {k for k in dtypes if "norm" in k.rsplit("[", 1)[0]}
    assert any("conv_norm_out" in k for k in norms) and any("final_layer_norm" in k for k in norms)
    assert any("layer_norm1" in k for k in norms) and any("'norm2'" in k for k in norms)
    assert {dtypes[k] for k in norms} == {np.dtype(np.float32)}
    assert {dtypes[k] for k in dtypes if k not in norms} == {np.dtype(jnp.bfloat16)}
    kw = dict(steps=5, sampler="ddim", latents=_latents(1), progress=False)
    a = pipe.text_to_image("a photo of a cat", **kw)
    b = bf.text_to_image("a photo of a cat", **kw)
    assert _mad(a, b) < 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=15, width=16), "multiples of"),  # the tiny VAE downsamples x2
        (dict(prompt=[]), "empty"),
        (dict(sampler="nope"), "valid samplers"),
        (dict(steps=0), "num_steps"),
        (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_bad_input_is_a_clear_error(sd1, kwargs, message):
    _, _, pipe = sd1
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.text_to_image(progress=False, **kwargs)


def test_mask_shape_mismatch_is_a_clear_error(sd1):
    _, _, pipe = sd1
    image = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="mask shape"):
        pipe.inpaint(image, np.zeros((1, 8, 8)), "a cat", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, dtype=jnp.int8)


def test_compiler_chosen_param_layouts_give_the_same_images(sd1):
    _, _, pipe = sd1
    from jax.experimental.layout import Format, Layout

    from jaxdiff import layouts

    assert pipe._layouts is None  # the default: default layouts
    laid = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, param_layouts=True)
    # Every parameter transposed (the CPU compiler would keep the default layouts): the
    # executable must read them as laid out, and the pipeline keep them there.
    forced = jax.tree.map(
        lambda a: Format(Layout(major_to_minor=tuple(reversed(range(a.ndim)))), a.sharding),
        laid.params,
    )
    laid._layouts.formats = forced
    for sampler in ("ddim", "euler"):  # two executables, one copy of the params
        kw = dict(steps=3, sampler=sampler, progress=False)
        np.testing.assert_array_equal(
            laid.text_to_image(PROMPTS, seed=4, **kw), pipe.text_to_image(PROMPTS, seed=4, **kw)
        )
    assert len(laid._layouts._compiled) == 2 and laid._layouts.failed is None
    for net in ("unet", "text_encoder"):  # (arguments text-to-image leaves unused, such
        # as the VAE encoder's, keep the layouts XLA reports for them: the default)
        assert layouts.layouts_differ(laid.params[net], forced[net]) == []
        assert layouts.layouts_differ(pipe.params[net], forced[net])  # the plain one's differ


def test_param_layouts_fall_back_with_a_warning(sd1, monkeypatch):
    _, _, pipe = sd1
    from jaxdiff import layouts

    def refuse(*a, **k):
        raise NotImplementedError("no layouts on this backend")

    monkeypatch.setattr(layouts, "compile_with_layouts", refuse)
    laid = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, param_layouts=True)
    kw = dict(steps=2, sampler="euler", progress=False)
    with pytest.warns(RuntimeWarning, match="no layouts on this backend"):
        a = laid.text_to_image(PROMPTS[0], seed=1, **kw)
    np.testing.assert_array_equal(a, pipe.text_to_image(PROMPTS[0], seed=1, **kw))


def test_compiler_options_reach_xla_and_keep_the_images(sd1, monkeypatch):
    _, _, pipe = sd1
    kw = dict(steps=2, sampler="euler", progress=False)
    want = pipe.text_to_image(PROMPTS[0], seed=3, **kw)
    opts = {"xla_gpu_enable_llvm_module_compilation_parallelism": True}
    # The backend's defaults when none are given; {} turns them off.
    monkeypatch.setitem(pipeline_mod.DEFAULT_COMPILER_OPTIONS, jax.default_backend(), opts)
    assert StableDiffusion(pipe.config, pipe.params, pipe.tokenizer).compiler_options == opts
    plain = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, compiler_options={})
    assert plain.compiler_options == {}
    for param_layouts in (False, True):  # the plain jit and the layout cache's compile
        tuned = StableDiffusion(
            pipe.config,
            pipe.params,
            pipe.tokenizer,
            param_layouts=param_layouts,
            compiler_options=opts,
        )
        np.testing.assert_array_equal(tuned.text_to_image(PROMPTS[0], seed=3, **kw), want)
        if param_layouts:
            assert tuned._layouts.failed is None and len(tuned._layouts._compiled) == 1
    # They reach the compiler: an option this jaxlib does not know is refused by name.
    bad = StableDiffusion(
        pipe.config, pipe.params, pipe.tokenizer, compiler_options={"xla_no_such_option": 1}
    )
    with pytest.raises(Exception, match="xla_no_such_option"):
        bad.text_to_image(PROMPTS[0], seed=3, **kw)
    # ... on the layout cache's compile too (it falls back to the plain jit, which
    # refuses the same option).
    bad = StableDiffusion(
        pipe.config,
        pipe.params,
        pipe.tokenizer,
        param_layouts=True,
        compiler_options={"xla_no_such_option": 1},
    )
    with (
        pytest.warns(RuntimeWarning, match="xla_no_such_option"),
        pytest.raises(Exception, match="xla_no_such_option"),
    ):
        bad.text_to_image(PROMPTS[0], seed=3, **kw)


@pytest.mark.parametrize("options", ["fast", {"xla_gpu_autotune_level": None}, {1: True}])
def test_bad_compiler_options_are_a_clear_error(sd1, options):
    _, _, pipe = sd1
    with pytest.raises(ValueError, match="compiler_options"):
        StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, compiler_options=options)


# The pipeline's sampling programs, by the names jax compiles them under.
SAMPLING_PROGRAMS = ("generate", "encode_conditions", "denoise", "decode_images")


@pytest.fixture
def xla_compiles():
    """A list that gets the name of each sampling program jax asks of XLA: compiled,
    or read from the persistent compilation cache (jax times both as its "backend
    compile"). Small helper programs (key splits, casts) a first call may also
    compile, depending on which tests ran before, are left out."""
    from jax import monitoring

    seen: list[str] = []

    def listen(name, secs, fun_name="", **_):
        program = fun_name.removeprefix("jit(").removesuffix(")")
        if name == "/jax/core/compile/backend_compile_duration" and program in SAMPLING_PROGRAMS:
            seen.append(program)

    monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize(
    "options",
    [{}, {"split_programs": False}, {"param_layouts": True}],
    ids=["split", "one_program", "param_layouts"],
)
def test_executable_compiles_ahead_of_the_first_call(sd1, xla_compiles, options):
    _, _, pipe = sd1
    pipe = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, **options)
    pipeline_mod._clear_program_caches()  # (other tests compile some of the same parts)
    kw = dict(steps=3, sampler="dpmpp_2m", progress=False)
    exe = pipe.executable("text_to_image", PROMPTS[:2], **kw)
    if options:
        assert len(xla_compiles) == 1 and isinstance(exe, jax.stages.Compiled)
    else:  # three programs
        assert len(xla_compiles) == 3 and isinstance(exe, pipeline_mod.CompiledParts)
        assert all(isinstance(getattr(exe, n), jax.stages.Compiled) for n in pipeline_mod.PARTS)
    assert "while" in exe.as_text()  # the sampling loop, optimized
    xla_compiles.clear()
    images = pipe.text_to_image(["another", "two"], seed=5, **kw)
    assert xla_compiles == [] and images.shape[0] == 2 and images.dtype == np.uint8
    assert pipe.executable("text_to_image", ["x", "y"], **kw).as_text() == exe.as_text()
    assert xla_compiles == []  # (the same program: shapes and static choices only)
    with pytest.raises(ValueError, match="mode"):
        pipe.executable("paint", PROMPTS[:1])
    with pytest.raises(ValueError, match="needs an image"):
        pipe.executable("image_to_image", PROMPTS[:1])
    with pytest.raises(ValueError, match="needs a mask"):
        pipe.executable("inpaint", PROMPTS[:1], image=np.zeros((1, 64, 64, 3), np.uint8))


def test_split_programs_give_the_same_images_and_share_parts(sd1, xla_compiles, monkeypatch):
    """The three programs give generate()'s images (8 devices and one; every mode);
    a new step count or sampler compiles only the loop, a new mode not the decoder;
    the missing parts of a call go to the compiler together."""
    _, _, pipe = sd1
    pipeline_mod._clear_program_caches()  # (other tests compile some of the same parts)
    rng = np.random.RandomState(3)
    image = (rng.rand(2, 16, 16, 3) * 255).astype(np.uint8)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[:, 4:12, :8] = 1.0
    kw = dict(progress=False, seed=7)
    calls = [
        ("text_to_image", dict(steps=3, sampler="ddim")),
        ("text_to_image", dict(steps=4, sampler="euler_a")),  # only the loop is new
        ("image_to_image", dict(steps=4, sampler="euler_a", image=image, strength=0.6)),
        ("inpaint", dict(steps=4, sampler="euler_a", image=image, mask=mask, strength=0.8)),
    ]
    compiles = []
    for devices in (jax.devices(), jax.devices()[:1]):
        one, split = (
            StableDiffusion(
                pipe.config, pipe.params, pipe.tokenizer, devices=devices, split_programs=s
            )
            for s in (False, True)
        )
        assert split.split_programs and not one.split_programs
        for mode, args in calls:
            want = getattr(one, mode)(prompt=PROMPTS[:2], **kw, **args)
            xla_compiles.clear()
            got = getattr(split, mode)(prompt=PROMPTS[:2], **kw, **args)
            compiles.append(len(xla_compiles))
            np.testing.assert_array_equal(got, want)
    # t2i: all three; new steps / sampler: the loop; img2img: its encoder and loop;
    # inpaint: the same two again (it reads the mask); on both meshes.
    assert compiles == [3, 1, 2, 2] * 2

    # A first call's parts go to the compiler together ...
    batches = []
    compile_all = pipeline_mod._compile_all

    def recording(lowered):
        batches.append(sorted(lowered))
        return compile_all(lowered)

    monkeypatch.setattr(pipeline_mod, "_compile_all", recording)
    fresh = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer)
    fresh.executable("text_to_image", PROMPTS[:3], steps=2, sampler="heun")
    assert batches == [sorted(pipeline_mod.PARTS)]


def test_compile_all_compiles_at_the_same_time():
    """... which compiles them each in a thread of its own, all at once: three stand-in
    programs that each wait for the other two to start compiling. Those a compiler
    refuses to compile beside another are compiled again, one at a time."""
    import threading
    import warnings

    barrier = threading.Barrier(3, timeout=30)

    class Lowered:
        def __init__(self, name):
            self.name = name

        def compile(self):
            barrier.wait()  # raises BrokenBarrierError unless all three are compiling
            return (self.name, threading.get_ident())

    done = pipeline_mod._compile_all({n: Lowered(n) for n in pipeline_mod.PARTS})
    assert {n: r[0] for n, r in done.items()} == {n: n for n in pipeline_mod.PARTS}
    assert len({r[1] for r in done.values()}) == 3

    # A compiler that refuses to compile two at once: those it refused, again one at a
    # time, with a warning; an error in every program (a bad option) is raised as is,
    # and one that comes back when compiled alone is raised.
    busy = threading.Lock()
    holding, tried = threading.Event(), threading.Event()

    class OneAtATime(Lowered):
        def compile(self):
            if self.name == "denoise":  # holds the compiler until condition has tried
                with busy:
                    holding.set()
                    tried.wait(30)
            elif self.name == "condition":
                holding.wait(30)
                free = busy.acquire(blocking=False)
                tried.set()
                if not free:
                    raise RuntimeError("compiler busy")
                busy.release()
            return self.name

    with pytest.warns(RuntimeWarning, match="compiler busy"):
        done = pipeline_mod._compile_all({n: OneAtATime(n) for n in pipeline_mod.PARTS})
    assert done == {n: n for n in pipeline_mod.PARTS}

    class Broken(Lowered):
        def compile(self):
            if self.name != "decode":
                raise ValueError(f"bad option in {self.name}")
            return self.name

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retry when every program failed
        with pytest.raises(ValueError, match="bad option in condition"):
            pipeline_mod._compile_all({n: Broken(n) for n in pipeline_mod.PARTS[:2]})
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="bad option"):
        pipeline_mod._compile_all({n: Broken(n) for n in pipeline_mod.PARTS})


def test_split_programs_refuse_param_layouts(sd1):
    _, _, pipe = sd1
    with pytest.raises(ValueError, match="split_programs"):
        StableDiffusion(
            pipe.config, pipe.params, pipe.tokenizer, param_layouts=True, split_programs=True
        )
    laid = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer, param_layouts=True)
    assert not laid.split_programs  # one program when the layouts are chosen


def test_a_compiling_call_says_so_when_progress_is_on(sd1, capfd):
    _, _, pipe = sd1
    pipe = StableDiffusion(pipe.config, pipe.params, pipe.tokenizer)
    kw = dict(steps=2, sampler="lms", seed=1)
    pipe.text_to_image(PROMPTS[:1], progress=False, **kw)
    assert "compiling" not in capfd.readouterr().err
    pipe.text_to_image(PROMPTS[:1], steps=3, sampler="lms", seed=1)  # new: the loop only
    err = capfd.readouterr().err
    assert "jaxdiff: compiling denoise ..." in err and "jaxdiff: compiled in" in err
    pipe.text_to_image(PROMPTS[:1], steps=3, sampler="lms", seed=2)  # nothing new
    assert "compiling" not in capfd.readouterr().err
