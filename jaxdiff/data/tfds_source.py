"""TensorFlow Datasets through `tfds.data_source` (random access, no TensorFlow).

The dataset must already be prepared in `data_dir` (ArrayRecord format, e.g.
by `tfds build --file_format=array_record` on a machine with TensorFlow).
Captions come from a text feature, or from a class label turned into text by
a template ("a photo of a {name}").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxdiff.data.pipeline import build_pipeline
from jaxdiff.data.transforms import preprocess

CaptionFn = Callable[[Any], str]


def label_names(source: Any, key: str) -> Sequence[str] | None:
    """Class names of feature `key` if it is a tfds ClassLabel, else None."""
    info = getattr(source, "dataset_info", None)
    try:
        return list(info.features[key].names)
    except (AttributeError, KeyError, TypeError):
        return None


def make_caption_fn(template: str | CaptionFn | None, names: Sequence[str] | None) -> CaptionFn:
    """Turns a caption feature value into a string.

    Args:
      template: None (text as is; labels as their class name), a format string
        with "{label}" (the integer) and/or "{name}" (the class name), or a
        function value -> str.
      names: class names for integer labels, if known.

    Returns:
      A function from the raw feature value to str.
    """
    if callable(template):
        return template

    def caption(value: Any) -> str:
        value = value.item() if isinstance(value, np.ndarray) else value
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, str):
            return value if template is None else template.format(name=value, label=value)
        label = int(value)
        name = names[label] if names is not None and 0 <= label < len(names) else str(label)
        return name if template is None else template.format(label=label, name=name)

    return caption


def tfds_dataset(
    name: str,
    batch_size: int,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    caption_key: str = "label",
    caption_template: str | CaptionFn | None = None,
    resolution: int = 512,
    seed: int = 0,
    center_crop: bool = True,
    random_flip: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 8,
) -> grain.IterDataset:
    """Batches of (image, caption) from a prepared tfds dataset.

    Args:
      name: tfds name, e.g. "mnist" or "oxford_flowers102:2.1.1".
      batch_size: examples per batch on this host.
      split: tfds split string ("train", "test[:10%]", ...).
      data_dir: where the prepared dataset lives (default: tfds' default).
      image_key: image feature name (uint8 [H, W, C]).
      caption_key: text or class-label feature name.
      caption_template: see `make_caption_fn`.
      resolution: output side length (resize shorter side, then crop).
      seed: shuffling, random crops and flips.
      center_crop: center crop if True, else random crop.
      random_flip: random horizontal flip.
      shuffle, num_epochs, shard_index, shard_count, drop_remainder, num_threads:
        see `pipeline.build_pipeline`.

    Returns:
      grain.IterDataset of {"image": float32 [B, R, R, 3] in [-1, 1], "caption": str [B],
      "index": int64 [B]} (the record's position).
    """
    import tensorflow_datasets as tfds  # heavy import, only when used

    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    if len(source) == 0:
        raise ValueError(f"tfds {name!r} split {split!r} is empty")
    # A wrong feature name is a config error: report it now, not in a reader thread.
    first = source[0]
    for key in (image_key, caption_key):
        if key not in first:
            raise ValueError(f"tfds {name!r} has no feature {key!r}; features: {sorted(first)}")
    caption_fn = make_caption_fn(caption_template, label_names(source, caption_key))

    def example(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = preprocess(
            np.asarray(record[image_key]), resolution, center=center_crop, flip=random_flip, rng=rng
        )
        return {"image": image, "caption": caption_fn(record[caption_key])}

    return build_pipeline(
        source,
        example,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder=drop_remainder,
        num_threads=num_threads,
    )
