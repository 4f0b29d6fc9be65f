"""Tiny random Stable Diffusion models built with the PyTorch reference.

diffusers 0.42.1 + transformers build the three networks at a tiny config with
seeded random weights; ``save_pretrained`` writes a diffusers-format directory
exactly like a real SD checkpoint, which jaxdiff then loads. Nothing is
downloaded: the tokenizer is a small BPE trained on the fly in CLIP's format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jaxdiff.tokenizer import save_clip_tokenizer

CORPUS = [
    "a photo of a cat",
    "a watercolour painting of a lighthouse",
    "a handwritten digit seven",
    "blurry, low quality",
    "an astronaut riding a horse on the moon",
] * 2

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def unet_kwargs(kind: str) -> dict:
    """UNet2DConditionModel kwargs for an SD-1-like, SD-2-like or inpainting tiny model."""
    base = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    if kind == "sd2":
        base.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            cross_attention_dim=48,
        )
    if kind == "inpaint":
        base.update(in_channels=9)
    return base


def vae_kwargs() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def clip_kwargs(kind: str, vocab_size: int, eos_token_id: int) -> dict:
    hidden = 48 if kind == "sd2" else 32
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if kind == "sd2" else "quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_tiny_sd(
    directory: str | Path,
    kind: str = "sd1",
    scheduler: str = "PNDMScheduler",
    seed: int = 0,
    deterministic_vae: bool = False,
    vae_scaling_factor: float = 0.18215,
):
    """Save a tiny random diffusers StableDiffusion(Inpaint)Pipeline to ``directory``.

    Args:
      kind: "sd1" (conv proj, quick_gelu, epsilon), "sd2" (linear proj, head-dim
        list, upcast attention, gelu text encoder, v_prediction) or "inpaint"
        (9-channel UNet).
      scheduler: the diffusers scheduler class name written to scheduler_config.json.
      deterministic_vae: make the VAE posterior's std ~3e-7 (logvar bias -30), so a
        posterior sample equals its mean and runs that sample it with different RNGs
        (torch's generator, our keys) still compare exactly.
      vae_scaling_factor: the VAE's latent scale. SD's 0.18215 gives trained-VAE latents
        unit variance; a random tiny VAE needs a larger one for that (about 4.5).

    Returns:
      The diffusers pipeline object (PyTorch), for reference runs.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    tok_dir = save_clip_tokenizer(
        directory.parent / f"{directory.name}_tokenizer_src", CORPUS, num_merges=60
    )
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_kwargs(kind))
    vae = diffusers.AutoencoderKL(**vae_kwargs(), scaling_factor=vae_scaling_factor)
    eos = tokenizer.eos_token_id
    # A non-legacy eos id (!= 2) makes CLIP pool at the first eos token, as SD 2.x configs do.
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_kwargs(kind, len(tokenizer), eos)))
    _perturb(unet, vae, text_encoder)
    if deterministic_vae:
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -30.0
    sched_cfg = dict(SD15_SCHEDULER)
    if kind == "sd2":
        sched_cfg["prediction_type"] = "v_prediction"
    sched = getattr(diffusers, scheduler).from_config(sched_cfg)
    cls = (
        diffusers.StableDiffusionInpaintPipeline
        if kind == "inpaint"
        else diffusers.StableDiffusionPipeline
    )
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


@torch.no_grad()
def _perturb(*modules) -> None:
    """Give zero-initialised layers (diffusers zeroes conv_out-like layers) random values.

    A model whose output layer is all zeros would make parity tests pass trivially.
    """
    gen = torch.Generator().manual_seed(1234)
    for module in modules:
        for name, p in module.named_parameters():
            if torch.count_nonzero(p) == 0 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def tiling_unet_case(seed: int = 0):
    """A tiny SD 1.x UNet (diffusers, every tensor random) whose 8x8 maps and 64 / 128
    channels split into the Pallas kernels' tiles at batch 2, its jaxdiff config and
    params, and inputs: ``(torch_model, config, params, (x NCHW, t, context))``."""
    import warnings

    import diffusers
    import numpy as np

    from jaxdiff.models.unet import UNetConfig, unet_abstract_params
    from jaxdiff.weights.common import state_dict_to_params

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=16,
            sample_size=8,
        ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    config = UNetConfig.from_diffusers(dict(model.config))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = state_dict_to_params(state, unet_abstract_params(config))
    rng = np.random.default_rng(seed + 5)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    return model, config, params, (x, np.array([10, 900], np.int64), ctx)


def torch_unet_output(model, inputs):
    """``model``'s sample (a numpy array, NCHW) for ``inputs`` (x NCHW, t, context)."""
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in inputs)).sample.numpy()
