"""Quality report for text-to-image models trained on the embedded digits set.

Two numbers judge samples generated for the prompts "a handwritten digit 0" ... "9":

- conditional accuracy: the share of generated images that a classifier trained
  on real digits assigns to the prompted digit, printed beside the classifier's
  own accuracy on the held-out real test split (the ceiling a perfect generator
  would reach);
- a Fréchet distance (the FID formula, Heusel et al. 2017, eq. 6) between the
  generated images and the held-out real test digits, computed in the
  classifier's penultimate feature space, printed beside the distance between
  300 real *train* digits and the same 300 test digits (the value a generator
  that reproduced the data distribution exactly would score at this sample size).

The classifier is a small CNN trained here in a few seconds with optax, on the
train split only, with random shifts so that slightly off-centre samples are
still read correctly. Its parameters can be cached to a file (`load_or_train`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxdiff.data.digits import NUM_TEST, load_digits_arrays

NUM_CLASSES = 10
FEATURE_DIM = 64
# Seed of the fixed train subset that gives the real-vs-real reference distance.
REFERENCE_SEED = 0
# Bumped whenever the architecture or the training recipe changes, so that a
# cached classifier from an older recipe is retrained instead of silently used.
CLASSIFIER_VERSION = 1
# Images go through the classifier in fixed-size chunks: one compilation for any N.
_CHUNK = 256


# ------------------------------------------------------------------ classifier


class DigitCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels, each halving the side) and a 64-wide dense layer.

    The input is first average-pooled to 16x16: the digits were 8x8 before
    upscaling, so nothing is lost, and every conv costs a quarter as much.

    Input: float32 [B, R, R, 1] grey in [-1, 1] (R a multiple of 16).
    Output: (logits [B, 10], features [B, FEATURE_DIM]).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = x.shape[1] // 16
        if f > 1:
            x = nn.avg_pool(x, (f, f), strides=(f, f))
        for width in (16, 32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(FEATURE_DIM)(x))
        return nn.Dense(NUM_CLASSES)(feats), feats


_MODEL = DigitCNN()
# Adam's direction only; the learning rate is applied in the step as a traced value.
_ADAM = optax.scale_by_adam()


@jax.jit
def _apply(params: Any, grey: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _MODEL.apply({"params": params}, grey)


def _to_grey(images: np.ndarray, resolution: int) -> np.ndarray:
    """Images in any accepted form -> float32 [N, R, R, 1] grey in [-1, 1].

    Args:
      images: uint8 in [0, 255] or float in [-1, 1]; [N, H, W], [N, H, W, 1] or
        [N, H, W, 3].
      resolution: the classifier's side length R; other sizes are resized
        (bilinear, antialiased when shrinking).

    Returns:
      float32 [N, R, R, 1]: the channel mean, clipped to [-1, 1].
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected images [N, H, W], [N, H, W, 1] or [N, H, W, 3], got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("images contain NaN or infinite values")
        # A little overshoot is normal for decoded samples; [0, 1] or [0, 255]
        # floats would be a silent wrong answer, so they are refused instead.
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < -1.5 or hi > 1.5:
            raise ValueError(
                f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "pass uint8 for [0, 255]"
            )
    else:
        raise ValueError(f"images must be uint8 or float, got dtype {images.dtype}")
    grey = np.clip(x.mean(axis=-1, keepdims=True), -1.0, 1.0)
    if grey.shape[1:3] != (resolution, resolution):
        shape = (grey.shape[0], resolution, resolution, 1)
        grey = np.asarray(jax.image.resize(grey, shape, "linear", antialias=True))
    return grey


