"""Tests for vitjax.data: IDX files, the Fashion-MNIST builder, the generic TFDS path, the iterators.

References are written independently of the code under test: pixels are compared with the IDX arrays or
TFDS's own decoder, resizes with jax.image.resize, grey conversion with the BT.601 formula written out.
"""
import hashlib
import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitjax import data
from vitjax.data import fashion_mnist
from vitjax.data import pipeline
from vitjax.data import preprocess

from tests import conftest
from tests import fixtures

N_TRAIN, N_TEST = conftest.FMNIST_TRAIN, conftest.FMNIST_TEST


def _cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      name="fashion_mnist", data_dir=str(data_dir), source_dir="", image_size=28, train_split="train",
      eval_split="test", channels=0, augment="none"))
  cfg.update(overrides)
  return cfg


def _to_uint8(images):
  return np.rint((images + 1.0) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def built(fmnist):
  """The shared Fashion-MNIST (tests/conftest.py), built from its IDX files alone (no other
  source, no download); returns (data config, {split: (images, labels)})."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fashion_mnist, "SOURCE_DIRS", ())
    mp.setattr(fashion_mnist, "DOWNLOAD_URL", None)
    cfg = _cfg(fmnist.data_dir, source_dir=fmnist.source_dir)
    data.dataset_info(cfg)  # builds it
  return cfg, fmnist.arrays


def _example_ids(images_uint8, reference):
  """Index of each (b, 28, 28, 1) image in the reference (N, 28, 28) array (images are unique)."""
  lookup = {img.tobytes(): i for i, img in enumerate(reference)}
  return np.array([lookup[img[..., 0].tobytes()] for img in images_uint8])


def test_idx_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  arrays = [rng.integers(0, 256, (5, 7, 3)).astype(np.uint8),
            rng.integers(-9, 9, (11,)).astype(np.int32),
            rng.standard_normal((2, 3)).astype(np.float32)]
  for i, array in enumerate(arrays):
    for suffix in (".gz", ""):
      path = str(tmp_path / f"a{i}{suffix}")
      data.write_idx(path, array)
      back = data.read_idx(path)
      assert back.dtype == array.dtype and back.shape == array.shape
      np.testing.assert_array_equal(back, array)
  # The header is what the format says: magic 0x00000803 for a 3-D uint8 array, then big-endian sizes.
  with open(str(tmp_path / "a0"), "rb") as f:
    assert f.read(16) == bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 7, 0, 0, 0, 3])
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(str(tmp_path / "bad"))


@pytest.mark.skipif(not fashion_mnist.find_idx_files(fashion_mnist.SOURCE_DIRS[0]),
                    reason="dataset-fashion-mnist is not installed")
def test_read_real_fashion_mnist_test_set():
  files = fashion_mnist.find_idx_files(fashion_mnist.SOURCE_DIRS[0])
  images, labels = data.read_idx(files["test", "images"]), data.read_idx(files["test", "labels"])
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  # The published test set holds 1,000 images of each of the 10 classes.
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


def test_build_and_info_and_eval_order(built):
  cfg, arrays = built
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(num_classes=10, train_size=N_TRAIN, eval_size=N_TEST,
                                  image_shape=(28, 28, 1))
  # One eval pass returns the IDX test set in its original order, scaled to [-1, 1].
  batches = list(data.eval_iterator(cfg, batch_size=16))
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  ref_images, ref_labels = arrays["test"]
  np.testing.assert_allclose(images[..., 0], ref_images / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(labels, ref_labels)


def test_train_batches_shapes_epochs_and_determinism(built):
  cfg, arrays = built
  it = data.train_iterator(cfg, batch_size=32, seed=3)
  per_epoch = N_TRAIN // 32
  batches = [next(it) for _ in range(2 * per_epoch)]
  for b in batches:
    assert b["image"].shape == (32, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  ref_images, ref_labels = arrays["train"]
  ids = [_example_ids(_to_uint8(b["image"]), ref_images) for b in batches]
  for b, i in zip(batches, ids):
    np.testing.assert_array_equal(b["label"], ref_labels[i])  # labels travel with their images
  epoch0, epoch1 = np.concatenate(ids[:per_epoch]), np.concatenate(ids[per_epoch:])
  assert sorted(epoch0) == list(range(N_TRAIN)) and sorted(epoch1) == list(range(N_TRAIN))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
  assert not np.array_equal(epoch0, np.arange(N_TRAIN))
  # Same seed -> same stream; another seed -> another order.
  again = data.train_iterator(cfg, batch_size=32, seed=3)
  for b in batches:
    np.testing.assert_array_equal(next(again)["image"], b["image"])
  other = data.train_iterator(cfg, batch_size=32, seed=4)
  assert not np.array_equal(next(other)["label"], batches[0]["label"])


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_state_restore_continues_the_stream(built, augment):
  cfg = built[0].copy_and_resolve_references()
  cfg.augment = augment
  it = data.train_iterator(cfg, batch_size=24, seed=7)
  for _ in range(5):  # crosses an epoch boundary (96 / 24 = 4 steps)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  restored = data.train_iterator(cfg, batch_size=24, seed=7)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_process_shards_are_disjoint_and_form_the_global_batch(built):
  cfg, arrays = built
  ref = arrays["train"][0]
  single = data.train_iterator(cfg, batch_size=32, seed=5)
  shards = [data.train_iterator(cfg, batch_size=32, seed=5, process_index=p, process_count=4)
            for p in range(4)]
  for _ in range(4):
    global_ids = _example_ids(_to_uint8(next(single)["image"]), ref)
    local = [next(s) for s in shards]
    assert all(b["image"].shape[0] == 8 for b in local)
    local_ids = [_example_ids(_to_uint8(b["image"]), ref) for b in local]
    assert len(set(np.concatenate(local_ids))) == 32  # disjoint
    np.testing.assert_array_equal(np.sort(np.concatenate(local_ids)), np.sort(global_ids))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_example_once(built, process_count):
  cfg, arrays = built
  ref = arrays["test"][0]
  per_process = [
      list(data.eval_iterator(cfg, batch_size=16, process_index=p, process_count=process_count))
      for p in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1  # every process steps together
  assert len(per_process[0]) == -(-N_TEST // 16)
  seen = []
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (16 // process_count, 28, 28, 1) and b["mask"].dtype == bool
      seen.extend(_example_ids(_to_uint8(b["image"][b["mask"]]), ref))
      assert not b["image"][~b["mask"]].any() and not b["label"][~b["mask"]].any()  # zero padding
  assert sorted(seen) == list(range(N_TEST))


def test_uncached_path_gives_the_same_stream(built, monkeypatch):
  cfg = built[0].copy_and_resolve_references()
  cfg.augment = "crop_flip"
  cached = data.train_iterator(cfg, batch_size=16, seed=2)
  monkeypatch.setattr(pipeline, "CACHE_MAX_BYTES", 0)  # decode PNGs batch by batch instead
  streamed = data.train_iterator(cfg, batch_size=16, seed=2)
  for _ in range(8):  # past the first epoch (6 steps), where cached images are reused
    a, b = next(cached), next(streamed)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_augmentation_is_redrawn_every_step(built):
  # A one-example split (a TFDS slice) makes every batch the same image: only the augmentation varies.
  cfg = built[0].copy_and_resolve_references()
  cfg.update(dict(train_split="train[:1]", augment="crop_flip"))
  assert data.dataset_info(cfg).train_size == 1
  it = data.train_iterator(cfg, batch_size=8, seed=0)
  first, second = next(it)["image"], next(it)["image"]
  assert len({x.tobytes() for x in first}) > 1  # per-example draws within a batch
  assert not np.array_equal(first, second)  # and new draws at the next step


def test_random_crop_flip_is_a_padded_crop():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (64, 9, 7, 2)).astype(np.float32)  # no zeros: padding is recognisable
  out = preprocess.random_crop_flip(images, np.random.default_rng(1))
  p = preprocess.CROP_PAD
  flips = set()
  for image, crop in zip(images, out):
    padded = np.zeros((9 + 2 * p, 7 + 2 * p, 2), np.float32)
    padded[p:p + 9, p:p + 7] = image
    matches = []
    for dy in range(2 * p + 1):
      for dx in range(2 * p + 1):
        window = padded[dy:dy + 9, dx:dx + 7]
        matches += [f for f in (False, True) if np.array_equal(crop, window[:, ::-1] if f else window)]
    assert matches, "output is not a crop of the padded image"
    flips.add(matches[0])
  assert flips == {False, True}


@pytest.mark.parametrize("in_size,out_size", [(40, 28), (28, 40), (17, 5), (5, 5)])
def test_resize_matches_jax_image_resize(in_size, out_size):
  x = np.random.default_rng(0).uniform(0, 255, (2, in_size, in_size + 3, 3)).astype(np.float32)
  got = preprocess.resize(x, (out_size, out_size))
  want = jax.image.resize(x, (2, out_size, out_size, 3), method="linear", antialias=True)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-3)


def _reference_pipeline(version_dir, split, image_size, channels):
  """TFDS's own decoder, the BT.601 grey formula and jax.image.resize, one example at a time."""
  src = tfds.builder_from_directory(version_dir).as_data_source(split)
  images, labels = [], []
  for ex in src:
    x = ex["image"].astype(np.float32)  # (H, W, C)
    if channels == 1 and x.shape[-1] == 3:
      x = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    x = np.asarray(jax.image.resize(x, (image_size, image_size, x.shape[-1]), "linear", antialias=True))
    if channels == 3 and x.shape[-1] == 1:
      x = np.concatenate([x] * 3, axis=-1)
    images.append(x / 127.5 - 1.0)
    labels.append(ex["label"])
  return np.stack(images), np.array(labels)


@pytest.mark.parametrize("shape,image_size,channels", [
    ((40, 40, 3), 28, 1),        # downsample + RGB -> grey
    ((40, 40, 3), 28, 0),        # downsample, keep RGB
    ((20, 20, 1), 32, 3),        # upsample + grey -> RGB
    ((None, None, 3), 24, 0),    # images of varying sizes
])
def test_standin_dataset_resize_and_channels(tmp_path, shape, image_size, channels):
  version_dir = fixtures.make_image_dataset(str(tmp_path), "standin_ds", n_train=12, n_eval=10,
                                            image_shape=shape, num_classes=5)
  cfg = _cfg(tmp_path, name="standin_ds", image_size=image_size, channels=channels, train_split="train",
             eval_split="validation")
  info = data.dataset_info(cfg)
  want_c = channels or shape[2]
  assert info == data.DatasetInfo(num_classes=5, train_size=12, eval_size=10,
                                  image_shape=(image_size, image_size, want_c))
  batches = list(data.eval_iterator(cfg, batch_size=4))
  got = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  ref_images, ref_labels = _reference_pipeline(version_dir, "validation", image_size, channels)
  np.testing.assert_allclose(got, ref_images, atol=2e-5)
  np.testing.assert_array_equal(labels, ref_labels)
  train = next(data.train_iterator(cfg, batch_size=6, seed=0))
  assert train["image"].shape == (6, image_size, image_size, want_c)


def test_missing_fashion_mnist_files_error(tmp_path, monkeypatch):
  empty = tmp_path / "nowhere"
  empty.mkdir()
  monkeypatch.setattr(fashion_mnist, "SOURCE_DIRS", (str(empty),))
  monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL", None)
  with pytest.raises(ValueError) as err:
    data.dataset_info(_cfg(tmp_path / "tfds", source_dir=str(tmp_path / "src")))
  message = str(err.value)
  for needle in ("data.name='fashion_mnist'", str(empty), str(tmp_path / "src"),
                 "train-images-idx3-ubyte", "apt-get install dataset-fashion-mnist", "data.source_dir",
                 "download disabled"):
    assert needle in message, needle


def test_download_step_fetches_and_checks_digests(tmp_path, monkeypatch):
  # A file:// URL stands in for the official mirror, so the download code runs offline.
  mirror = fixtures.write_fashion_mnist_idx(str(tmp_path / "mirror"), n_train=20, n_test=10, seed=2)
  digests = {}
  for name in os.listdir(mirror):
    with open(os.path.join(mirror, name), "rb") as f:
      digests[name] = hashlib.sha256(f.read()).hexdigest()
  monkeypatch.setattr(fashion_mnist, "SOURCE_DIRS", ())
  monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL", (tmp_path / "mirror").as_uri() + "/")
  corrupt = dict(digests, **{"t10k-labels-idx1-ubyte.gz": "0" * 64})
  monkeypatch.setattr(fashion_mnist, "DOWNLOAD_SHA256", corrupt)
  with pytest.raises(ValueError, match="download from file:.*t10k-labels-idx1-ubyte.gz has SHA-256"):
    data.dataset_info(_cfg(tmp_path / "bad"))
  monkeypatch.setattr(fashion_mnist, "DOWNLOAD_SHA256", digests)
  info = data.dataset_info(_cfg(tmp_path / "good"))
  assert (info.train_size, info.eval_size) == (20, 10)
  downloaded = os.listdir(tmp_path / "good" / "downloads" / fashion_mnist.DATASET_NAME)
  assert sorted(downloaded) == sorted(digests)


def test_unknown_and_unprepared_dataset_errors(tmp_path):
  with pytest.raises(ValueError,
                     match=r"data.name='no_such_dataset_xyz'.*data.data_dir=.*not a TFDS dataset"):
    data.dataset_info(_cfg(tmp_path, name="no_such_dataset_xyz"))
  with pytest.raises(ValueError,
                     match=r"data.name='mnist'.*tfds build mnist .*--file_format=array_record"):
    data.dataset_info(_cfg(tmp_path, name="mnist"))


def test_tfrecord_dataset_error(tmp_path):
  version_dir = fixtures.make_image_dataset(str(tmp_path), "tfrecord_ds", n_train=2, n_eval=2)
  info_path = os.path.join(version_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"  # as TFDS records a dataset written in the TensorFlow format
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match=r"data.name='tfrecord_ds'.*stored as tfrecord.*array_record"):
    data.dataset_info(_cfg(tmp_path, name="tfrecord_ds", eval_split="validation"))


def test_bad_config_fields(built):
  cfg = built[0]
  for field, value, needle in (
      ("augment", "mixup", "Unknown data.augment='mixup'. Allowed values: none, crop_flip."),
      ("channels", 2, "Unknown data.channels=2. Allowed values: 0, 1, 3."),
      ("image_size", 0, "data.image_size must be a positive int"),
      ("eval_split", "validation", "data.eval_split='validation' is not a split")):
    bad = cfg.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=re.escape(needle)):
      data.dataset_info(bad)
  with pytest.raises(ValueError, match="batch_size must be a positive multiple of process_count=3"):
    data.train_iterator(cfg, batch_size=32, seed=0, process_count=3)
