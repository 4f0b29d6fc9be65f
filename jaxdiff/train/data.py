"""From the grain pipeline to the arrays a train step takes, on each host.

Each process reads ``shards_per_process`` consecutive shards of the data
(shard ``process_index * k + j`` of ``process_count * k``) and concatenates
their batches. With k = 1 that is the usual "each host reads its own shard";
a job on fewer hosts with a larger k reads exactly the examples, in the same
order, that a job on more hosts would, which is how a one-process run
reproduces a multi-host run (and how a job can resume on a smaller slice).

Captions are tokenized here, on the host, into ``input_ids`` padded to the
text encoder's length; only numeric arrays go to the devices.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxdiff.data import make_dataset


class HostBatches:
    """An iterator over this host's batches with a JSON ``get_state`` / ``set_state``.

    Args:
      config: the run's config (``batch_size`` global, ``seed``, ``data``); ``data.
        shards_per_process`` (default 1) sets how many shards this host reads.
      process_index, process_count: this host and the number of hosts (default: JAX's).
      shuffle, num_epochs: as :func:`jaxdiff.data.make_dataset`.
    """

    def __init__(
        self,
        config: Any,
        process_index: int | None = None,
        process_count: int | None = None,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        k = int(config.data.get("shards_per_process", 1) or 1)
        if k < 1:
            raise ValueError(f"data.shards_per_process={k} must be >= 1")
        shards = [index * k + j for j in range(k)]
        self._iters = [
            iter(make_dataset(config, s, count * k, num_epochs=num_epochs, shuffle=shuffle))
            for s in shards
        ]

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iters]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        """JSON-serialisable position of every shard's iterator."""
        return {"shards": [it.get_state() for it in self._iters]}

    def set_state(self, state: dict) -> None:
        """Continues from a ``get_state()`` of an iterator over the same shards."""
        shards = state.get("shards") if isinstance(state, dict) else None
        if not isinstance(shards, list) or len(shards) != len(self._iters):
            raise ValueError(
                f"data iterator state holds {len(shards) if isinstance(shards, list) else '?'} "
                f"shards but this host reads {len(self._iters)} (data.shards_per_process changed?)"
            )
        for it, s in zip(self._iters, shards):
            it.set_state(s)

    def close(self) -> None:
        """Stops the read-ahead threads."""
        for it in self._iters:
            with contextlib.suppress(AttributeError):
                it.close()


def tokenize(tokenizer: Any, captions: Sequence[str], max_length: int) -> np.ndarray:
    """Captions -> int32 token ids [B, max_length] (CLIP: bos, tokens, eos, padding).

    Args:
      tokenizer: a transformers ``CLIPTokenizer``.
      captions: B strings.
      max_length: the text encoder's sequence length; longer captions are truncated.

    Returns:
      int32 [B, max_length].
    """
    out = tokenizer(
        [str(c) for c in captions],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(out["input_ids"], np.int32)


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    """A short hash of a host batch's arrays (keys sorted), to compare data order across runs."""
    h = hashlib.sha1()
    for key in sorted(batch):
        arr = np.ascontiguousarray(batch[key])
        h.update(key.encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]
