"""The one grain pipeline every source goes through.

source (random access) -> this host's shard -> shuffle (reshuffled each epoch)
-> repeat -> decode + augment (per-example rng) -> drop failed examples -> batch.

Iterating the returned `grain.IterDataset` gives a `grain.DatasetIterator`
whose `get_state()` is a small JSON dict; `set_state()` on a fresh iterator of
the same dataset continues with identical batches. Every random choice
(shuffle order, crops, flips, caption templates) derives from `seed` and the
example's position, never from global state, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

# Decode/augment: (raw record, rng) -> example dict, or None to skip the record.
ExampleFn = Callable[[Any, np.random.Generator], "dict[str, Any] | None"]


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Fills in (shard_index, shard_count) from the JAX process and checks them.

    Args:
      shard_index: this reader's shard; default `jax.process_index()`.
      shard_count: number of shards; default `jax.process_count()`.

    Returns:
      (shard_index, shard_count).
    """
    index = jax.process_index() if shard_index is None else int(shard_index)
    count = jax.process_count() if shard_count is None else int(shard_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard_index={index} must lie in [0, shard_count={count})")
    return index, count


def _indexed_example(
    example_fn: ExampleFn, item: tuple[int, Any], rng: np.random.Generator
) -> dict[str, Any] | None:
    """``example_fn`` on the record, plus the record's position as "index" (int64)."""
    position, record = item
    example = example_fn(record, rng)
    if example is None:
        return None
    return {**example, "index": np.int64(position)}


def build_pipeline(
    records: Sequence[Any],
    example_fn: ExampleFn,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 8,
) -> grain.IterDataset:
    """Builds a batched, sharded, resumable grain dataset.

    Args:
      records: random-access sequence (len + getitem), e.g. a tfds data source.
      example_fn: (record, rng) -> dict of numpy arrays / str, or None to skip
        the record (a corrupt file): the batch is then filled from the next ones.
      batch_size: examples per batch on this host.
      seed: seeds shuffling and per-example randomness.
      shuffle: shuffle within this shard, differently each epoch.
      num_epochs: None repeats forever (training); 1 for a single pass (evaluation).
      shard_index: this host's shard (default `jax.process_index()`).
      shard_count: number of shards (default `jax.process_count()`). Shards are
        strided (`index::count`) and cut to equal length, so every host yields
        the same number of batches per epoch.
      drop_remainder: drop a final partial batch (only matters with num_epochs).
      num_threads: threads decoding ahead in parallel (0: in the calling thread,
        on demand). Close the iterator (`it.close()`) to stop them.

    Returns:
      A `grain.IterDataset` of batches: each key `example_fn` returns stacked
      along a new leading axis [batch_size, ...] (strings become numpy str
      arrays), plus "index": int64 [batch_size], each example's position in
      `records`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None")
    index, count = resolve_shard(shard_index, shard_count)
    per_shard = len(records) // count
    if per_shard == 0:
        raise ValueError(f"{len(records)} records cannot be split into {count} shards")
    # Independent streams for the order and for the per-example randomness.
    order_seed, example_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    # Each record keeps its position in `records`: examples carry it as "index" (what a
    # per-example cache, e.g. of VAE latents, is keyed by). Downstream of a repeat, grain
    # passes indices past the end (epoch * len + position): hence the modulo.
    n = len(records)
    ds = grain.MapDataset.source(records).map_with_index(lambda i, record: (i % n, record))
    ds = ds[index : per_shard * count : count]
    if shuffle:
        ds = ds.shuffle(seed=order_seed)
    ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
    ds = ds.random_map(functools.partial(_indexed_example, example_fn), seed=example_seed)
    # Records mapped to None are dropped here, before batching, so batches stay full.
    # grain's default read-ahead (500 examples) suits small records; decoded
    # 512px float images are 3 MB each, so read ahead about two batches.
    read = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, num_threads)
    )
    it = ds.to_iter_dataset(read)
    return it.batch(batch_size, drop_remainder=drop_remainder)
