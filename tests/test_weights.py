"""Weight files: safetensors without torch, diffusers directories, single-file checkpoints."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from tiny_sd import build_tiny_sd

from jaxdiff.weights import files, original, safetensors_io
from jaxdiff.weights.common import WeightsMismatchError, params_to_state_dict
from jaxdiff.weights.pretrained import (
    load_config,
    load_pretrained,
    load_single_file,
    save_pretrained,
)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / "model"
    build_tiny_sd(d, request.param)
    return request.param, d


def test_safetensors_reader_matches_the_reference_library(tmp_path):
    import safetensors.torch

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, dtype=torch.float16),
        "c": torch.randn(2, 2, dtype=torch.bfloat16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    ours = safetensors_io.load_file(tmp_path / "x.safetensors")
    assert set(ours) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours[k].astype(np.float64), v.double().numpy())
    # and our writer is read back by the reference library
    safetensors_io.save_file(
        {k: np.asarray(v) for k, v in ours.items()}, tmp_path / "y.safetensors"
    )
    back = safetensors.torch.load_file(tmp_path / "y.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    safetensors_io.save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        safetensors_io.load_file(tmp_path / "w.safetensors")


def test_pickled_weights_need_an_explicit_opt_in(tmp_path):
    comp = tmp_path / "unet"
    comp.mkdir()
    torch.save({"w": torch.ones(2)}, comp / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        files.read_state_dict(comp)
    sd = files.read_state_dict(comp, allow_pickle=True)
    np.testing.assert_array_equal(sd["w"], np.ones(2, np.float32))


def test_missing_weights_name_what_was_looked_for(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        files.read_state_dict(tmp_path / "vae")


def test_wrong_component_weights_list_every_bad_key(model_dir, tmp_path):
    _, d = model_dir
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    path = bad / "vae" / "diffusion_pytorch_model.safetensors"
    sd = dict(safetensors_io.load_file(path))
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    sd["encoder.conv_in.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    safetensors_io.save_file(sd, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_pretrained(bad)
    msg = str(err.value)
    assert "decoder.conv_out.bias" in msg and "decoder.extra.weight" in msg
    assert "encoder.conv_in.weight" in msg and "mis-shaped" in msg


def test_export_round_trip_is_bit_exact_and_loads_in_diffusers(model_dir, tmp_path):
    import diffusers

    kind, d = model_dir
    config, params = load_pretrained(d)
    # Transposed kernels come back as contiguous copies, not strided views.
    assert all(a.flags["C_CONTIGUOUS"] for a in jax.tree.leaves(params))
    out = save_pretrained(tmp_path / "export", config, params, d / "tokenizer")
    config2, params2 = load_pretrained(out)
    assert (config2.unet, config2.vae, config2.text_encoder) == (
        config.unet,
        config.vae,
        config.text_encoder,
    )
    for name in params:
        a, b = params_to_state_dict(params[name]), params_to_state_dict(params2[name])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(d)
    exp = diffusers.StableDiffusionPipeline.from_pretrained(out)
    for comp in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(ref, comp).state_dict(), getattr(exp, comp).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_checkpoint_loads_to_the_same_params(model_dir, tmp_path):
    kind, d = model_dir
    config, params = load_pretrained(d)
    fmt = "openclip" if kind == "sd2" else "hf"
    unet_sd = files.read_state_dict(d / "unet")
    vae_sd = files.read_state_dict(d / "vae")
    text_sd = {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in files.read_state_dict(d / "text_encoder").items()
    }
    single = original.to_original(
        unet_sd, vae_sd, text_sd, unet_config=config.unet, vae_config=config.vae,
        text_encoder_format=fmt,
    )  # fmt: skip
    # What real single files carry besides the networks.
    single["alphas_cumprod"] = np.ones(1000, np.float32)
    single["model_ema.decay"] = np.ones((), np.float32)
    if fmt == "openclip":
        assert any(k.endswith("attn.in_proj_weight") for k in single)
        single["cond_stage_model.model.text_projection"] = np.zeros((48, 48), np.float32)
    else:
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in single
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in single)
    assert any(k.startswith("first_stage_model.decoder.up.0.block.") for k in single)
    path = tmp_path / "model.safetensors"
    safetensors_io.save_file(single, path)
    loaded = load_single_file(path, load_config(d))
    for name in params:
        a, b = params_to_state_dict(params[name]), params_to_state_dict(loaded[name])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # An unknown key under a model prefix is reported, not silently kept.
    single["model.diffusion_model.surprise.weight"] = np.zeros(2, np.float32)
    safetensors_io.save_file(single, path)
    with pytest.raises(WeightsMismatchError, match="surprise"):
        load_single_file(path, load_config(d))


def test_single_file_ckpt_needs_opt_in(tmp_path, model_dir):
    _, d = model_dir
    (tmp_path / "m.ckpt").write_bytes(b"not really")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_single_file(tmp_path / "m.ckpt", load_config(d))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_config(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="not supported"):
        load_config(tmp_path)
