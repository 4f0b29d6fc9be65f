"""The scikit-learn handwritten digits (1797 grey 8x8 images, values 0..16).

Shipped inside scikit-learn, so tests and tutorials train a text-to-image
model with no download: images are upscaled to `resolution` and turned RGB,
captions are generated from the label with varied templates, and a fixed
seeded split holds out 300 images for evaluation.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxdiff.data.pipeline import build_pipeline
from jaxdiff.data.transforms import preprocess, resample_filter, to_float

NUM_DIGITS = 1797
NUM_TEST = 300
# The train/test split never depends on the run's seed, so every run and
# every evaluation agrees on which images were held out.
SPLIT_SEED = 20240229

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the numeral, {word}: the English word.
DIGIT_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {word}",
    "a {d}",
    "digit {d}, handwritten",
    "a handwritten {word}",
    "the digit {word}",
    "a picture of the number {d}",
    "{word}, written by hand",
)


def digit_caption(label: int, template: int) -> str:
    """Caption for a digit label with template number `template` (modulo the count)."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label {label} not in 0..9")
    fmt = DIGIT_TEMPLATES[int(template) % len(DIGIT_TEMPLATES)]
    return fmt.format(d=int(label), word=DIGIT_WORDS[int(label)])


def split_indices(split: str) -> np.ndarray:
    """Indices into `sklearn.datasets.load_digits()` for "train" (1497), "test" (300), "all"."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_DIGITS)
    if split == "train":
        return np.sort(perm[NUM_TEST:])
    if split == "test":
        return np.sort(perm[:NUM_TEST])
    if split == "all":
        return np.arange(NUM_DIGITS)
    raise ValueError(f"unknown digits split {split!r}; expected 'train', 'test' or 'all'")


@functools.lru_cache(maxsize=8)
def _load_uint8(split: str, resolution: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """Upscaled grey images uint8 [N, R, R] and labels int32 [N] (cached, read-only)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    idx = split_indices(split)
    filt = resample_filter(resample)
    grey = np.round(raw.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    if resolution == 8:
        images = grey
    else:
        images = np.stack(
            [np.asarray(Image.fromarray(g).resize((resolution, resolution), filt)) for g in grey]
        )
    labels = raw.target[idx].astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits_arrays(
    split: str = "train", resolution: int = 32, resample: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as arrays, for classifiers and metrics.

    Args:
      split: "train" (1497 images), "test" (300) or "all" (1797).
      resolution: output side length (8 keeps the originals).
      resample: "bilinear" or "bicubic" (any PIL filter name).

    Returns:
      images float32 [N, R, R, 3] in [-1, 1] (grey replicated to RGB),
      labels int32 [N].
    """
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be positive")
    images, labels = _load_uint8(split, int(resolution), resample)
    rgb = np.repeat(to_float(images)[..., None], 3, axis=-1)
    return rgb, labels.copy()


def digits_dataset(
    batch_size: int,
    split: str = "train",
    resolution: int = 32,
    seed: int = 0,
    random_flip: bool = False,
    resample: str = "bicubic",
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Batches of digits with generated captions.

    Args:
      batch_size: examples per batch on this host.
      split: "train", "test" or "all" (see `split_indices`).
      resolution: image side length.
      seed: shuffling and caption-template choice.
      random_flip: mirror images (off by default: a mirrored 2 is not a 2).
      resample: upscaling filter, "bilinear" or "bicubic".
      shuffle, num_epochs, shard_index, shard_count, drop_remainder: see
        `pipeline.build_pipeline`.

    Returns:
      grain.IterDataset of {"image": float32 [B, R, R, 3] in [-1, 1],
      "caption": str [B], "label": int32 [B], "index": int64 [B]} (the
      position in the split).
    """
    images, labels = _load_uint8(split, int(resolution), resample)

    def example(i: int, rng: np.random.Generator) -> dict[str, Any]:
        label = int(labels[i])
        return {
            "image": preprocess(images[i], resolution, flip=random_flip, rng=rng),
            "caption": digit_caption(label, int(rng.integers(len(DIGIT_TEMPLATES)))),
            "label": np.int32(label),
        }

    return build_pipeline(
        range(len(labels)),
        example,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder=drop_remainder,
        # Examples are tiny and in memory: threads would only add overhead.
        num_threads=0,
    )
