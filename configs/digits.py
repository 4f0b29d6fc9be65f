"""Text-to-image Stable Diffusion from scratch on scikit-learn's handwritten digits.

    jaxdiff train --config configs/digits.py --workdir runs/digits
    jaxdiff train --config configs/digits.py:tiny --workdir /tmp/tiny   # < 1 min on 2 CPU cores

Two phases, as latent diffusion is trained: first the KL autoencoder
(``vae_train.steps``), then a small CLIP-architecture text encoder and the
conditional UNet together against the frozen autoencoder (``total_steps``).
The tokenizer is a BPE learned from the captions ("a handwritten digit 7",
"the number seven", ...). The latents of the 1497 training digits are encoded
once after the autoencoder phase (``train.cache_latents``). At the end the
exported model is sampled and judged (``eval``): ``samples/final_grid.png``
(one row per digit) and ``report.json`` (accuracy under a classifier trained on
real digits, Fréchet distance to the real test digits in its feature space).

Variants: "" (the full run: 32x32 digits, latents 4x4x4, about 13 minutes on
2 CPU cores) and "tiny" (the same code path at toy size: a few dozen steps,
16x16 digits, still with EMA, checkpoints, export and the report).
"""

import ml_collections

SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    clip_sample=False,
    # Few-step DDIM starts from the last training timestep (Lin et al. 2023, Table 2).
    timestep_spacing="trailing",
    class_name="DDIMScheduler",
)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The digits run; ``variant`` is "" or "tiny"."""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r} of configs/digits.py; valid: '', 'tiny'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64  # global, over all hosts
    c.total_steps = 2_500  # diffusion phase
    c.log_every = 100
    c.save_every = 500
    c.sample_every = 0  # the final grid (eval) shows the end result
    c.keep_checkpoints = 3
    c.async_checkpoints = True

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**14))
    # Empty/zero: from the JAXDIFF_* environment variables (or a single process).
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1)
    )
    # None: the source's default (see jaxdiff.data.make_dataset). Other sources need
    # path (folder; tfds data_dir), tfds_name, image_key, caption_key, caption_template.
    c.data = ml_collections.ConfigDict(
        dict(
            source="digits",
            split="train",
            resolution=32,
            random_flip=False,
            center_crop=None,
            path=None,
            tfds_name=None,
            image_key=None,
            caption_key=None,
            caption_template=None,
            num_threads=None,
            # Shards each host reads (process_count * this in all); a one-host run with
            # 2 reads the same examples as a two-host run with 1.
            shards_per_process=1,
        )
    )

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a diffusers-format directory to fine-tune instead
    c.model.unet = ml_collections.ConfigDict(
        dict(
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            num_heads=(4, 4),
            cross_attention_dim=64,
            norm_num_groups=16,
            sample_size=4,
        )
    )
    c.model.vae = ml_collections.ConfigDict(
        dict(
            # Four levels: a factor of 8, 32x32 digits -> 4x4x4 latents.
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
    )
    c.model.text_encoder = ml_collections.ConfigDict(
        dict(
            vocab_size=0,  # 0: the tokenizer's size
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
        )
    )
    c.model.scheduler = ml_collections.ConfigDict(SD_SCHEDULE)
    c.model.tokenizer = ml_collections.ConfigDict(dict(num_merges=200, corpus_size=2000))

    # Phase 1: the autoencoder.
    c.vae_train = ml_collections.ConfigDict(
        dict(
            steps=600,
            lr=2e-3,
            warmup_steps=50,
            kl_weight=1e-6,
            recon_loss="l1",
            ema_decay=0.0,
            auto_scaling_factor=True,  # vae.scaling_factor = 1 / std(latents) after phase 1
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=200,
            schedule="cosine",
            weight_decay=0.0,
            clip_norm=1.0,
            accumulation_steps=1,
            mu_dtype="float32",  # AdamW's first moment; "bfloat16" halves its memory
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))
    c.train = ml_collections.ConfigDict(
        dict(
            trainable=("unet", "text_encoder"),
            compute_dtype="float32",
            snr_gamma=5.0,  # 0: plain MSE
            noise_offset=0.0,
            cond_dropout=0.1,
            remat=False,
            sample_posterior=True,
            # Encode the (fixed) training images once with the frozen VAE: their posterior
            # mode, so sample_posterior no longer applies. Needs no random flips or crops.
            cache_latents=True,
        )
    )
    c.sample = ml_collections.ConfigDict(
        dict(
            prompts=tuple(f"a handwritten digit {d}" for d in range(10)),
            sampler="ddim",
            steps=20,
            guidance_scale=2.0,
            seed=0,
            resolution=0,  # 0: data.resolution
        )
    )
    # After the export: sample it and print the quality report (jaxdiff.train.final_eval).
    c.eval = ml_collections.ConfigDict(
        dict(
            kind="digits",  # "" for none
            prompt="a handwritten digit {d}",
            samples_per_prompt=50,
            sampler="ddim",
            steps=20,
            guidance_scale=2.0,
            seed=0,
            grid_columns=10,
            classifier_path="",  # "": workdir/digit_classifier.msgpack
            classifier_steps=400,
        )
    )
    c.debug = ml_collections.ConfigDict(dict(log_batch_hashes=False))

    if variant == "tiny":
        _tiny(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """Toy sizes: 16x16 digits, one-level UNet, two-level VAE, one-layer text encoder."""
    c.batch_size = 8
    c.total_steps = 30
    c.log_every = 5
    c.save_every = 20
    c.sample_every = 0
    c.data.resolution = 16
    c.model.unet.update(
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        num_heads=(2,),
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    )
    c.model.vae.update(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    c.model.text_encoder.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    c.model.tokenizer.update(num_merges=60, corpus_size=400)
    c.vae_train.update(steps=10, lr=2e-3, warmup_steps=2)
    c.optimizer.update(lr=2e-3, warmup_steps=5, schedule="constant")
    c.ema.decay = 0.99
    c.sample.update(prompts=("a handwritten digit 3", "the number seven"), steps=5)
    # The whole report on a 10 x 2 grid, judged by a classifier trained for a few steps.
    c.eval.update(samples_per_prompt=2, steps=5, classifier_steps=20)
