"""Fine-tune a converted Stable Diffusion 1.5 (diffusers-format directory) on your images.

    jaxdiff train --config configs/sd15_finetune.py --workdir runs/sd15_pets \
        --config.model.pretrained=/models/sd15 --config.data.path=/data/pets

Variants: "" (an image folder: ``metadata.jsonl`` with ``file_name`` and
``text``) and "tfds" (a prepared tfds dataset with a class label turned into
a caption; set ``data.tfds_name``, ``data.path`` = its data_dir).

Recipe: the UNet trains, text encoder and VAE stay frozen; bf16 activations
with fp32 master weights; parameters and optimizer state sharded over all
devices (FSDP); rematerialised UNet blocks; min-SNR-gamma 5 loss weights;
AdamW 1e-5 with warmup; EMA of the UNet is what gets exported.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The SD 1.5 fine-tuning run; ``variant`` is "" (image folder) or "tfds"."""
    if variant not in ("", "tfds"):
        raise ValueError(
            f"unknown variant {variant!r} of configs/sd15_finetune.py; valid: '', 'tfds'"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 32  # global, over all hosts
    c.total_steps = 15_000
    c.log_every = 20
    c.save_every = 1_000
    c.sample_every = 1_000
    c.keep_checkpoints = 2
    c.async_checkpoints = True

    # Batch over every device; params/optimizer state sharded over all of them too.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, fsdp_min_size=2**14))
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1)
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="folder",
            path=None,  # required: the image folder (or the tfds data_dir)
            split="train",
            resolution=512,
            center_crop=True,
            random_flip=True,
            tfds_name=None,
            image_key=None,
            caption_key=None,
            caption_template=None,
            num_threads=8,
            shards_per_process=1,
        )
    )
    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # required: a diffusers-format SD 1.5 directory
    # Phase 1 (the autoencoder) is for from-scratch models only.
    c.vae_train = ml_collections.ConfigDict(dict(steps=0))

    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            warmup_steps=500,
            schedule="constant",
            weight_decay=1e-2,
            clip_norm=1.0,
            accumulation_steps=1,
            mu_dtype="float32",  # AdamW's first moment; "bfloat16" halves its memory
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))
    c.train = ml_collections.ConfigDict(
        dict(
            trainable=("unet",),
            compute_dtype="bfloat16",
            snr_gamma=5.0,
            noise_offset=0.0,
            cond_dropout=0.1,
            remat=True,
            sample_posterior=True,
        )
    )
    c.sample = ml_collections.ConfigDict(
        dict(
            prompts=("a photo of a cat", "a watercolour painting of a lighthouse"),
            sampler="dpmpp_2m",
            steps=25,
            guidance_scale=7.5,
            seed=0,
            resolution=0,  # 0: data.resolution
        )
    )
    c.debug = ml_collections.ConfigDict(dict(log_batch_hashes=False))

    if variant == "tfds":
        c.data.update(
            source="tfds",
            tfds_name="oxford_flowers102",
            caption_key="label",
            caption_template="a photo of a {name}, a type of flower",
        )
    return c
