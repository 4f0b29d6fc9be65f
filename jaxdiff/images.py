"""Image grids and PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, rows: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image.

    Args:
      images: uint8 [N, H, W, C] (C = 1 or 3).
      rows: grid rows (default: as square as possible); columns follow.
      pad: white border between tiles, in pixels.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    rows = rows or max(1, int(math.floor(math.sqrt(n))))
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, C] array as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3], optionally resized to (width, height)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im)
