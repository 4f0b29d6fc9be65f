"""A folder of images with captions, in the Hugging Face "imagefolder" layout.

    folder/
      metadata.jsonl     one JSON object per line: {"file_name": "a.png", "text": "..."}
      a.png
      sub/b.jpg          (file_name may include sub-directories)

A file that cannot be decoded is reported with a warning naming its path and
skipped; the batch is filled from the following files, so training never
stops mid-epoch on one bad image.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxdiff.data.pipeline import build_pipeline
from jaxdiff.data.transforms import preprocess

METADATA_FILE = "metadata.jsonl"


def read_metadata(
    folder: str | os.PathLike, image_key: str = "file_name", caption_key: str = "text"
) -> list[tuple[str, str]]:
    """Reads `folder/metadata.jsonl` into (absolute image path, caption) pairs.

    Args:
      folder: the dataset directory.
      image_key: JSON field holding the image path relative to `folder`.
      caption_key: JSON field holding the caption.

    Returns:
      A list of (path, caption) in file order.

    Raises:
      ValueError: if the metadata file is missing, empty, or a line is not
        JSON or lacks a field (the line number is given).
    """
    folder = Path(folder)
    meta = folder / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"image folder {folder}: no {METADATA_FILE} found")
    records = []
    with meta.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{meta}:{lineno}: expected a JSON object")
            for key in (image_key, caption_key):
                if key not in entry:
                    raise ValueError(f"{meta}:{lineno}: missing field {key!r}")
            records.append((str(folder / entry[image_key]), str(entry[caption_key])))
    if not records:
        raise ValueError(f"{meta}: no entries")
    return records


def load_image(path: str) -> np.ndarray:
    """Decodes an image file to uint8 [H, W, 3] (palette, grey, CMYK, 16-bit -> RGB).

    Raises:
      OSError, ValueError, ...: whatever PIL raises for a missing or broken file.
    """
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))  # alpha, if any, is dropped


def folder_dataset(
    folder: str | os.PathLike,
    batch_size: int,
    resolution: int = 512,
    seed: int = 0,
    center_crop: bool = True,
    random_flip: bool = False,
    image_key: str = "file_name",
    caption_key: str = "text",
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 8,
) -> grain.IterDataset:
    """Batches of (image, caption) from an imagefolder directory.

    Args:
      folder: directory with `metadata.jsonl` and the images.
      batch_size: examples per batch on this host.
      resolution: output side length (resize shorter side, then crop).
      seed: shuffling, random crops and flips.
      center_crop: center crop if True, else random crop.
      random_flip: random horizontal flip.
      image_key, caption_key: metadata field names.
      shuffle, num_epochs, shard_index, shard_count, drop_remainder, num_threads:
        see `pipeline.build_pipeline`.

    Returns:
      grain.IterDataset of {"image": float32 [B, R, R, 3] in [-1, 1], "caption": str [B],
      "index": int64 [B]} (the record's position).
    """
    records = read_metadata(folder, image_key, caption_key)
    # Each bad file is reported once, not once per epoch. The counts make a
    # folder where nothing decodes fail loudly instead of spinning forever
    # looking for a good image (racy under threads; fine for a threshold).
    reported: set[str] = set()
    seen = {"ok": 0, "bad": 0}

    def example(record: tuple[str, str], rng: np.random.Generator) -> dict[str, Any] | None:
        path, caption = record
        try:
            image = load_image(path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            seen["bad"] += 1
            if seen["ok"] == 0 and seen["bad"] >= len(records):
                raise ValueError(f"image folder {folder}: no image could be decoded") from e
            if path not in reported:
                reported.add(path)
                warnings.warn(
                    f"skipping image {path}: cannot decode ({type(e).__name__}: {e})",
                    RuntimeWarning,
                    stacklevel=1,
                )
            return None
        seen["ok"] += 1
        image = preprocess(image, resolution, center=center_crop, flip=random_flip, rng=rng)
        return {"image": image, "caption": caption}

    return build_pipeline(
        records,
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
