"""VAE latents of a whole (small) dataset, encoded once for the diffusion phase.

The diffusion phase trains against a frozen autoencoder, so an image's latents
never change: re-encoding every batch every step is repeated work, and on
small images it costs about as much as the UNet step itself. With
``train.cache_latents`` the diffusion phase encodes every example of the
source once, before its first step (the posterior mode, scaled as the model's
``vae.scaling_factor`` says), keyed by the example's ``"index"`` (its position
in the source, see :func:`jaxdiff.data.build_pipeline`); its batches then
carry ``"latents"`` instead of ``"pixels"``.

The data iterator is untouched (captions, order and its checkpointed state
are those of an uncached run), and the cache is a deterministic function of
the VAE params and the data, so a resumed run rebuilds exactly the same one.

Caching needs images that do not change between epochs: no random flips or
crops (:func:`check_cacheable`). Every host holds the whole cache, N x h x w x C
float32 (1497 x 4 x 4 x 4 for the digits): meant for small datasets.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff import parallel
from jaxdiff.models.sd import SDConfig, encode_images


def check_cacheable(data: Any) -> None:
    """Raises ValueError when a data config's images differ between epochs.

    Args:
      data: the run's ``config.data`` section.
    """
    if bool(data.get("random_flip") or False):
        raise ValueError(
            "train.cache_latents needs the same image every epoch, but data.random_flip=True "
            "flips at random: turn one of them off"
        )
    center = data.get("center_crop")
    if data.get("source") != "digits" and center is not None and not bool(center):
        raise ValueError(
            "train.cache_latents needs the same image every epoch, but data.center_crop=False "
            "crops at random: turn one of them off"
        )


class LatentCache:
    """Latents by example index.

    Args:
      latents: float32 [N, h, w, C], row i the latents of the example with index i.
      present: bool [N], which rows were encoded (a source may skip unreadable records).
    """

    def __init__(self, latents: np.ndarray, present: np.ndarray):
        if latents.shape[:1] != present.shape:
            raise ValueError(f"latents {latents.shape} and present {present.shape} disagree")
        self.latents = latents
        self.present = present

    def __len__(self) -> int:
        return int(self.present.sum())

    def lookup(self, index: np.ndarray) -> np.ndarray:
        """Latents [B, h, w, C] of the examples with the given indices [B].

        Raises:
          KeyError: for an index that was not encoded (the data changed after caching).
        """
        index = np.asarray(index, np.int64)
        inside = (index >= 0) & (index < self.present.shape[0])
        known = np.zeros_like(inside)
        known[inside] = self.present[index[inside]]
        if not known.all():
            missing = sorted(int(i) for i in index[~known])[:5]
            raise KeyError(
                f"no cached latents for example index {missing} (the cache holds {len(self)} "
                "examples): did the data change after the cache was built?"
            )
        return self.latents[index]


def build_latent_cache(
    config: Any, vae_params: Any, sd_config: SDConfig, mesh: Mesh
) -> LatentCache:
    """Encodes every example of the run's data source with the (frozen) VAE.

    Every host reads the whole source once, in order, in chunks of the global
    batch size; each chunk is encoded on the mesh like a training batch (each
    host supplies its slice) and the result replicated back to every host.

    Args:
      config: the run's config (``data``, ``batch_size``, ``seed``).
      vae_params: the VAE params, as placed for training.
      sd_config: the model configs with the final latent scaling factor.
      mesh: the device mesh.

    Returns:
      A :class:`LatentCache` holding the scaled posterior mode of every example.
    """
    from jaxdiff.data import make_dataset

    check_cacheable(config.data)
    batch = int(config.batch_size)
    count, me = jax.process_count(), jax.process_index()
    per_host = batch // count
    encode = jax.jit(
        lambda p, x: encode_images(p, x, sd_config), out_shardings=parallel.replicated(mesh)
    )
    ds = make_dataset(
        config, shard_index=0, shard_count=1, num_epochs=1, shuffle=False, drop_remainder=False
    )
    it = iter(ds)
    indices, chunks = [], []
    try:
        for b in it:
            images = np.asarray(b["image"], np.float32)
            n = images.shape[0]
            # The last chunk may be short: padded with copies of its last image, then cut.
            padded = np.concatenate([images, np.repeat(images[-1:], batch - n, axis=0)])
            local = padded[me * per_host : (me + 1) * per_host]
            x = parallel.host_batch_to_global({"pixels": local}, mesh)["pixels"]
            chunks.append(np.asarray(encode(vae_params, x).addressable_data(0))[:n])
            indices.append(np.asarray(b["index"], np.int64))
    finally:
        with contextlib.suppress(AttributeError):
            it.close()
    if not chunks:
        raise ValueError("train.cache_latents: the data source gave no examples to encode")
    index = np.concatenate(indices)
    encoded = np.concatenate(chunks)
    size = int(index.max()) + 1
    latents = np.zeros((size, *encoded.shape[1:]), np.float32)
    present = np.zeros((size,), bool)
    latents[index] = encoded
    present[index] = True
    return LatentCache(latents, present)
