"""Grain pipelines: digits, image folders, tfds (mocked), resume and sharding."""

import contextlib
import itertools
import json
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff import data
from jaxdiff.data import transforms
from jaxdiff.data.digits import DIGIT_WORDS


def _take(ds, n, state=None):
    """First n batches of a fresh iterator (optionally resumed from `state`).

    The iterator is closed afterwards so its read-ahead threads stop.
    """
    with contextlib.closing(iter(ds)) as it:
        if state is not None:
            it.set_state(state)
        return list(itertools.islice(it, n))


def _take_from(it, n):
    return list(itertools.islice(it, n))


def _fingerprints(batches):
    """One hashable value per example: its image bytes."""
    return [img.tobytes() for b in batches for img in b["image"]]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- transforms


def test_preprocess_resize_crop_flip_and_range():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255  # right half white
    out = transforms.preprocess(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    # Shorter side 40 -> 20 means 60 -> 30; the center crop keeps columns 5..24,
    # so the left half of the crop is black (-1) and the right half white (+1).
    np.testing.assert_allclose(out[:, :4], -1.0)
    np.testing.assert_allclose(out[:, -4:], 1.0)
    flipped = [transforms.preprocess(img, 20, flip=True, rng=rng)[0, 0, 0] for _ in range(40)]
    assert {-1.0, 1.0} <= set(np.round(flipped, 3))  # both orientations occur
    crops = {
        transforms.random_crop(np.arange(60).reshape(1, 60, 1).repeat(3, 0), 3, rng)[0, 0, 0]
        for _ in range(40)
    }
    assert len(crops) > 5
    grey = transforms.preprocess(np.full((8, 8), 255, np.uint8), 8)
    np.testing.assert_array_equal(grey, np.ones((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="needs an rng"):
        transforms.preprocess(img, 20, center=False)
    with pytest.raises(ValueError, match="uint8"):
        transforms.preprocess(img.astype(np.float32), 20)


# ---------------------------------------------------------------- digits


def test_digits_arrays_and_split():
    train_idx, test_idx = data.split_indices("train"), data.split_indices("test")
    assert len(train_idx) == 1497 and len(test_idx) == 300
    assert not set(train_idx) & set(test_idx)
    x, y = data.load_digits_arrays("test", resolution=8)
    assert x.shape == (300, 8, 8, 3) and y.shape == (300,) and y.dtype == np.int32
    from sklearn.datasets import load_digits

    raw = load_digits()
    # At 8x8 the pixels are the originals, 0..16 mapped to [-1, 1].
    np.testing.assert_allclose(x[..., 0], raw.images[test_idx] / 8.0 - 1.0, atol=1 / 127.5)
    np.testing.assert_array_equal(y, raw.target[test_idx])
    x32, _ = data.load_digits_arrays("test", resolution=32, resample="bilinear")
    assert x32.shape == (300, 32, 32, 3)
    assert x32.min() >= -1.0 and x32.max() <= 1.0 and x32.max() > 0.9
    with pytest.raises(ValueError, match="unknown digits split"):
        data.load_digits_arrays("val")


def test_digits_batches_shapes_ranges_captions():
    ds = data.digits_dataset(batch_size=16, seed=3)
    batches = _take(ds, 4)
    b = batches[0]
    assert set(b) == {"image", "caption", "label", "index"}
    # "index" is each example's position in the split: the image and label found there.
    x, y = data.load_digits_arrays("train", resolution=32)
    np.testing.assert_array_equal(b["image"], x[b["index"]])
    np.testing.assert_array_equal(b["label"], y[b["index"]])
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])  # grey as RGB
    assert b["label"].shape == (16,)
    templates_seen = set()
    for batch in batches:
        for caption, label in zip(batch["caption"], batch["label"]):
            label = int(label)
            assert str(label) in caption or DIGIT_WORDS[label] in caption, caption
            templates_seen.add(re.sub(rf"{label}|{DIGIT_WORDS[label]}", "#", caption))
    assert len(templates_seen) >= 5
    # Same seed, same stream; another seed, another stream.
    _assert_batches_equal(batches, _take(data.digits_dataset(batch_size=16, seed=3), 4))
    (other,) = _take(data.digits_dataset(batch_size=16, seed=4), 1)
    assert not np.array_equal(other["image"], b["image"])


def test_digits_epochs_reshuffle_and_resume_across_epoch_boundary():
    ds = data.digits_dataset(batch_size=100, split="test", seed=0)  # 3 batches per epoch
    batches = _take(ds, 6)
    f1, f2 = _fingerprints(batches[:3]), _fingerprints(batches[3:])
    assert sorted(f1) == sorted(f2) and len(set(f1)) == 300  # each image once per epoch
    assert f1 != f2  # in a new order

    with contextlib.closing(iter(ds)) as it:
        _take_from(it, 2)
        state = json.loads(json.dumps(it.get_state()))  # survives the JSON checkpoint item
        expected = _take_from(it, 3)  # crosses into the second epoch
    _assert_batches_equal(_take(ds, 3, state=state), expected)
    # Every epoch, "index" still points at the example's own image in the split.
    x, _ = data.load_digits_arrays("test")
    for b in batches:
        np.testing.assert_array_equal(b["image"], x[b["index"]])


def test_examples_carry_their_record_index_across_epochs_and_shards():
    records = [f"r{i}" for i in range(8)]

    def example(record, rng):
        return None if record == "r2" else {"name": record}  # r2 fails to decode

    for shard in range(2):
        ds = data.build_pipeline(
            records, example, batch_size=3, seed=1, shard_index=shard, shard_count=2, num_threads=0
        )
        batches = _take(ds, 4)  # 4 (or 3 readable) records per shard: three epochs
        for b in batches:
            assert b["index"].dtype == np.int64
            assert [records[i] for i in b["index"]] == list(b["name"])
            assert all(i % 2 == shard for i in b["index"])
        assert len({int(i) for b in batches for i in b["index"]}) == (3 if shard == 0 else 4)


def test_digits_shards_partition_the_split():
    def shard(i):
        ds = data.digits_dataset(
            batch_size=50,
            split="test",
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            shard_index=i,
            shard_count=2,
        )
        return _fingerprints(list(ds))

    a, b = shard(0), shard(1)
    assert len(a) == len(b) == 150
    assert not set(a) & set(b)
    x, _ = data.load_digits_arrays("test")
    assert set(a) | set(b) == {img.tobytes() for img in x}
    with pytest.raises(ValueError, match="shard_index=2"):
        data.digits_dataset(batch_size=2, shard_index=2, shard_count=2)


# ---------------------------------------------------------------- folder

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@pytest.fixture()
def image_folder(tmp_path):
    lines = []
    for i, color in enumerate(COLORS):
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        size = (24, 16) if i % 3 else (16, 20)  # (W, H): both orientations
        Image.new("RGB", size, color).save(tmp_path / name, quality=100)
        lines.append({"file_name": name, "text": f"a {i} colored square"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines.insert(3, {"file_name": "broken.png", "text": "never seen"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def test_folder_reads_images_and_skips_corrupt_file(image_folder):
    ds = data.folder_dataset(
        image_folder,
        batch_size=4,
        resolution=8,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        num_threads=0,
    )
    broken = str(image_folder / "broken.png")
    with pytest.warns(RuntimeWarning, match=re.escape(broken)):
        batches = list(ds)
    captions = [c for b in batches for c in b["caption"]]
    assert captions == [f"a {i} colored square" for i in range(len(COLORS))]
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (6, 8, 8, 3)
    expected = np.array(COLORS, np.float32)[:, None, None, :] / 127.5 - 1.0
    np.testing.assert_allclose(images, np.broadcast_to(expected, images.shape), atol=0.02)


def test_folder_batches_stay_full_over_epochs(image_folder):
    ds = data.folder_dataset(image_folder, batch_size=4, resolution=8, seed=1, random_flip=True)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        batches = _take(ds, 5)  # 20 examples: more than three epochs of 6
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    assert all("never seen" not in b["caption"] for b in batches)


def test_folder_where_nothing_decodes_fails_loudly(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    ds = data.folder_dataset(tmp_path, batch_size=2, num_threads=2)
    with pytest.raises(ValueError, match="no image could be decoded"):
        _take(ds, 1)


def test_folder_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        data.folder_dataset(tmp_path, batch_size=1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: missing field 'file_name'"):
        data.folder_dataset(tmp_path, batch_size=1)


# ---------------------------------------------------------------- tfds


def test_tfds_mock_mnist_label_captions_and_resume():
    with tfds.testing.mock_data(num_examples=24):
        source = tfds.data_source("mnist", split="train")
        ds = data.tfds_dataset(
            "mnist",
            batch_size=4,
            resolution=32,
            caption_template="a handwritten {name}",
            shuffle=False,
            num_threads=0,
        )
        it = iter(ds)
        first = next(it)
        state = it.get_state()
        expected = _take_from(it, 7)  # wraps past the 24 examples
        it.close()
        assert first["image"].shape == (4, 32, 32, 3)
        assert first["image"].min() >= -1.0 and first["image"].max() <= 1.0
        for i in range(4):
            assert first["caption"][i] == f"a handwritten {int(source[i]['label'])}"
            want = transforms.preprocess(source[i]["image"], 32)
            np.testing.assert_array_equal(first["image"][i], want)
        _assert_batches_equal(_take(ds, 7, state=state), expected)

        with pytest.raises(ValueError, match="no feature 'picture'"):
            data.tfds_dataset("mnist", batch_size=2, image_key="picture")


def test_make_caption_fn_variants():
    names = ["cat", "dog"]
    assert data.make_caption_fn(None, names)(np.int64(1)) == "dog"
    assert data.make_caption_fn("a photo of a {name} ({label})", names)(0) == "a photo of a cat (0)"
    assert data.make_caption_fn(None, None)(np.array(b"hello")) == "hello"
    assert data.make_caption_fn(lambda v: f"#{int(v)}", None)(3) == "#3"


# ---------------------------------------------------------------- make_dataset


def test_make_dataset_from_dict_and_configdict(image_folder):
    cfg = {"batch_size": 8, "seed": 1, "data": {"source": "digits", "resolution": 16}}
    (b,) = _take(data.make_dataset(cfg, shard_index=1, shard_count=2), 1)
    assert b["image"].shape == (4, 16, 16, 3)  # global 8 over 2 hosts

    cd = ml_collections.ConfigDict(
        {
            "batch_size": 2,
            "seed": 0,
            "data": {
                "source": "folder",
                "path": str(image_folder),
                "resolution": 8,
                "center_crop": False,
                "random_flip": False,
                "image_key": None,  # unset: defaults to "file_name"
                "num_threads": 0,
            },
        }
    )
    with pytest.warns(RuntimeWarning, match="broken.png"):
        batches = _take(data.make_dataset(cd), 4)
    assert all(b["image"].shape == (2, 8, 8, 3) for b in batches)

    with tfds.testing.mock_data(num_examples=8):
        cfg = {
            "batch_size": 2,
            "data": {"source": "tfds", "tfds_name": "mnist", "resolution": 28},
        }
        (b,) = _take(data.make_dataset(cfg), 1)
        assert b["image"].shape == (2, 28, 28, 3)
        assert all(c in "0123456789" for c in b["caption"])


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"batch_size": 8, "data": {"source": "lmdb"}}, "data.source='lmdb'"),
        ({"batch_size": 8}, "no 'data'"),
        ({"data": {"source": "digits"}}, "no 'batch_size'"),
        ({"batch_size": 7, "data": {"source": "digits"}}, "batch_size=7"),
        ({"batch_size": 8, "data": {"source": "folder"}}, "needs data.path"),
        ({"batch_size": 8, "data": {"source": "tfds"}}, "needs data.tfds_name"),
    ],
)
def test_make_dataset_bad_config(cfg, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        data.make_dataset(cfg, shard_index=0, shard_count=2)