@dataclasses.dataclass(frozen=True, eq=False)
class DigitClassifier:
    """A trained digit classifier: params plus the functions that read images with them.

    Attributes:
      params: the DigitCNN params pytree.
      resolution: side length the network reads; other sizes are resized.
      test_accuracy: accuracy on the held-out real test split (300 images).
      seed: training seed.
      steps: training steps.
    """

    params: Any
    resolution: int
    test_accuracy: float
    seed: int
    steps: int

    def logits_and_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features in one pass.

        Args:
          images: uint8 [0, 255] or float [-1, 1], [N, H, W(, 1|3)].

        Returns:
          logits float32 [N, 10], features float32 [N, FEATURE_DIM].
        """
        grey = _to_grey(images, self.resolution)
        n = grey.shape[0]
        logits, feats = [], []
        for start in range(0, n, _CHUNK):
            chunk = grey[start : start + _CHUNK]
            pad = _CHUNK - chunk.shape[0]
            chunk = np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)), constant_values=-1.0)
            lg, ft = _apply(self.params, jnp.asarray(chunk))
            logits.append(np.asarray(lg)[: _CHUNK - pad])
            feats.append(np.asarray(ft)[: _CHUNK - pad])
        if not logits:
            return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(logits), np.concatenate(feats)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Class logits.

        Args:
          images: uint8 [0, 255] or float [-1, 1], [N, H, W(, 1|3)].

        Returns:
          float32 [N, 10].
        """
        return self.logits_and_features(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted digits.

        Args:
          images: uint8 [0, 255] or float [-1, 1], [N, H, W(, 1|3)].

        Returns:
          int32 [N] in 0..9.
        """
        return self.logits(images).argmax(axis=-1).astype(np.int32)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate activations, the space the Fréchet distance is measured in.

        Args:
          images: uint8 [0, 255] or float [-1, 1], [N, H, W(, 1|3)].

        Returns:
          float32 [N, FEATURE_DIM].
        """
        return self.logits_and_features(images)[1]


def _shift(grey: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Moves each image by a uniform integer offset in [-max_shift, max_shift]^2.

    Pixels shifted in are background (-1), not wrapped around.
    """
    n, r = grey.shape[0], grey.shape[1]
    padded = jnp.pad(
        grey,
        ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
        constant_values=-1.0,
    )
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)

    def crop(img: jax.Array, off: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (r, r, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("batch_size", "max_shift"), donate_argnums=(0, 1))
def _train_step(
    params: Any,
    opt_state: optax.OptState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: jax.Array,
    lr: jax.Array,
    *,
    batch_size: int,
    max_shift: int,
) -> tuple[Any, optax.OptState, jax.Array]:
    """One Adam step; data stay on device and the batch is drawn inside from (key, step).

    The learning rate is a traced argument, so one compilation serves any
    schedule and any number of steps.
    """
    key = jax.random.fold_in(key, step)
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
    x = _shift(images[idx], k_shift, max_shift)
    y = labels[idx]

    def loss_fn(p):
        logits, _ = _MODEL.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss


def train_digit_classifier(
    seed: int = 0,
    resolution: int = 32,
    steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    max_shift: int | None = None,
) -> DigitClassifier:
    """Trains the digit CNN on the real train split (1497 images).

    Deterministic for a given seed (on a given backend). Adam with a cosine
    decay; each step draws a batch with replacement and shifts every image by
    up to `max_shift` pixels, so off-centre samples are still read correctly.

    Args:
      seed: init, batch and augmentation randomness.
      resolution: side length of the images the network reads (a multiple of 16).
      steps: optimisation steps (400 at batch 128 is ~34 epochs, a few seconds).
      batch_size: images per step.
      learning_rate: peak Adam learning rate.
      max_shift: largest shift in pixels; default resolution // 10 (3 at 32,
        three quarters of one original 8x8 pixel).

    Returns:
      The trained DigitClassifier, with its accuracy on the test split.
    """
    if resolution % 16 or resolution < 16:
        raise ValueError(f"resolution={resolution} must be a positive multiple of 16")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if max_shift is None:
        max_shift = resolution // 10
    train_x, train_y = load_digits_arrays("train", resolution)
    images = jnp.asarray(_to_grey(train_x, resolution))
    labels = jnp.asarray(train_y)

    key = jax.random.PRNGKey(seed)
    k_init, k_data = jax.random.split(key)
    params = _MODEL.init(k_init, images[:1])["params"]
    opt_state = _ADAM.init(params)
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    for i in range(steps):
        lr = np.float32(schedule(i))
        params, opt_state, loss = _train_step(
            params,
            opt_state,
            images,
            labels,
            k_data,
            np.int32(i),
            lr,
            batch_size=batch_size,
            max_shift=max_shift,
        )
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"digit classifier training diverged: final loss {loss}")
    params = jax.tree.map(np.asarray, params)
    return _with_test_accuracy(params, resolution, seed, steps)


def _with_test_accuracy(params: Any, resolution: int, seed: int, steps: int) -> DigitClassifier:
    clf = DigitClassifier(params, resolution, float("nan"), seed, steps)
    test_x, test_y = load_digits_arrays("test", resolution)
    acc = float(np.mean(clf.predict(test_x) == test_y))
    return dataclasses.replace(clf, test_accuracy=acc)


def _meta(seed: int, resolution: int, steps: int) -> dict[str, int]:
    return {"version": CLASSIFIER_VERSION, "seed": seed, "resolution": resolution, "steps": steps}


def save_classifier(clf: DigitClassifier, path: str | os.PathLike) -> None:
    """Writes the classifier's params and recipe to `path` (msgpack), atomically.

    Args:
      clf: a trained classifier.
      path: destination file; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize(
        {"params": clf.params, "meta": _meta(clf.seed, clf.resolution, clf.steps)}
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def load_or_train(
    path: str | os.PathLike | None, seed: int = 0, resolution: int = 32, steps: int = 400
) -> DigitClassifier:
    """The classifier cached at `path`, or a freshly trained one (then cached there).

    A cache file is used only when it was written by the same recipe (version,
    seed, resolution, steps); otherwise, or when it cannot be read, the
    classifier is retrained and the file overwritten. The test accuracy is
    always recomputed, so what is printed is measured, not stored.

    Args:
      path: cache file, or None to always train without caching.
      seed, resolution, steps: as for `train_digit_classifier`.

    Returns:
      DigitClassifier.
    """
    if path is not None and Path(path).is_file():
        try:
            state = serialization.msgpack_restore(Path(path).read_bytes())
            meta = {k: int(v) for k, v in state["meta"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            meta = None  # unreadable or foreign file: retrain and overwrite
        if meta == _meta(seed, resolution, steps):
            return _with_test_accuracy(state["params"], resolution, seed, steps)
    clf = train_digit_classifier(seed=seed, resolution=resolution, steps=steps)
    if path is not None:
        save_classifier(clf, path)
    return clf


# ------------------------------------------------------------------ Fréchet distance


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of feature vectors, in float64.

    Args:
      feats: [N, D] with N >= 2.

    Returns:
      mu [D], sigma [D, D].
    """
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected features [N, D] with N >= 2, got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features contain NaN or infinite values")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], -1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negatives clipped to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}). S_a S_b is not
    symmetric, but it is similar to M = S_a^{1/2} S_b S_a^{1/2}, which is
    symmetric PSD, so Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(M)). Two
    symmetric eigendecompositions in float64 are stable for near-singular
    covariances, where a general matrix square root (scipy.linalg.sqrtm)
    returns complex round-off.

    Args:
      mu_a, mu_b: means [D].
      sigma_a, sigma_b: covariances [D, D] (symmetric PSD).

    Returns:
      The distance, >= 0.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu_a {mu_a.shape}, sigma_a {sigma_a.shape}, "
            f"mu_b {mu_b.shape}, sigma_b {sigma_b.shape}"
        )
    root_a = _psd_sqrt(sigma_a)
    m = root_a @ sigma_b @ root_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu_a - mu_b
    dist = float(diff @ diff) + float(np.trace(sigma_a) + np.trace(sigma_b)) - 2.0 * tr_sqrt
    # The exact value is >= 0; round-off can push identical sets a hair below.
    return max(dist, 0.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    Args:
      feats_a: [N_a, D] features, N_a >= 2.
      feats_b: [N_b, D] features, N_b >= 2.

    Returns:
      The distance (float64 computation), >= 0.
    """
    mu_a, sigma_a = gaussian_stats(feats_a)
    mu_b, sigma_b = gaussian_stats(feats_b)
    return frechet_distance_gaussians(mu_a, sigma_a, mu_b, sigma_b)


# ------------------------------------------------------------------ report


def reference_train_subset(n: int = NUM_TEST, resolution: int = 32) -> np.ndarray:
    """A fixed random subset of `n` real train images (seed REFERENCE_SEED), float [-1, 1].

    Args:
      n: subset size; the default equals the test split so that the reference
        distance has the same small-sample bias as a 300-vs-300 comparison.
      resolution: image side length.

    Returns:
      float32 [n, R, R, 3].
    """
    images, _ = load_digits_arrays("train", resolution)
    idx = np.sort(np.random.default_rng(REFERENCE_SEED).choice(len(images), n, replace=False))
    return images[idx]


def digits_report(
    generated: np.ndarray, labels: np.ndarray, classifier: DigitClassifier
) -> dict[str, Any]:
    """Scores images generated for digit prompts against the real held-out digits.

    The reference distance compares 300 real train images (a fixed subset, see
    `reference_train_subset`) with the 300 real test images: what a generator
    matching the data distribution would score. The classifier was fitted on
    train images, so their features sit a little closer to its decision
    structure than unseen images do; the reference is therefore a slightly
    optimistic floor, not an exact target.

    Args:
      generated: uint8 [0, 255] or float [-1, 1] images [N, H, W(, 1|3)], N >= 2;
        resized to the classifier's resolution if needed.
      labels: int [N], the digit each image was prompted with.
      classifier: a trained DigitClassifier.

    Returns:
      dict with "accuracy" (share classified as the prompted digit),
      "accuracy_per_digit" and "count_per_digit" ({"0": ..., "9": ...}; accuracy
      None for a digit with no samples), "frechet_distance" (generated vs real
      test), "reference_frechet_distance" (real train subset vs real test),
      "frechet_ratio" (their quotient; None if the reference is 0), "classifier_test_accuracy",
      "num_generated", "num_real_test", "num_real_reference", "feature_dim".
    """
    generated = np.asarray(generated)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != generated.shape[0]:
        raise ValueError(
            f"labels must be [N] with N = {generated.shape[0]} images, got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or np.any((labels < 0) | (labels > 9)):
        raise ValueError("labels must be integer digits in 0..9")
    if generated.shape[0] < 2:
        raise ValueError("need at least 2 generated images for a Fréchet distance")

    logits, gen_feats = classifier.logits_and_features(generated)
    correct = logits.argmax(axis=-1) == labels
    test_x, _ = load_digits_arrays("test", classifier.resolution)
    ref_x = reference_train_subset(len(test_x), classifier.resolution)
    test_feats = classifier.features(test_x)
    ref_feats = classifier.features(ref_x)
    fd = frechet_distance(gen_feats, test_feats)
    ref = frechet_distance(ref_feats, test_feats)

    per_digit, counts = {}, {}
    for d in range(NUM_CLASSES):
        mask = labels == d
        counts[str(d)] = int(mask.sum())
        per_digit[str(d)] = float(correct[mask].mean()) if mask.any() else None
    return {
        "accuracy": float(correct.mean()),
        "accuracy_per_digit": per_digit,
        "count_per_digit": counts,
        "frechet_distance": fd,
        "reference_frechet_distance": ref,
        "frechet_ratio": fd / ref if ref > 0 else None,
        "classifier_test_accuracy": classifier.test_accuracy,
        "num_generated": int(generated.shape[0]),
        "num_real_test": int(len(test_x)),
        "num_real_reference": int(len(ref_x)),
        "feature_dim": int(gen_feats.shape[1]),
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A readable text table of a `digits_report` result.

    Args:
      report: the dict `digits_report` returns.

    Returns:
      Multi-line text (no trailing newline).
    """
    acc = report["accuracy_per_digit"]
    cnt = report["count_per_digit"]
    digits = [str(d) for d in range(NUM_CLASSES)]
    cell = lambda v: "  -  " if v is None else f"{v:5.3f}"
    ratio = report["frechet_ratio"]
    ratio = "n/a" if ratio is None else f"{ratio:.2f}"
    lines = [
        "digits quality report",
        f"  conditional accuracy   {report['accuracy']:.4f}  over {report['num_generated']} "
        f"generated images  (classifier test accuracy {report['classifier_test_accuracy']:.4f})",
        f"  Fréchet distance       {report['frechet_distance']:.4f}  generated vs "
        f"{report['num_real_test']} real test  (reference: {report['num_real_reference']} real "
        f"train vs real test {report['reference_frechet_distance']:.4f}; "
        f"ratio {ratio})",
        "  digit    " + " ".join(f"{d:>5}" for d in digits),
        "  accuracy " + " ".join(cell(acc[d]) for d in digits),
        "  count    " + " ".join(f"{cnt[d]:5d}" for d in digits),
    ]
    return "\n".join(lines)


def save_report(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a `digits_report` result as JSON.

    Args:
      report: the dict `digits_report` returns.
      path: destination file; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(report), indent=2, sort_keys=True) + "\n")
