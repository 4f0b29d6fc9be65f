"""The training loop end to end on 8 simulated CPU devices.

One straight run of ``configs/digits.py:tiny`` (autoencoder phase, then text
encoder + UNet) is the reference the other tests compare with: sharded steps,
an interrupted-and-resumed run, other data sources fine-tuning its export.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import (
    ROOT,
    SHIFT_INVARIANT,
    assert_trees_equal,
    cli_command,
    cli_env,
    global_relative_error,
    load_export,
    max_relative_error,
    straight_tiny_run,
    tiny_config,
)

from jaxdiff import parallel
from jaxdiff.cli import main as cli_main
from jaxdiff.train import loop, metrics, phases, setup
from jaxdiff.train.data import HostBatches, tokenize

# Orbax's failed-restore path leaves tensorstore callbacks that report a closed
# event loop as unraisable exceptions (see tests/test_checkpoint.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return straight_tiny_run(tmp_path_factory)


def _digests(workdir):
    records = metrics.read_jsonl(workdir / "batches.jsonl")
    return [(r["phase"], r["step"], r["digest"]) for r in records]


# ------------------------------------------------------------------ the straight tiny run


def test_tiny_digits_run_learns_logs_and_exports(tiny_run):
    workdir, summary = tiny_run
    assert not summary["preempted"]
    assert summary["vae"]["step"] == 10 and summary["diffusion"]["step"] == 30
    # Logged every 5 steps; each value is the mean over its 5 steps.
    for phase in ("vae", "diffusion"):
        losses = summary[phase]["losses"]
        print(phase, "losses", np.round(losses, 3))
        assert len(losses) == (2 if phase == "vae" else 6)
        assert losses[-1] < 0.7 * losses[0], (phase, losses)

    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    diffusion = [r for r in records if r["phase"] == "diffusion"]
    assert [r["step"] for r in diffusion] == list(range(5, 31, 5))
    for key in ("loss", "grad_norm", "param_norm", "lr", "images_per_s", "mse"):
        assert all(np.isfinite(r[key]) for r in diffusion), key
    assert diffusion[-1]["lr"] == pytest.approx(2e-3)
    # param_norm is read at the logging step: the final state's trainable networks
    # (the digits config trains the UNet and the text encoder; the VAE is frozen).
    params = jax.device_get(summary["state"].params)
    expected = np.sqrt(
        sum(
            np.sum(np.square(np.asarray(a, np.float64)))
            for name in ("unet", "text_encoder")
            for a in jax.tree.leaves(params[name])
        )
    )
    assert diffusion[-1]["param_norm"] == pytest.approx(expected, rel=1e-5)
    assert len(_digests(workdir)) == 40
    (events,) = (workdir / "tensorboard").iterdir()
    assert events.name.startswith("events.out.tfevents.") and events.stat().st_size > 0

    # Checkpoints of both phases every save_every=20 steps and at the end; the config beside.
    assert sorted(p.name for p in (workdir / "checkpoints" / "vae").iterdir()) == ["10"]
    assert sorted(p.name for p in (workdir / "checkpoints" / "diffusion").iterdir()) == ["20", "30"]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 30

    # The export holds the EMA weights of the trained networks and the frozen VAE.
    state = summary["state"]
    exported = load_export(workdir / "export")
    assert_trees_equal(exported, jax.device_get({**state.params, **state.ema_params}))
    assert max_relative_error(exported["unet"], jax.device_get(state.params["unet"])) > 1e-4
    vae_cfg = json.loads((workdir / "export" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == summary["model_config"].vae.scaling_factor != 0.18215


def test_tiny_run_reports_quality_of_its_export(tiny_run):
    from jaxdiff import evaluation
    from jaxdiff.pipeline import StableDiffusion

    workdir, summary = tiny_run
    report = json.loads((workdir / "report.json").read_text())
    assert report == json.loads(json.dumps(summary["report"]))  # floats round-trip exactly
    digits = [str(d) for d in range(10)]
    assert report["count_per_digit"] == dict.fromkeys(digits, 2)
    assert report["num_generated"] == 20 and report["num_real_test"] == 300
    assert sorted(report["accuracy_per_digit"]) == digits
    assert all(a in (0.0, 0.5, 1.0) for a in report["accuracy_per_digit"].values())
    # Equal counts: the overall accuracy is the mean of the per-digit ones.
    assert report["accuracy"] == pytest.approx(np.mean(list(report["accuracy_per_digit"].values())))
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["classifier_test_accuracy"] <= 1.0
    assert report["frechet_distance"] >= 0.0 and report["reference_frechet_distance"] > 0.0
    assert report["frechet_ratio"] == pytest.approx(
        report["frechet_distance"] / report["reference_frechet_distance"]
    )
    sampling = report["sampling"]
    assert sampling == {
        "prompt": "a handwritten digit {d}",
        "samples_per_prompt": 2,
        "steps": 5,
        "guidance_scale": 2.0,
        "sampler": "ddim",
        "seed": 0,
    }

    # The grid: one row per digit, both samples of each, 16x16 tiles with 2-pixel borders.
    grid = np.asarray(Image.open(workdir / "samples" / "final_grid.png"))
    assert grid.shape == (10 * 18 + 2, 2 * 18 + 2, 3)

    # Sampling the export again gives the grid's images, and the cached classifier
    # scores them as report.json says: the report judges exactly the exported model.
    pipe = StableDiffusion.from_pretrained(workdir / "export")
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    images = pipe.text_to_image(
        prompts, num_images_per_prompt=2, steps=5, guidance_scale=2.0, sampler="ddim", seed=0
    )
    tiles = [
        grid[2 + r * 18 : r * 18 + 18, 2 + c * 18 : c * 18 + 18] for r in range(10) for c in (0, 1)
    ]
    np.testing.assert_array_equal(np.stack(tiles), images)
    classifier = evaluation.load_or_train(workdir / "digit_classifier.msgpack", steps=20)
    again = evaluation.digits_report(images, np.repeat(np.arange(10), 2), classifier)
    for key in ("accuracy", "frechet_distance", "reference_frechet_distance"):
        assert again[key] == pytest.approx(report[key], rel=1e-6), key


def test_export_matches_diffusers_pipeline(tiny_run):
    import torch
    from diffusers import StableDiffusionPipeline

    from jaxdiff.diffusers_check import compare_with_diffusers
    from jaxdiff.models.sd import encode_text
    from jaxdiff.weights.pretrained import load_pretrained

    workdir, _ = tiny_run
    config, params = load_pretrained(workdir / "export")
    pipe = StableDiffusionPipeline.from_pretrained(workdir / "export", safety_checker=None)
    ids = pipe.tokenizer(
        ["a handwritten digit 3", "the number seven"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="np",
    ).input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    ours = np.asarray(encode_text(params["text_encoder"], ids, config))
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)

    # Same start latents, the export's own scheduler (DDIM, trailing), guidance and a
    # negative prompt: the two pipelines' uint8 images agree.
    r = compare_with_diffusers(
        workdir / "export",
        ["a handwritten digit 3", "the number seven", "a 0"],
        steps=5,
        guidance_scale=2.0,
        negative_prompt="a handwritten digit 8",
    )
    assert r["jaxdiff"].shape == (3, 16, 16, 3)
    assert r["jaxdiff"].std() > 5, "flat images would make the comparison vacuous"
    assert r["mean_abs_diff"] <= 1.0, r["per_image_mean_abs_diff"]


def test_compare_with_diffusers_script(tiny_run, tmp_path, capsys):
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "compare_with_diffusers.py"
    spec = importlib.util.spec_from_file_location("compare_with_diffusers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workdir, _ = tiny_run
    out = tmp_path / "compare.png"
    argv = ["--model", str(workdir / "export"), "--prompt", "a 5", "--steps", "3"]
    argv += ["--out", str(out)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean |diff|" in printed and out.exists()
    # A tolerance no real comparison can meet turns into exit status 1.
    assert module.main([*argv[:-2], "--tolerance", "-1"]) == 1


def test_export_loads_in_jaxdiff_pipeline(tiny_run):
    pipeline = pytest.importorskip("jaxdiff.pipeline", reason="jaxdiff.pipeline not written yet")
    workdir, _ = tiny_run
    pipe = pipeline.StableDiffusion.from_pretrained(workdir / "export")
    images = pipe.text_to_image("a handwritten digit 3", steps=2, seed=0)
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


# ------------------------------------------------------------------ sharding


def test_sharded_steps_match_one_device(tiny_run, tmp_path):
    workdir, _ = tiny_run
    config = tiny_config(
        f"model.pretrained={workdir / 'export'}",
        "mesh.fsdp_min_size=1024",
        "train.cache_latents=False",  # the steps take the pixels below
    )
    model = setup.build_model(config, tmp_path)
    data = HostBatches(config)
    host_batches = []
    for _ in range(2):
        b = next(data)
        ids = tokenize(model.tokenizer, b["caption"], model.max_length)
        host_batches.append({"input_ids": ids, "pixels": b["image"]})
    data.close()

    meshes = {
        "one device": parallel.make_mesh(devices=jax.devices()[:1]),
        "data=8": parallel.make_mesh(data=8),
        "data=2,fsdp=4": parallel.make_mesh(data=2, fsdp=4),
    }
    results = {}
    for name, mesh in meshes.items():
        phase = phases.diffusion_phase(config, model, mesh, None, lambda c: None)
        state = phase.init()
        step = phase.build_step(state)
        rng = jax.device_put(np.asarray(state.rng.addressable_data(0)), parallel.replicated(mesh))
        for host in host_batches:
            state, _ = step(state, parallel.host_batch_to_global(host, mesh), rng)
        if name == "data=2,fsdp=4":
            leaves = jax.tree.leaves(state.params)
            split = [
                x
                for x in leaves
                if "fsdp" in str(x.sharding.spec) and x.addressable_shards[0].data.shape != x.shape
            ]
            assert len(split) >= 5, [x.sharding.spec for x in leaves]
            assert any(len(x.sharding.device_set) == 8 for x in split)
        results[name] = jax.device_get({"params": state.params, "ema": state.ema_params})

    one = results["one device"]
    for name in ("data=8", "data=2,fsdp=4"):
        per_leaf = max_relative_error(results[name], one, skip=SHIFT_INVARIANT)
        overall = global_relative_error(results[name], one)
        print(f"{name} vs one device: per leaf <= {per_leaf:.2e}, overall {overall:.2e}")
        assert per_leaf <= 1e-5 and overall <= 1e-5, name
    # The steps did change the trainable networks.
    assert max_relative_error(one["params"]["unet"], load_export(workdir / "export")["unet"]) > 1e-4


def test_cached_latents_are_each_examples_encoding(tiny_run, tmp_path):
    from jaxdiff.models.sd import encode_images

    workdir, _ = tiny_run
    config = tiny_config(f"model.pretrained={workdir / 'export'}")
    assert config.train.cache_latents
    model = setup.build_model(config, tmp_path)
    phase = phases.diffusion_phase(config, model, parallel.make_mesh(data=8), None, lambda c: None)
    phase.build_step(phase.init())  # encodes the whole train split once
    data = HostBatches(config)
    raw = [next(data) for _ in range(2)]
    data.close()
    for b in raw:
        batch = phase.make_batch(b)
        assert set(batch) == {"input_ids", "latents"}
        # The scaled posterior mode of the very images the batch would have carried.
        expected = encode_images(model.params["vae"], b["image"], model.config)
        assert batch["latents"].shape == (8, 8, 8, 4)
        np.testing.assert_allclose(batch["latents"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match=r"no cached latents for example index \[1497\]"):
        phase.make_batch({"caption": np.array(["a 1"]), "index": np.array([1497])})


# ------------------------------------------------------------------ preemption and resume


def _truncate_array_store(step_dir):
    # As a crash or a full disk would leave it: the array manifest cut in half.
    manifest = step_dir / "state" / "manifest.ocdbt"
    with open(manifest, "r+b") as f:
        f.truncate(manifest.stat().st_size // 2)


def test_resume_after_sigterm_and_corrupt_checkpoint_matches_straight_run(
    tiny_run, tmp_path, capsys
):
    from jaxdiff.train.loop import train_and_evaluate

    straight, _ = tiny_run
    workdir = tmp_path / "run"
    hashes = "debug.log_batch_hashes=True"

    # 1. `jaxdiff train` gets SIGTERM as soon as it starts training: it saves and exits cleanly.
    proc = subprocess.Popen(
        cli_command(workdir, hashes),
        env=cli_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("[vae] training steps 1..10"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped = re.search(r"\[vae\] stop signal: saved step (\d+)", out)
    assert stopped, out
    k = int(stopped.group(1))
    assert 1 <= k < 10
    assert not (workdir / "export").exists()

    # 2. Resumed in this process and stopped by total_steps (diffusion saves 20 and 25).
    summary = train_and_evaluate(tiny_config(hashes, "total_steps=25"), workdir)
    assert summary["vae"]["resumed_from"] == k and summary["diffusion"]["step"] == 25
    ckpts = workdir / "checkpoints" / "diffusion"
    assert sorted(p.name for p in ckpts.iterdir()) == ["20", "25"]

    # 3. The newest checkpoint is damaged. The first run's config, rerun here (as the
    # CLI builds it from the same arguments), reports it and falls back to step 20.
    _truncate_array_store(ckpts / "25")
    with pytest.warns(RuntimeWarning, match=r"checkpoint at step 25 .* could not be restored"):
        summary = train_and_evaluate(tiny_config(hashes), workdir)
    assert summary["diffusion"]["resumed_from"] == 20 and summary["diffusion"]["step"] == 30
    assert "[diffusion] resumed from step 20" in capsys.readouterr().out
    assert (ckpts / "25.corrupt").is_dir()

    # Same batches in the same order, and bitwise the same model as the straight run.
    assert _digests(workdir) == _digests(straight)
    assert_trees_equal(load_export(workdir / "export"), load_export(straight / "export"))


# ------------------------------------------------------------------ other data sources


def _fine_tune(tiny_run, workdir, *overrides):
    from jaxdiff.train.loop import train_and_evaluate

    straight, _ = tiny_run
    config = tiny_config(
        f"model.pretrained={straight / 'export'}",
        "total_steps=2",
        "log_every=1",
        "save_every=100",
        "eval.kind=",  # digit prompts judge nothing here; the straight run's report covers it
        *overrides,
    )
    return train_and_evaluate(config, workdir)


def test_folder_source_skips_corrupt_file_and_writes_sample_grid(tiny_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {i}"}))
    (folder / "broken.png").write_bytes(b"not a png")
    lines.append(json.dumps({"file_name": "broken.png", "text": "a handwritten digit 9"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.warns(RuntimeWarning, match="skipping image .*broken.png"):
        summary = _fine_tune(
            tiny_run,
            tmp_path / "run",
            "data.source=folder",
            f"data.path={folder}",
            "data.num_threads=2",
            "sample_every=2",
        )
    assert summary["diffusion"]["step"] == 2 and "vae" not in summary
    assert len(summary["diffusion"]["losses"]) == 2
    assert all(np.isfinite(summary["diffusion"]["losses"]))
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_2.png"))
    assert grid.shape == (16, 32, 3)  # two prompts side by side at 16x16
    assert grid.std() > 0
    assert (tmp_path / "run" / "export" / "model_index.json").is_file()


def test_tfds_source(tiny_run, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=32):
        summary = _fine_tune(
            tiny_run,
            tmp_path / "run",
            "data.source=tfds",
            "data.tfds_name=mnist",
            "data.caption_key=label",
            "data.caption_template=a handwritten digit {label}",
            "data.num_threads=2",
        )
    assert summary["diffusion"]["step"] == 2
    assert all(np.isfinite(summary["diffusion"]["losses"]))


# ------------------------------------------------------------------ small pieces


def test_cli_rejects_unknown_config_keys(capsys, tmp_path):
    code = cli_main(
        ["train", "--config", f"{ROOT}/configs/digits.py:tiny", "--workdir", str(tmp_path)]
        + ["--config.optimizer.lrr=1e-3"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optimizer.lrr'" in err and "lr" in err
    assert cli_main(["train", "--config", "nope.py", "--workdir", str(tmp_path)]) == 2
    assert "config file not found: nope.py" in capsys.readouterr().err
    assert cli_main(["train", "--config", "configs/digits.py", "--workdir", "x", "--lr=1"]) == 2
    assert "unrecognised argument '--lr=1'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_non_finite_loss_names_its_step():
    pending = loop.PendingMetrics("diffusion", batch_size=8)
    for step, loss in [(11, 0.5), (12, float("nan")), (13, float("inf"))]:
        pending.add(step, {"loss": np.float32(loss), "grad_norm": np.float32(1.0)})
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 12"):
        pending.flush()


def test_event_file_records_are_valid_tfrecords(tmp_path):
    # The CRC-32C check value (RFC 3720 B.4): "123456789" -> 0xE3069283.
    assert metrics.crc32c(b"123456789") == 0xE3069283
    writer = metrics.EventFileWriter(tmp_path)
    writer.scalars(7, {"diffusion/loss": 0.25})
    writer.close()
    data = writer.path.read_bytes()
    records = []
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == metrics._masked_crc(data[:8])
        payload = data[12 : 12 + n]
        assert struct.unpack("<I", data[12 + n : 16 + n])[0] == metrics._masked_crc(payload)
        records.append(payload)
        data = data[16 + n :]
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    # step=7 (field 2, varint), the tag, and simple_value=0.25 as a little-endian float.
    assert b"\x10\x07" in records[1] and b"diffusion/loss" in records[1]
    assert struct.pack("<f", 0.25) in records[1]


def test_host_batches_read_what_more_hosts_would_read():
    # One host reading 2 shards sees, per batch, host 0's then host 1's examples of a 2-host job.
    one = HostBatches(tiny_config("data.shards_per_process=2"), process_index=0, process_count=1)
    hosts = [HostBatches(tiny_config(), process_index=i, process_count=2) for i in range(2)]
    for _ in range(2):
        batch, parts = next(one), [next(h) for h in hosts]
        assert batch["image"].shape == (8, 16, 16, 3)
        np.testing.assert_array_equal(batch["image"], np.concatenate([p["image"] for p in parts]))
        assert list(batch["caption"]) == [c for p in parts for c in p["caption"]]
    # Resume from the iterator state; a state of another shard layout is refused.
    resumed = HostBatches(tiny_config("data.shards_per_process=2"), 0, 1)
    resumed.set_state(one.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], next(one)["image"])
    with pytest.raises(ValueError, match="holds 2 shards but this host reads 1"):
        hosts[0].set_state(one.get_state())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.compute_dtype=fp8"], "unknown compute_dtype 'fp8'"),
        (["model.pretrained=/nonexistent"], "is not a diffusers-format directory"),
        (["data.source=folder"], "needs data.path"),
        (["save_every=0"], "save_every=0 must be >= 1"),
        (["data.random_flip=True"], "cache_latents needs the same image every epoch"),
        (["eval.kind=fid"], "unknown eval.kind 'fid'"),
        (["eval.samples_per_prompt=0"], "eval.samples_per_prompt=0 must be >= 1"),
        (["eval.prompt=a digit"], "must contain '{d}'"),
    ],
)
def test_check_config_names_the_problem(overrides, match):
    with pytest.raises(ValueError, match=match):
        setup.check_config(tiny_config(*overrides))
