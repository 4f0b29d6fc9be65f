"""CPU benchmark: jaxdiff against diffusers-Flax 0.39 and diffusers 0.42 (PyTorch), side by side.

All three contenders run the SAME random weights on the SAME inputs, fp32:
diffusers/transformers (PyTorch) build a small SD-shaped model with a seeded
random init and save it in diffusers format; jaxdiff loads that directory with
its own converter, and the diffusers-Flax 0.39 worker (in the venv that
``benchmarks/setup_peer.sh`` builds) converts the same safetensors with
diffusers' and transformers' own PyTorch-to-Flax converters, without torch.

Items, each timed in every contender, interleaved (one call of each contender in
turn, the order rotating every repeat), medians reported:

  unet_b2, unet_b8  UNet forward at batch 2 and 8 (32x32 latents, 77 text tokens)
  vae_decode        VAE decode of a batch of latents to 256x256 images
  train_step        one UNet training step: frozen CLIP, UNet forward + backward,
                    global-norm clipping and AdamW (batch 4, cached latents)
  t2i_20            text-to-image end to end: tokenize, CLIP, 20 DDIM steps with
                    classifier-free guidance (7.5), VAE decode, uint8 images

Compile time is the first call's time minus the steady-state median (for
PyTorch, which compiles nothing, the same number is its first-call overhead).
The UNet, VAE and end-to-end outputs are compared across contenders (max |diff|)
so the timings are known to be of the same computation.

Contender ``jaxdiff_cores`` is jaxdiff again in a worker with one XLA host device
per core (``--xla_force_host_platform_device_count``): the same calls with their
batches split over the devices (a user's choice on a CPU host; see README
"Speed"). The peers run as their users would, on one device.

``--processes N`` starts N worker processes per contender and sends the timed calls
to them in turn (pooled medians): separate processes of one contender differ by up
to ~10 % here, enough to decide a goal that sits on the line. It multiplies the memory
too: two processes of all four contenders ran the 24 GiB machine out of memory in
diffusers-Flax's train step; name fewer contenders or items.

Run:  python -m benchmarks.cpu [--repeats 5] [--processes 2] [--out benchmarks/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python benchmarks/cpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402

# "candidate" is jaxdiff imported from another directory (--candidate), e.g. a patched
# copy: measured in the same interleaved run, it gives a change's before/after.
# "jaxdiff_cores" is jaxdiff with one XLA host device per core (the worker's
# --xla_force_host_platform_device_count): batches split over the cores, and one image's
# guidance pair split in two. XLA:CPU runs many of the UNet's convolutions and matmuls
# on one thread (benchmarks/NOTES.md), so two devices keep both cores busy.
CONTENDERS = ("jaxdiff", "jaxdiff_cores", "candidate", "flax039", "torch")
OURS = ("jaxdiff", "jaxdiff_cores", "candidate")
ITEMS = ("unet_b2", "unet_b8", "vae_decode", "train_step", "t2i_20")
SLOW_ITEMS = ("train_step", "t2i_20")
# Items with a goal: jaxdiff time / peer time must be at most this.
GOALS = {
    "flax039": {"unet_b2": 0.8, "unet_b8": 0.8, "train_step": 0.8, "t2i_20": 0.8},
    "torch": {"unet_b2": 1.0, "unet_b8": 1.0, "train_step": 1.0, "t2i_20": 1.0},
}
DEFAULT_VENV = common.REPO / ".bench" / "venv-flax039"
PROMPTS = [
    "a photo of a cat",
    "a watercolour painting of a lighthouse at dusk",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
]

# Model sizes. "small" is SD-shaped (four levels, cross-attention in the first
# three, two resnets per level) but ~1/25 of SD 1.5's width, so a CPU run is
# minutes; "tiny" is for the smoke test only. Flax 0.39's UNet hard-codes
# GroupNorm(32), so "small" keeps 32 groups everywhere.
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8,  # diffusers' name for the number of heads
            cross_attention_dim=256,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 128, 128),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
        ),
        "clip": dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        "batches": {"unet_b2": 2, "unet_b8": 8, "vae_decode": 2, "train_step": 4, "t2i_20": 1},
    },
    "tiny": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=16,
        ),
        "clip": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        "batches": {"unet_b2": 2, "unet_b8": 8, "vae_decode": 2, "train_step": 4, "t2i_20": 1},
    },
}
STEPS = 20
GUIDANCE = 7.5
LR = 1e-4
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


# ---------------------------------------------------------------- model and inputs


def prepare(directory: Path, config: str = "small", seed: int = 0) -> dict:
    """Build the random model with diffusers (PyTorch) and write it plus the inputs.

    Writes ``directory/model`` (a diffusers-format StableDiffusionPipeline
    directory with a DDIM scheduler), ``directory/inputs.npz`` (NCHW arrays)
    and ``directory/spec.json``. Returns the spec.
    """
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxdiff.tokenizer import save_clip_tokenizer

    cfg = CONFIGS[config]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = save_clip_tokenizer(directory / "tokenizer_src", PROMPTS * 3, num_merges=200)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"], scaling_factor=0.18215)
    eos = tokenizer.eos_token_id
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **cfg["clip"],
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    # Layers that start constant (norm scales 1, biases 0) get a little noise, so every
    # parameter influences the outputs the contenders are compared on.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    scheduler = diffusers.DDIMScheduler.from_config(SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "model", safe_serialization=True)

    rng = np.random.default_rng(seed)
    b = cfg["batches"]
    lat = cfg["unet"]["sample_size"]
    d = cfg["unet"]["cross_attention_dim"]
    arrays: dict[str, np.ndarray] = {}
    for item in ("unet_b2", "unet_b8"):
        n = b[item]
        arrays[f"{item}_x"] = rng.standard_normal((n, 4, lat, lat), np.float32)
        arrays[f"{item}_t"] = np.linspace(1, 981, n).astype(np.int32)
        arrays[f"{item}_ctx"] = rng.standard_normal((n, 77, d), np.float32)
    arrays["vae_decode_z"] = rng.standard_normal((b["vae_decode"], 4, lat, lat), np.float32)
    nt = b["train_step"]
    arrays["train_step_latents"] = rng.standard_normal((nt, 4, lat, lat), np.float32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(nt)]
    arrays["train_step_ids"] = np.asarray(
        tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids,
        np.int32,
    )
    arrays["t2i_20_noise"] = rng.standard_normal((b["t2i_20"], 4, lat, lat), np.float32)
    np.savez(directory / "inputs.npz", **arrays)
    spec = {
        "config": config,
        "seed": seed,
        "batches": b,
        "latent_size": lat,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "t2i_prompts": [PROMPTS[i % len(PROMPTS)] for i in range(b["t2i_20"])],
        "unet_params": int(sum(p.numel() for p in unet.parameters())),
        "vae_params": int(sum(p.numel() for p in vae.parameters())),
        "clip_params": int(sum(p.numel() for p in text_encoder.parameters())),
        "models": {k: cfg[k] for k in ("unet", "vae", "clip")},
    }
    (directory / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def _uint8(images01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images01, 0.0, 1.0) * 255).astype(np.uint8)


# ---------------------------------------------------------------- contenders
#
# Each contender builds, once, a zero-argument function per item that runs one
# call and returns its output; ``finish`` turns that output into a numpy array in
# a common layout (NHWC latents/images, uint8 images for t2i) for the agreement
# check. Only the call itself is timed.


class JaxdiffBench:
    name = "jaxdiff"

    def __init__(self, directory: Path):
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from transformers import CLIPTokenizer

        import jaxdiff
        from jaxdiff.models.autoencoder import vae_decode
        from jaxdiff.models.sd import apply_unet
        from jaxdiff.pipeline import StableDiffusion
        from jaxdiff.train import optim
        from jaxdiff.train.step import StepConfig, init_state, jit_train_step, make_train_step
        from jaxdiff.weights.pretrained import load_pretrained

        self.jax = jax
        spec = json.loads((directory / "spec.json").read_text())
        inputs = dict(np.load(directory / "inputs.npz"))
        config, params = load_pretrained(directory / "model")
        self.versions = {"jax": jax.__version__, "jaxdiff": str(Path(jaxdiff.__file__).parent)}
        self.devices = len(jax.devices())
        # One device: everything on it, as before. Several (jaxdiff_cores): params
        # replicated, batches split over the devices where they divide.
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        split = NamedSharding(mesh, PartitionSpec("data"))
        params = jax.device_put(params, replicated)

        def jnp_batch(a: np.ndarray) -> jax.Array:
            return jax.device_put(a, split if a.shape[0] % self.devices == 0 else replicated)

        unet_fn = jax.jit(apply_unet, static_argnames=("config", "dtype", "remat"))
        fns: dict[str, Any] = {}
        for item in ("unet_b2", "unet_b8"):
            x = jnp_batch(_nhwc(inputs[f"{item}_x"]))
            t = jnp_batch(inputs[f"{item}_t"])
            ctx = jnp_batch(inputs[f"{item}_ctx"])
            fns[item] = lambda x=x, t=t, ctx=ctx: unet_fn(params["unet"], x, t, ctx, config)

        dec = jax.jit(vae_decode, static_argnames=("config", "dtype"))
        z = jnp_batch(_nhwc(inputs["vae_decode_z"]))
        fns["vae_decode"] = lambda: dec(params["vae"], z, config.vae)

        # Train step: the UNet trains; CLIP and the VAE are frozen; no EMA (the peers
        # keep none); cached latents, so the VAE encoder is not part of the step.
        tx = optim.make_optimizer(
            optim.trainable_labels({"unet": params["unet"]}, ("unet",)),
            optax.constant_schedule(LR),
            weight_decay=1e-2,
            clip_norm=1.0,
        )
        step_cfg = StepConfig(trainable=("unet",), ema_decay=None)
        # A copy: the state is donated each step, and the inference items keep using params.
        train_params = jax.tree.map(jnp.copy, params)
        # Placed as the step's outputs will be (replicated NamedSharding): a state with
        # other shardings (e.g. init's uncommitted scalars) made the second call
        # compile the step again (~40 s).
        state_box = [
            jax.device_put(init_state(train_params, tx, step_cfg, jax.random.key(0)), replicated)
        ]
        # Jitted as the training loop jits it: the state donated, the frozen params read.
        step = jit_train_step(make_train_step(config, step_cfg, tx), step_cfg.trainable)
        batch = {
            "latents": jnp_batch(_nhwc(inputs["train_step_latents"])),
            "input_ids": jnp_batch(inputs["train_step_ids"]),
        }
        # A key of its own: state.rng is donated with the state on every call.
        step_rng = jax.random.key(1)

        def train_step():
            state_box[0], metrics = step(state_box[0], batch, step_rng)
            return state_box[0], metrics

        fns["train_step"] = train_step

        tokenizer = CLIPTokenizer.from_pretrained(directory / "model" / "tokenizer")
        # Same numbers, no copies: the pipeline keeps its own (replicated) params.
        pipe = StableDiffusion(config, params, tokenizer, dtype=jnp.float32)
        noise = _nhwc(inputs["t2i_20_noise"])
        prompts = spec["t2i_prompts"]
        fns["t2i_20"] = lambda: pipe.text_to_image(
            prompts,
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            sampler="ddim",
            latents=noise,
            progress=False,
        )
        self.fns = fns

    def sync(self, out: Any) -> None:
        self.jax.block_until_ready(out)

    def finish(self, item: str, out: Any) -> np.ndarray | None:
        if item == "train_step":
            return np.asarray(out[1]["loss"])
        return np.asarray(out)


class TorchBench:
    name = "torch"

    def __init__(self, directory: Path, threads: int):
        import diffusers
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.versions = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        }
        spec = json.loads((directory / "spec.json").read_text())
        inputs = {k: torch.from_numpy(v) for k, v in np.load(directory / "inputs.npz").items()}
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            directory / "model", safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        unet, vae, text_encoder = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval()

        fns: dict[str, Any] = {}
        for item in ("unet_b2", "unet_b8"):
            x, ctx = inputs[f"{item}_x"], inputs[f"{item}_ctx"]
            t = inputs[f"{item}_t"].long()

            def run(x=x, t=t, ctx=ctx):
                with torch.inference_mode():
                    return unet(x, t, encoder_hidden_states=ctx).sample

            fns[item] = run

        def decode(z=inputs["vae_decode_z"]):
            with torch.inference_mode():
                return vae.decode(z).sample

        fns["vae_decode"] = decode

        # A separate UNet copy trains, so the inference items keep the saved weights.
        train_unet = diffusers.UNet2DConditionModel.from_pretrained(directory / "model" / "unet")
        train_unet.train()
        opt = torch.optim.AdamW(
            train_unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
        )
        noise_sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
        latents, ids = inputs["train_step_latents"], inputs["train_step_ids"].long()
        gen = torch.Generator().manual_seed(0)

        def train_step():
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_sched.add_noise(latents, noise, t)
            with torch.no_grad():
                ctx = text_encoder(ids)[0]
            pred = train_unet(noisy, t, encoder_hidden_states=ctx).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        fns["train_step"] = train_step

        noise = inputs["t2i_20_noise"]
        prompts = spec["t2i_prompts"]

        def t2i():
            with torch.inference_mode():
                return pipe(
                    prompts,
                    num_inference_steps=spec["steps"],
                    guidance_scale=spec["guidance_scale"],
                    latents=noise,
                    output_type="np",
                ).images

        fns["t2i_20"] = t2i
        self.fns = fns

    def sync(self, out: Any) -> None:
        pass  # CPU tensors are ready when the call returns

    def finish(self, item: str, out: Any) -> np.ndarray | None:
        if item == "t2i_20":
            return _uint8(np.asarray(out))
        a = out.detach().numpy()
        return a if item == "train_step" else _nhwc(a)


class _Numpy:
    """A numpy array that answers ``.numpy()``, as diffusers' converter expects of a tensor."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def numpy(self) -> np.ndarray:
        return self.a


