"""``jaxdiff sample`` and ``jaxdiff convert`` end to end on a tiny saved model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_sd import build_tiny_sd

from jaxdiff.cli import DEVICE_COUNT_FLAG, cpu_devices_flags, main
from jaxdiff.weights import files, original, safetensors_io
from jaxdiff.weights.pretrained import load_config, load_pretrained


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "model"
    build_tiny_sd(d, "sd1")
    return d


def test_sample_writes_a_png_grid_of_the_requested_size(model, tmp_path):
    out = tmp_path / "grid.png"
    code = main(
        ["sample", "--model", str(model), "--prompt", "a photo of a cat", "--prompt",
         "an astronaut", "--num-images", "3", "--steps", "3", "--sampler", "euler_a",
         "--height", "24", "--width", "16", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    with Image.open(out) as grid:
        # 2 rows (prompts) x 3 columns, 16x24 tiles with a 2-pixel border.
        assert grid.size == (3 * 18 + 2, 2 * 26 + 2) and grid.mode == "RGB"
        arr = np.asarray(grid)
    singles = sorted(tmp_path.glob("grid_*.png"))
    assert len(singles) == 6
    first = np.asarray(Image.open(singles[0]))
    assert first.shape == (24, 16, 3)
    np.testing.assert_array_equal(arr[2:26, 2:18], first)  # the grid holds the images
    assert first.std() > 5


def test_sample_image_to_image_and_inpaint(model, tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(16, 16, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["sample", "--model", str(model), "--prompt", "a cat", "--steps", "4",
            "--init-image", str(tmp_path / "in.png")]  # fmt: skip
    assert main(base + ["--strength", "0.5", "--out", str(tmp_path / "i2i.png")]) == 0
    assert (
        main(base + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "ip.png")]) == 0
    )
    for name in ("i2i.png", "ip.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (20, 20)


def test_convert_single_file_to_diffusers(model, tmp_path):
    config, params = load_pretrained(model)
    text = {"text_model." + k if not k.startswith("text_model.") else k: v
            for k, v in files.read_state_dict(model / "text_encoder").items()}  # fmt: skip
    single = original.to_original(
        files.read_state_dict(model / "unet"), files.read_state_dict(model / "vae"), text,
        unet_config=config.unet, vae_config=config.vae,
    )  # fmt: skip
    safetensors_io.save_file(single, tmp_path / "single.safetensors")
    out = tmp_path / "converted"
    code = main(["convert", "--single-file", str(tmp_path / "single.safetensors"),
                 "--config-dir", str(model), "--out", str(out)])  # fmt: skip
    assert code == 0
    assert load_config(out).unet == config.unet
    _, params2 = load_pretrained(out)
    for name in params:
        np.testing.assert_array_equal(
            np.concatenate([np.ravel(x) for x in _leaves(params[name])]),
            np.concatenate([np.ravel(x) for x in _leaves(params2[name])]),
        )


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_unknown_subcommand_arguments_are_rejected(model):
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(model), "--prompt", "x", "--bogus", "1"])


def test_cpu_devices_flag(model, tmp_path):
    flags = cpu_devices_flags(f"--xla_foo=1 {DEVICE_COUNT_FLAG}=8", 2)
    assert flags.split() == ["--xla_foo=1", f"{DEVICE_COUNT_FLAG}=2"]
    with pytest.raises(ValueError, match=">= 1"):
        cpu_devices_flags("", 0)
    # Once JAX is running in a process: a clear error, not a silent no-op.
    assert len(jax.devices()) == 8  # conftest's simulated devices; starts the backend
    flags = os.environ["XLA_FLAGS"]
    with pytest.raises(RuntimeError, match="fresh process"):
        main(["--cpu-devices", "2", "sample", "--model", str(model), "--prompt", "x"])
    assert os.environ["XLA_FLAGS"] == flags  # left as it was
    # A fresh process takes it: one image, its guidance pair split over 2 devices.
    out = tmp_path / "one.png"
    argv = ["--cpu-devices", "2", "sample", "--model", str(model), "--prompt", "a cat",
            "--steps", "2", "--height", "16", "--width", "16", "--out", str(out)]  # fmt: skip
    cache = Path(__file__).resolve().parent.parent / ".jax_cache"  # conftest's cache
    env = {**os.environ, "JAXDIFF_COMPILE_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 image, 16x16, on 2 devices" in proc.stdout
    assert out.exists()


def test_cpu_devices_hint():
    """The tip after a one-device CPU run: only when more cores could help."""
    from jaxdiff.cli_sample import cpu_devices_hint

    tip = cpu_devices_hint("cpu", 1, 2, 1)
    assert tip is not None and "--cpu-devices 2" in tip
    assert "--cpu-devices 4" in cpu_devices_hint("cpu", 1, 16, 2)  # 2 images: 4 samples
    assert cpu_devices_hint("cpu", 2, 2, 1) is None  # already a device per core
    assert cpu_devices_hint("cpu", 1, 1, 4) is None  # one core
    assert cpu_devices_hint("gpu", 1, 16, 4) is None


def test_enable_compile_cache_picks_and_keeps_the_directory(tmp_path, monkeypatch):
    import jaxdiff
    from jaxdiff import compile_cache

    before = jax.config.jax_compilation_cache_dir
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    assert before  # conftest's
    try:
        # A directory the process set already is kept; an explicit one wins.
        assert jaxdiff.enable_compile_cache() == before
        assert jax.config.jax_compilation_cache_dir == before
        assert jaxdiff.enable_compile_cache(tmp_path / "a") == str(tmp_path / "a")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
        # None set: the environment's choice, or the default; an empty value: off.
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(compile_cache.ENV_CACHE, str(tmp_path / "b"))
        assert jaxdiff.enable_compile_cache() == str(tmp_path / "b")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(compile_cache.ENV_CACHE, "")
        assert jaxdiff.enable_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv(compile_cache.ENV_CACHE)
        assert compile_cache.default_cache_dir().endswith(os.path.join(".cache", "jaxdiff", "xla"))
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
