"""Grain input pipelines: digits (built in), image folders, tfds.

All yield dicts of numpy arrays {"image": float32 [B, H, W, 3] in [-1, 1],
"caption": str [B], "index": int64 [B]} (the example's position in its
source; digits add "label": int32 [B]), read only this host's
shard, repeat forever reshuffling each epoch, and resume exactly through the
iterator's `get_state()` / `set_state()`.

    ds = make_dataset(config)          # grain.IterDataset
    it = iter(ds)
    batch = next(it)
    state = it.get_state()             # JSON dict -> Checkpointer.save(data_state=...)
"""

from __future__ import annotations

from typing import Any

import grain

from jaxdiff.data.digits import (
    DIGIT_TEMPLATES,
    digit_caption,
    digits_dataset,
    load_digits_arrays,
    split_indices,
)
from jaxdiff.data.folder import folder_dataset, read_metadata
from jaxdiff.data.pipeline import build_pipeline, resolve_shard
from jaxdiff.data.tfds_source import make_caption_fn, tfds_dataset
from jaxdiff.data.transforms import preprocess

__all__ = [
    "DIGIT_TEMPLATES",
    "build_pipeline",
    "digit_caption",
    "digits_dataset",
    "folder_dataset",
    "load_digits_arrays",
    "make_caption_fn",
    "make_dataset",
    "preprocess",
    "read_metadata",
    "resolve_shard",
    "split_indices",
    "tfds_dataset",
]

SOURCES = ("digits", "folder", "tfds")


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return config.to_dict()
    if isinstance(config, dict):
        return config
    raise ValueError(f"make_dataset: config must be a dict or ConfigDict, got {type(config)}")


def _field(section: dict[str, Any], key: str, default: Any) -> Any:
    """section[key], with None (an unset ConfigDict placeholder) meaning `default`."""
    value = section.get(key)
    return default if value is None else value


def make_dataset(
    config: Any,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The training dataset a config asks for.

    Args:
      config: dict or ConfigDict with `batch_size` (global, over all hosts),
        `seed`, and `data` holding `source` ("digits" | "folder" | "tfds") and,
        as the source needs: `path` (folder; tfds data_dir), `tfds_name`,
        `split`, `image_key`, `caption_key`, `caption_template` (tfds),
        `resolution`, `center_crop`, `random_flip`, `num_threads` (decoding
        threads for folder/tfds, default 8).
      shard_index: this host's shard (default `jax.process_index()`).
      shard_count: number of hosts (default `jax.process_count()`).
      num_epochs: None (forever) for training; 1 for one evaluation pass.
      shuffle: shuffle each epoch.
      drop_remainder: drop a final partial batch (only matters with num_epochs).

    Returns:
      grain.IterDataset of per-host batches of batch_size / shard_count examples.

    Raises:
      ValueError: unknown source, missing fields, or a batch size the hosts
        cannot split evenly.
    """
    cfg = _as_dict(config)
    data = cfg.get("data")
    if not isinstance(data, dict):
        raise ValueError("make_dataset: config has no 'data' section")
    source = data.get("source")
    if source not in SOURCES:
        raise ValueError(f"make_dataset: data.source={source!r}; expected one of {SOURCES}")
    if "batch_size" not in cfg:
        raise ValueError("make_dataset: config has no 'batch_size'")
    index, count = resolve_shard(shard_index, shard_count)
    global_batch = int(cfg["batch_size"])
    if global_batch < 1 or global_batch % count:
        raise ValueError(
            f"make_dataset: batch_size={global_batch} is not a positive multiple of the "
            f"{count} hosts"
        )
    common = dict(
        batch_size=global_batch // count,
        seed=int(_field(cfg, "seed", 0)),
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=index,
        shard_count=count,
        drop_remainder=drop_remainder,
    )
    resolution = int(_field(data, "resolution", 32 if source == "digits" else 512))
    flip = bool(_field(data, "random_flip", False))

    if source == "digits":
        return digits_dataset(
            split=_field(data, "split", "train"), resolution=resolution, random_flip=flip, **common
        )
    crops = dict(
        resolution=resolution,
        center_crop=bool(_field(data, "center_crop", True)),
        num_threads=int(_field(data, "num_threads", 8)),
    )
    if source == "folder":
        if not data.get("path"):
            raise ValueError("make_dataset: data.source='folder' needs data.path")
        return folder_dataset(
            data["path"],
            image_key=_field(data, "image_key", "file_name"),
            caption_key=_field(data, "caption_key", "text"),
            random_flip=flip,
            **crops,
            **common,
        )
    if not data.get("tfds_name"):
        raise ValueError("make_dataset: data.source='tfds' needs data.tfds_name")
    return tfds_dataset(
        data["tfds_name"],
        split=_field(data, "split", "train"),
        data_dir=data.get("path") or None,
        image_key=_field(data, "image_key", "image"),
        caption_key=_field(data, "caption_key", "label"),
        caption_template=_field(data, "caption_template", None),
        random_flip=flip,
        **crops,
        **common,
    )