def _check_same_keys(name: str, converted: Any, reference: Any) -> None:
    from flax.traverse_util import flatten_dict

    got, want = flatten_dict(dict(converted)), flatten_dict(dict(reference))
    missing, extra = set(want) - set(got), set(got) - set(want)
    if missing or extra:
        raise ValueError(
            f"{name}: converted weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for k in want:
        if got[k].shape != want[k].shape:
            raise ValueError(f"{name}: {k} has shape {got[k].shape}, expected {want[k].shape}")


class Flax039Bench:
    """diffusers-Flax 0.39 with transformers 4.57's FlaxCLIPTextModel (run in its own venv)."""

    name = "flax039"

    def __init__(self, directory: Path):
        import diffusers
        import flax
        import jax
        import jax.numpy as jnp
        import transformers
        from diffusers import (
            FlaxAutoencoderKL,
            FlaxDDIMScheduler,
            FlaxDDPMScheduler,
            FlaxStableDiffusionPipeline,
            FlaxUNet2DConditionModel,
        )
        from diffusers.models.modeling_flax_pytorch_utils import (
            convert_pytorch_state_dict_to_flax as diffusers_pt_to_flax,
        )
        from flax.jax_utils import replicate
        from safetensors.numpy import load_file
        from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel
        from transformers.modeling_flax_pytorch_utils import (
            convert_pytorch_state_dict_to_flax as transformers_pt_to_flax,
        )

        from benchmarks.flax039_train import diffusers_flax_train_step

        self.jax = jax
        self.versions = {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
        self.devices = len(jax.devices())
        spec = json.loads((directory / "spec.json").read_text())
        inputs = dict(np.load(directory / "inputs.npz"))
        model_dir = directory / "model"

        def diffusers_model(cls, sub: str):
            cfg = json.loads((model_dir / sub / "config.json").read_text())
            model = cls.from_config(cfg)
            sd = load_file(model_dir / sub / "diffusion_pytorch_model.safetensors")
            params = diffusers_pt_to_flax({k: _Numpy(v) for k, v in sd.items()}, model)
            _check_same_keys(sub, params, model.init_weights(jax.random.PRNGKey(0)))
            return model, jax.device_put(params)

        unet, unet_params = diffusers_model(FlaxUNet2DConditionModel, "unet")
        vae, vae_params = diffusers_model(FlaxAutoencoderKL, "vae")
        text_encoder = FlaxCLIPTextModel(
            CLIPTextConfig.from_pretrained(model_dir / "text_encoder"), seed=0
        )
        sd = load_file(model_dir / "text_encoder" / "model.safetensors")
        # transformers v5 saves CLIPTextModel's keys without v4's "text_model." prefix.
        sd = {
            (k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in sd.items()
            if not k.endswith("position_ids")
        }
        text_params = transformers_pt_to_flax(sd, text_encoder)
        _check_same_keys("text_encoder", text_params, text_encoder.params)
        text_params = jax.device_put(text_params)

        fns: dict[str, Any] = {}
        unet_fn = jax.jit(
            lambda p, x, t, c: unet.apply({"params": p}, x, t, encoder_hidden_states=c).sample
        )
        for item in ("unet_b2", "unet_b8"):
            x, t, ctx = (jnp.asarray(inputs[f"{item}_{k}"]) for k in ("x", "t", "ctx"))
            fns[item] = lambda x=x, t=t, ctx=ctx: unet_fn(unet_params, x, t, ctx)

        dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
        z = jnp.asarray(inputs["vae_decode_z"])
        fns["vae_decode"] = lambda: dec(vae_params, z)

        # The train step of diffusers' examples/text_to_image/train_text_to_image_flax.py.
        tx, step_fn = diffusers_flax_train_step(
            unet, text_encoder, text_params, FlaxDDPMScheduler.from_config(SCHEDULER), LR
        )
        train_params = jax.tree.map(jnp.copy, unet_params)
        state_box = [(train_params, tx.init(train_params), jnp.zeros((), jnp.int32))]
        step = jax.jit(step_fn, donate_argnums=0)
        batch = {
            "latents": jnp.asarray(inputs["train_step_latents"]),
            "input_ids": jnp.asarray(inputs["train_step_ids"]),
        }
        step_rng = jax.random.PRNGKey(1)

        def train_step():
            state_box[0], loss = step(state_box[0], batch, step_rng)
            return state_box[0], loss

        fns["train_step"] = train_step

        # The pipeline's documented fast path: jit=True (pmap over the local devices).
        # transformers v5 saved model/tokenizer as tokenizer.json only; v4's slow
        # CLIPTokenizer reads the vocab.json + merges.txt it was built from.
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer_src")
        scheduler = FlaxDDIMScheduler.from_config(SCHEDULER)
        pipe = FlaxStableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe_params = replicate(
            {
                "unet": unet_params,
                "vae": vae_params,
                "text_encoder": text_params,
                "scheduler": scheduler.create_state(),
            }
        )
        prompts = spec["t2i_prompts"]
        noise = jnp.asarray(inputs["t2i_20_noise"])[None]
        seeds = jax.random.split(jax.random.PRNGKey(0), 1)

        def t2i():
            ids = pipe.prepare_inputs(prompts)[None]
            return pipe(
                ids,
                pipe_params,
                seeds,
                num_inference_steps=spec["steps"],
                guidance_scale=spec["guidance_scale"],
                latents=noise,
                jit=True,
            ).images

        fns["t2i_20"] = t2i
        self.fns = fns

    def sync(self, out: Any) -> None:
        self.jax.block_until_ready(out)

    def finish(self, item: str, out: Any) -> np.ndarray | None:
        if item == "train_step":
            return np.asarray(out[1])
        if item == "t2i_20":
            a = np.asarray(out)
            return _uint8(a.reshape(-1, *a.shape[2:]))
        return _nhwc(np.asarray(out))


# ---------------------------------------------------------------- worker side


def _worker_main(name: str, directory: Path, threads: int, jaxdiff_path: str | None) -> None:
    if jaxdiff_path:  # a candidate copy of the package instead of the installed one
        sys.path.insert(0, jaxdiff_path)
    bench: Any = None

    def handle(req: dict) -> dict:
        nonlocal bench
        cmd = req["cmd"]
        if cmd == "setup":
            t0 = time.perf_counter()
            if name in OURS:
                bench = JaxdiffBench(directory)
            elif name == "torch":
                bench = TorchBench(directory, threads)
            elif name == "flax039":
                bench = Flax039Bench(directory)
            else:
                raise ValueError(f"unknown contender {name!r}")
            return {
                "setup_s": time.perf_counter() - t0,
                "versions": bench.versions,
                "devices": getattr(bench, "devices", None),
            }
        item = req["item"]
        fn = bench.fns[item]
        seconds, out = common.timed(fn, bench.sync)
        reply: dict[str, Any] = {"time_s": seconds}
        if req.get("save"):
            arr = bench.finish(item, out)
            path = directory / f"out_{name}_{item}.npy"
            np.save(path, arr)
            reply["output"] = str(path)
        return reply

    common.serve(handle)


# ---------------------------------------------------------------- driver side


def _agreement(outputs: dict[str, dict[str, str]], items) -> dict[str, dict[str, Any]]:
    """Max |a - b| of each item's outputs between every pair of contenders."""
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        if item == "train_step":  # the contenders draw different noise: not comparable
            continue
        have = {c: np.load(p) for c, p in outputs.get(item, {}).items()}
        names = [c for c in CONTENDERS if c in have]
        pairs: dict[str, Any] = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                x, y = have[a].astype(np.float64), have[b].astype(np.float64)
                if x.shape != y.shape:
                    pairs[f"{a}-{b}"] = f"shape {x.shape} vs {y.shape}"
                    continue
                scale = max(float(np.max(np.abs(y))), 1e-12)
                pairs[f"{a}-{b}"] = {
                    "max_abs_diff": float(np.max(np.abs(x - y))),
                    "max_abs_ref": scale,
                }
        if pairs:
            result[item] = pairs
    return result


def _report(results: dict, items, agreement: dict) -> tuple[str, list, dict]:
    """The table, its rows (for NOTES.md), and the goal verdicts."""
    med = {c: {i: results[c]["items"].get(i, {}).get("median_s") for i in items} for c in results}
    comp = {c: {i: results[c]["items"].get(i, {}).get("compile_s") for i in items} for c in results}
    present = [c for c in CONTENDERS if c in results]
    ours = [c for c in OURS if c in results]
    peers = [c for c in present if c not in OURS]
    pairs = [(a, b) for a in ours for b in peers]
    pairs += [(a, "jaxdiff") for a in ours if a != "jaxdiff" and "jaxdiff" in ours]
    headers = ["item"] + present + [f"{a}/{b}" for a, b in pairs]

    def row(label: str, table: dict, i: str) -> list[str]:
        cells = [common.fmt_s(table[c][i]) for c in present]
        ratios = [common.fmt_x(common.ratio(table[a][i], table[b][i])) for a, b in pairs]
        return [label, *cells, *ratios]

    rows = [row(i, med, i) for i in items] + [row(f"compile {i}", comp, i) for i in items]
    goals: dict[str, Any] = {}
    for us in ours:
        for peer, targets in GOALS.items():
            for item, limit in targets.items():
                if item not in items:
                    continue
                r = common.ratio(med[us].get(item), med.get(peer, {}).get(item))
                key = f"{item} vs {peer}" + ("" if us == "jaxdiff" else f" ({us})")
                goals[key] = {"ratio": r, "limit": limit, "met": None if r is None else r <= limit}
    text = common.table(headers, rows)
    lines = [text, "", "goals (our time / peer time):"]
    for k, g in goals.items():
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        lines.append(f"  {k:40s} {common.fmt_x(g['ratio']):>7s}  <= {g['limit']:.1f}x  {verdict}")
    lines.append("")
    lines.append("agreement (max |diff|; t2i in uint8 levels):")
    for item, by_pair in agreement.items():
        for pair, v in by_pair.items():
            if isinstance(v, dict):
                lines.append(
                    f"  {item:12s} {pair:20s} {v['max_abs_diff']:.3g} "
                    f"(outputs up to {v['max_abs_ref']:.3g})"
                )
            else:
                lines.append(f"  {item:12s} {pair:20s} {v}")
    return "\n".join(lines), [headers] + rows, goals


def run(args: argparse.Namespace) -> dict:
    items = [i for i in ITEMS if not args.items or i in args.items]
    contenders = [c for c in CONTENDERS if not args.contenders or c in args.contenders]
    if not args.candidate and "candidate" in contenders:
        contenders.remove("candidate")
    threads = args.threads or os.cpu_count() or 1
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jaxdiff-bench-"))
    venv_python = Path(args.peer_venv) / "bin" / "python"
    notes: list[str] = []
    if "flax039" in contenders and not venv_python.exists():
        notes.append(f"flax039 skipped: no {venv_python} (run bash benchmarks/setup_peer.sh)")
        contenders.remove("flax039")

    t0 = time.perf_counter()
    print(f"building the {args.config} model in {work} ...", flush=True)
    spec = prepare(work, args.config, args.seed)
    print(
        f"  UNet {spec['unet_params'] / 1e6:.1f}M, VAE {spec['vae_params'] / 1e6:.1f}M, "
        f"CLIP {spec['clip_params'] / 1e6:.1f}M params ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    env = common.worker_env(threads)
    # OpenMP's default spin-waiting collapses on a shared machine: with 2 threads on 2
    # cores and one core taken by another process, a diffusers UNet call went from
    # 0.41 s to 8.3 s (measured here); PASSIVE waiting keeps torch at its 1-thread speed.
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    # Several worker processes per contender (--processes): one process's speed moves by
    # up to ~10 % from the next one's (allocator and thread placement), which a single
    # process per contender turns into a contender's difference. The timed calls go to
    # the processes in turn and are pooled.
    workers: dict[str, list[common.Worker]] = {}
    for c in contenders:
        python = str(venv_python) if c == "flax039" else sys.executable
        argv = [python, "-m", "benchmarks.cpu", "--worker", c, "--workdir", str(work)]
        argv += ["--threads", str(threads)]
        if c == "candidate":
            argv += ["--jaxdiff-path", str(Path(args.candidate).resolve())]
        worker_env = dict(env)
        if c == "jaxdiff_cores":
            flags = worker_env.get("XLA_FLAGS", "")
            worker_env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={threads}"
        workers[c] = [
            common.Worker(c, argv, work / f"worker_{c}_{k}.log", worker_env)
            for k in range(args.processes)
        ]
    meter = common.LoadMeter(lambda: [w.proc.pid for ws in workers.values() for w in ws])

    results: dict[str, dict] = {}
    outputs: dict[str, dict[str, str]] = {}
    load: dict[str, Any] = {}
    try:
        for c, ws in list(workers.items()):
            print(f"setting up {c} ...", flush=True)
            replies = [w.call(cmd="setup") for w in ws]
            r = next((x for x in replies if "error" in x), replies[0])
            if "error" in r:
                print(f"  {c} failed: {r.get('traceback', r['error'])}", flush=True)
                notes.append(f"{c} skipped: setup failed: {r['error']}")
                for w in ws:
                    w.close()
                del workers[c]
                continue
            results[c] = {
                "setup_s": r["setup_s"],
                "versions": r["versions"],
                "devices": r["devices"],
                "items": {},
            }
        for item in items:
            n = args.repeats_slow if item in SLOW_ITEMS else args.repeats
            meter.start()
            firsts: dict[str, float] = {}
            times: dict[str, list[float]] = {c: [] for c in workers}
            for c, ws in workers.items():
                # The first call (compile) in every process; the first process's output
                # is the one compared with the other contenders'.
                replies = [w.call(cmd="call", item=item, save=k == 0) for k, w in enumerate(ws)]
                r = next((x for x in replies if "error" in x), replies[0])
                if "error" in r:
                    print(f"  {item}/{c} failed: {r['error']}", flush=True)
                    results[c]["items"][item] = {"error": r["error"]}
                    continue
                firsts[c] = r["time_s"]
                outputs.setdefault(item, {})[c] = r["output"]
            order = [c for c in workers if c in firsts]
            for rep in range(n * args.processes):
                k = rep % max(len(order), 1)
                for c in order[k:] + order[:k]:
                    ws = workers[c]
                    r = ws[rep % len(ws)].call(cmd="call", item=item)
                    if "error" not in r:
                        times[c].append(r["time_s"])
            load[item] = meter.read()
            for c in order:
                s = common.summarize(times[c])
                s["first_call_s"] = firsts[c]
                if s["n"]:
                    s["compile_s"] = max(firsts[c] - s["median_s"], 0.0)
                results[c]["items"][item] = s
            cells = "  ".join(
                f"{c} {common.fmt_s(results[c]['items'][item].get('median_s'))}" for c in order
            )
            print(
                f"{item:11s} {cells}   (others used {load[item]['others_cores']:.2f} cores)",
                flush=True,
            )
    finally:
        for ws in workers.values():
            for w in ws:
                w.close()

    agreement = _agreement(outputs, items)
    text, rows, goals = _report(results, items, agreement)
    host = common.host_info()
    report = {
        "benchmark": "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": host,
        "threads": threads,
        "omp_wait_policy": args.omp_wait_policy,
        "candidate": args.candidate,
        "repeats": {"fast": args.repeats, "slow": args.repeats_slow},
        "processes": args.processes,
        "spec": spec,
        "results": results,
        "agreement": agreement,
        "goals": goals,
        "load": load,
        "notes": notes,
        "table": rows,
        "wall_s": time.perf_counter() - t0,
    }
    print()
    print(text)
    others = [v["others_cores"] for v in load.values()]
    if others:
        print(
            f"\nbackground load: other processes kept {min(others):.2f}-{max(others):.2f} of "
            f"{os.cpu_count()} cores busy while items ran (load average {host['loadavg_at_start']})"
        )
    for note in notes:
        print("note:", note)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, default=4, help="timed calls per fast item")
    p.add_argument("--repeats-slow", type=int, default=2, help="timed calls of train/t2i")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes per contender; each takes the repeats (pooled)",
    )
    p.add_argument("--items", nargs="*", choices=ITEMS, help="subset of items (default all)")
    p.add_argument("--contenders", nargs="*", choices=CONTENDERS, help="subset (default all)")
    p.add_argument("--peer-venv", default=str(DEFAULT_VENV), help="diffusers-Flax 0.39 venv")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for the workers ('' leaves the environment's)",
    )
    p.add_argument(
        "--candidate",
        help="also run jaxdiff imported from this directory (a patched copy) as 'candidate'",
    )
    p.add_argument("--jaxdiff-path", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.REPO / "benchmarks" / "results" / "cpu.json"))
    p.add_argument("--workdir", help="keep model, inputs, outputs and worker logs here")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        threads = args.threads or os.cpu_count() or 1
        _worker_main(args.worker, Path(args.workdir), threads, args.jaxdiff_path)
        return
    run(args)


if __name__ == "__main__":
    main()
