"""Per-example image transforms on numpy arrays (host side, before batching).

Images enter as uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] and leave as
float32 [R, R, 3] in [-1, 1], the range the VAE and the diffusion loss expect.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(name: str) -> Image.Resampling:
    """PIL filter for a name in {"nearest", "bilinear", "bicubic", "lanczos"}."""
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"unknown resample {name!r}; expected {sorted(_RESAMPLE)}") from None


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Normalises channel layout to RGB.

    Args:
      image: uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped).

    Returns:
      uint8 [H, W, 3].
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def resize_shorter_side(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Scales so the shorter side is `size`, keeping the aspect ratio.

    Args:
      image: uint8 [H, W, C].
      size: target length of the shorter side.
      resample: PIL filter name (PIL antialiases when shrinking).

    Returns:
      uint8 [H', W', C] with min(H', W') == size.
    """
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), resample=resample_filter(resample)))
    return out.reshape(new_h, new_w, image.shape[-1])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Crops the central [size, size] window of an image [H, W, C] (H, W >= size)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Crops a uniformly placed [size, size] window of an image [H, W, C]."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return image[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors an image [H, W, C] left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [..] in [0, 255] -> float32 [..] in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def preprocess(
    image: np.ndarray,
    resolution: int,
    center: bool = True,
    flip: bool = False,
    rng: np.random.Generator | None = None,
    resample: str = "bicubic",
) -> np.ndarray:
    """The training transform: RGB, resize shorter side, crop, maybe flip, scale.

    Args:
      image: uint8 [H, W] or [H, W, 1|3|4].
      resolution: output side length R.
      center: center crop if True, else a random crop (needs `rng`).
      flip: random horizontal flip (needs `rng`). Leave off for text/digits.
      rng: numpy Generator for the random choices.
      resample: PIL filter for the resize.

    Returns:
      float32 [R, R, 3] in [-1, 1].
    """
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be positive")
    if (flip or not center) and rng is None:
        raise ValueError("preprocess: random crop or flip needs an rng")
    image = to_rgb_uint8(image)
    image = resize_shorter_side(image, resolution, resample)
    image = center_crop(image, resolution) if center else random_crop(image, resolution, rng)
    if flip:
        image = random_flip(image, rng)
    return to_float(np.ascontiguousarray(image))
