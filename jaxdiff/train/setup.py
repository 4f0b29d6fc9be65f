"""Turning a run's ConfigDict into model configs, a tokenizer and step settings.

Two ways to get a model:

* ``model.pretrained`` names a diffusers-format directory: its configs,
  weights and tokenizer are used (fine-tuning);
* otherwise ``model.unet`` / ``model.vae`` / ``model.text_encoder`` /
  ``model.scheduler`` hold the keyword arguments of the config dataclasses,
  and a CLIP-format BPE tokenizer is trained on the dataset's captions and
  written to ``workdir/tokenizer`` (a from-scratch run; a resumed run reuses it).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.autoencoder import AutoencoderConfig
from jaxdiff.models.clip import CLIPTextConfig
from jaxdiff.models.sd import SDConfig
from jaxdiff.models.unet import UNetConfig
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.tokenizer import save_clip_tokenizer
from jaxdiff.train.step import StepConfig
from jaxdiff.train.vae_step import VAEStepConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Model:
    """What a run trains.

    Attributes:
      config: the model configs.
      tokenizer: a transformers ``CLIPTokenizer``.
      tokenizer_dir: the directory it was read from (copied into exports).
      params: pretrained numpy params ``{"unet", "vae", "text_encoder"}``, or None
        for a from-scratch model.
    """

    config: SDConfig
    tokenizer: Any
    tokenizer_dir: Path
    params: dict | None

    @property
    def max_length(self) -> int:
        """Token sequence length fed to the text encoder."""
        return text_length(self.tokenizer, self.config.text_encoder)


def _section(config: Any, key: str) -> dict:
    value = config.get(key) if hasattr(config, "get") else None
    if value is None:
        return {}
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def compute_dtype(name: str) -> Any:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown compute_dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def text_length(tokenizer: Any, text_config: CLIPTextConfig) -> int:
    """Prompt length: the tokenizer's ``model_max_length``, capped by the position table."""
    limit = text_config.max_position_embeddings
    length = getattr(tokenizer, "model_max_length", None) or limit
    # transformers uses a huge sentinel when a tokenizer has no maximum.
    return int(min(length, limit))


def caption_corpus(config: Any, max_captions: int) -> list[str]:
    """Up to ``max_captions`` training captions, identical on every host.

    Every host reads shard 0 of 1 in the same seeded order, so each one trains
    the same tokenizer without communicating.
    """
    from jaxdiff.data import make_dataset

    ds = make_dataset(config, shard_index=0, shard_count=1, num_epochs=1)
    it = iter(ds)
    captions: list[str] = []
    try:
        for batch in itertools.takewhile(lambda _: len(captions) < max_captions, it):
            captions.extend(str(c) for c in batch["caption"])
    finally:
        if hasattr(it, "close"):
            it.close()
    if not captions:
        raise ValueError("the dataset gave no captions to train a tokenizer on")
    return captions[:max_captions]


def tokenizer_for_scratch(config: Any, workdir: str | Path) -> Path:
    """The tokenizer directory of a from-scratch run: ``workdir/tokenizer``.

    Trained on the first ``model.tokenizer.corpus_size`` captions if absent. Only
    process 0 writes into the workdir; the others write the (identical)
    tokenizer to a temporary directory, so no host waits for another.
    """
    target = Path(workdir) / "tokenizer"
    if target.is_dir():
        return target
    tok = _section(config.model, "tokenizer")
    text = _section(config.model, "text_encoder")
    corpus = caption_corpus(config, int(tok.get("corpus_size", 1000)))
    main = jax.process_index() == 0
    # Written beside the target and renamed into place, so another host never reads
    # a half-written directory (it finds either nothing, and trains its own, or all).
    tmp = Path(tempfile.mkdtemp(prefix="tokenizer.tmp-", dir=workdir if main else None))
    save_clip_tokenizer(
        tmp,
        corpus,
        num_merges=int(tok.get("num_merges", 200)),
        max_length=int(text.get("max_position_embeddings", 77)),
    )
    if not main:
        return tmp
    tmp.rename(target)
    return target


def scratch_config(config: Any, tokenizer: Any) -> SDConfig:
    """Model configs from ``config.model.*``; the text encoder's token ids come from the tokenizer.

    ``model.text_encoder.vocab_size`` 0 means the tokenizer's size; a fixed larger
    size keeps shapes (and compiled steps) unchanged when the captions change.
    """
    m = config.model
    text = _section(m, "text_encoder")
    vocab = int(text.pop("vocab_size", 0) or 0)
    if vocab and vocab < len(tokenizer):
        raise ValueError(
            f"model.text_encoder.vocab_size={vocab} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    text.update(
        vocab_size=vocab or len(tokenizer),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    return SDConfig(
        unet=UNetConfig(**_section(m, "unet")),
        vae=AutoencoderConfig(**_section(m, "vae")),
        text_encoder=CLIPTextConfig(**text),
        scheduler=SchedulerConfig(**_section(m, "scheduler")),
    )


REQUIRED_KEYS = (
    "seed",
    "batch_size",
    "total_steps",
    "save_every",
    "log_every",
    "mesh.data",
    "mesh.fsdp",
    "data.source",
    "model.pretrained",
    "optimizer.lr",
    "optimizer.warmup_steps",
    "optimizer.schedule",
    "optimizer.weight_decay",
    "optimizer.clip_norm",
    "optimizer.accumulation_steps",
    "ema.decay",
    "ema.warmup",
    "train.trainable",
    "train.compute_dtype",
    "train.snr_gamma",
    "train.noise_offset",
    "train.cond_dropout",
    "train.remat",
    "vae_train.steps",
)


def check_config(config: Any) -> None:
    """Fails fast, before any JAX work, on a config the trainer cannot run.

    Raises:
      ValueError: naming the missing key or the bad value.
    """
    for key in REQUIRED_KEYS:
        node = config
        for part in key.split("."):
            if not hasattr(node, "get") or part not in node:
                raise ValueError(f"config has no {key!r}")
            node = node[part]
    compute_dtype(str(config.train.compute_dtype))
    for name in ("batch_size", "save_every", "log_every"):
        if int(config[name]) < 1:
            raise ValueError(f"config {name}={config[name]} must be >= 1")
    for name in ("total_steps", "vae_train.steps"):
        value = int(config.vae_train.steps if "." in name else config[name])
        if value < 0:
            raise ValueError(f"config {name}={value} must be >= 0")
    pretrained = str(config.model.pretrained or "")
    if pretrained and not (Path(pretrained) / "model_index.json").is_file():
        raise ValueError(f"model.pretrained={pretrained!r} is not a diffusers-format directory")
    specs = ("unet", "vae", "text_encoder", "scheduler")
    missing = [k for k in specs if not _section(config.model, k)]
    if not pretrained and missing:
        raise ValueError(
            f"model.pretrained is empty and config.model has no {missing} section(s): give a "
            "diffusers-format directory (--config.model.pretrained=DIR) or the model's sizes"
        )
    data = config.data
    if bool(config.train.get("cache_latents", False)):
        from jaxdiff.train.latent_cache import check_cacheable

        check_cacheable(data)
    from jaxdiff.train.final_eval import check_eval_config

    check_eval_config(config)
    if data.source == "folder" and not data.get("path"):
        raise ValueError("data.source='folder' needs data.path (the image folder)")
    if data.source == "tfds" and not data.get("tfds_name"):
        raise ValueError("data.source='tfds' needs data.tfds_name")


def build_model(config: Any, workdir: str | Path) -> Model:
    """The model a config asks for: pretrained (``model.pretrained``) or from scratch.

    Args:
      config: the run's config.
      workdir: the run directory (holds a from-scratch run's tokenizer).

    Returns:
      A :class:`Model`.
    """
    from transformers import CLIPTokenizer

    pretrained = str(config.model.get("pretrained", "") or "")
    if pretrained:
        from jaxdiff.weights.pretrained import load_pretrained

        sd_config, params = load_pretrained(pretrained)
        tok_dir = Path(pretrained) / "tokenizer"
        return Model(sd_config, CLIPTokenizer.from_pretrained(tok_dir), tok_dir, params)
    tok_dir = tokenizer_for_scratch(config, workdir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    return Model(scratch_config(config, tokenizer), tokenizer, tok_dir, None)


def step_config(config: Any, model: Model) -> StepConfig:
    """The diffusion step's static settings from ``config.train`` and ``config.ema``."""
    t = config.train
    null_ids: tuple[int, ...] = ()
    if float(t.cond_dropout) > 0:
        from jaxdiff.train.data import tokenize

        null_ids = tuple(int(i) for i in tokenize(model.tokenizer, [""], model.max_length)[0])
    decay = float(config.ema.decay)
    return StepConfig(
        trainable=tuple(str(n) for n in t.trainable),
        compute_dtype=compute_dtype(str(t.compute_dtype)),
        snr_gamma=float(t.snr_gamma) if t.snr_gamma else None,
        noise_offset=float(t.noise_offset),
        cond_dropout=float(t.cond_dropout),
        null_ids=null_ids,
        ema_decay=decay if decay > 0 else None,
        ema_warmup=bool(config.ema.warmup),
        remat=bool(t.remat),
        sample_posterior=bool(t.get("sample_posterior", True)),
    )


def vae_step_config(config: Any) -> VAEStepConfig:
    """The autoencoder step's static settings from ``config.vae_train`` and ``config.ema``."""
    v = config.vae_train
    decay = float(v.get("ema_decay", 0.0) or 0.0)
    return VAEStepConfig(
        kl_weight=float(v.kl_weight),
        recon_loss=str(v.recon_loss),
        ema_decay=decay if decay > 0 else None,
        ema_warmup=bool(config.ema.warmup),
        compute_dtype=compute_dtype(str(config.train.compute_dtype)),
    )


def with_scaling_factor(config: SDConfig, std: float) -> SDConfig:
    """The configs with ``vae.scaling_factor = 1 / std``, rounded to 4 significant digits.

    Latent diffusion scales latents to unit variance (SD's 0.18215 is this
    estimate for its VAE). Rounding makes the value identical however the
    reduction was ordered (one host or many), so runs stay reproducible.
    """
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"cannot set the latent scaling factor from a latent std of {std}")
    factor = float(f"{1.0 / std:.4g}")
    return dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=factor))
