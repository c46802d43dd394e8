"""Image folders (DIR/<split>/<class>/<image>) as datasets, built without TensorFlow.

Folders are generated here: PNG, JPEG and WebP files of mixed sizes and modes (RGB, RGBA, grey),
a file that is not an image, and corrupt files where a test needs them. References decode each
file with PIL independently of the build.
"""
import io
import json
import os
import re

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vitjax import console
from vitjax import data
from vitjax.data import image_folder
from vitjax.data import preprocess

CLASSES = ("dog", "cat", "bird")  # written unsorted: labels follow the sorted names


@pytest.fixture(autouse=True)
def _fresh():
  image_folder.forget()  # each test lists its own folders
  console.setup()
  yield
  image_folder.forget()


def make_folder(root, splits=(("train", 4), ("val", 2)), classes=CLASSES, grey=False, seed=0,
                size=None):
  """Writes DIR/<split>/<class>/<i>.<ext>; returns {relative path: class name}."""
  rng = np.random.default_rng(seed)
  formats = [("png", "RGB"), ("jpg", "RGB"), ("png", "RGBA"), ("png", "L"), ("webp", "RGB")]
  written = {}
  for split, n in splits:
    for c, cls in enumerate(classes):
      d = os.path.join(root, split, cls)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        h, w = size or (18 + (i % 3) * 5, 24 - (i % 2) * 4)
        base = np.zeros((h, w, 3), np.float32) + 60.0 * c
        image = np.clip(base + rng.uniform(0, 120, (h, w, 3)), 0, 255).astype(np.uint8)
        ext, mode = ("png", "L") if grey else formats[(i + c) % len(formats)]
        pil = Image.fromarray(image).convert(mode)
        rel = os.path.join(split, cls, f"{i}.{ext}")
        pil.save(os.path.join(root, rel))
        written[rel] = cls
  return written


def _cfg(folder, data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      name="image_folder", folder=str(folder), data_dir=str(data_dir), source_dir="",
      skip_corrupt=False, image_size=16, channels=0, train_split="train", eval_split="val",
      augment="none"))
  cfg.update(overrides)
  return cfg


def _reference(root, rel, image_size, channels):
  with Image.open(os.path.join(root, rel)) as img:
    x = np.asarray(img.convert("L" if channels == 1 else "RGB"))
  x = x[..., None] if x.ndim == 2 else x
  return preprocess.preprocess_batch(x[None], image_size=image_size, channels=channels,
                                     augment=False)[0]


def test_folder_builds_once_and_reads_like_any_prepared_dataset(tmp_path, monkeypatch, capsys):
  root = tmp_path / "pets"
  written = make_folder(str(root))
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  data_dir = tmp_path / "tfds"
  cfg = _cfg(root, data_dir)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(num_classes=3, train_size=12, eval_size=6, image_shape=(16, 16, 3))
  assert info.class_names == ("bird", "cat", "dog")  # sorted folder names
  log = capsys.readouterr().err
  assert "18 images in 3 classes" in log and "1 files without an image extension ignored" in log
  assert re.search(r"built image_folder_pets/\w+: 18 images in [\d.]+ s \(\d+ images/s\)", log)
  # TFDS-compatible: tfds.data_source reads it back with the class names, RGBA/grey re-encoded RGB.
  name, version = info.name.split(":")
  assert os.listdir(data_dir) == ["image_folder_pets"]  # no temporary build folder left behind
  assert sorted(os.listdir(data_dir / name)) == [version]
  src = tfds.data_source(info.name, data_dir=str(data_dir))
  builder = tfds.builder_from_directory(str(data_dir / name / version))
  assert builder.info.features["label"].names == ["bird", "cat", "dog"]
  assert sorted(len(src[s]) for s in ("train", "val")) == [6, 12]
  assert all(src["train"][i]["image"].shape[-1] == 3 for i in range(12))
  # The eval pass holds every val file once, decoded and resized as PIL + preprocess_batch do.
  refs = {rel: _reference(root, rel, 16, 0) for rel in written if rel.startswith("val")}
  batches = list(data.eval_iterator(cfg, batch_size=4))
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  matched = []
  for image, label in zip(images, labels):
    rel = min(refs, key=lambda r: np.abs(refs[r] - image).max())
    np.testing.assert_allclose(image, refs[rel], atol=1e-5)
    assert info.class_names[label] == written[rel]
    matched.append(rel)
  assert sorted(matched) == sorted(refs)
  # A later run opens the build without building again.
  image_folder.forget()
  monkeypatch.setattr(image_folder, "build", lambda *a, **k: pytest.fail("built twice"))
  assert data.dataset_info(cfg) == info


def test_train_stream_resumes_from_its_state(tmp_path):
  root = tmp_path / "pets"
  make_folder(str(root), splits=(("train", 5),), size=(20, 20))
  cfg = _cfg(root, tmp_path / "tfds", train_split="train[:80%]", eval_split="train[80%:]",
             augment="crop_flip")
  it = data.train_iterator(cfg, batch_size=4, seed=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]  # crosses an epoch (12 examples)
  again = data.train_iterator(cfg, batch_size=4, seed=1)
  again.set_state(state)
  for w in want:
    got = next(again)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])


def test_splits_carved_from_train_are_disjoint_and_mixed(tmp_path):
  root = tmp_path / "pets"
  make_folder(str(root), splits=(("train", 8),), grey=True, size=(12, 12))
  data_dir = tmp_path / "tfds"
  # A split without a folder: one message naming the missing path and how to carve one.
  with pytest.raises(ValueError) as err:
    data.dataset_info(_cfg(root, data_dir, eval_split="test"))
  msg = str(err.value)
  for needle in ("data.eval_split='test'", str(root / "test"), "['train']", "'train[90%:]'"):
    assert needle in msg, (needle, msg)
  assert not data_dir.exists()  # checked before anything is built
  cfg = _cfg(root, data_dir, train_split="train[:75%]", eval_split="train[75%:]")
  info = data.dataset_info(cfg)
  assert (info.train_size, info.eval_size, info.image_shape) == (18, 6, (16, 16, 1))
  # Grey files of one size: stored as (12, 12, 1) and so kept decoded in memory by the pipeline.
  builder = tfds.builder_from_directory(str(data_dir / info.name.replace(":", "/")))
  assert builder.info.features["image"].shape == (12, 12, 1)
  evals = np.concatenate([b["image"][b["mask"]] for b in data.eval_iterator(cfg, batch_size=6)])
  eval_labels = np.concatenate([b["label"][b["mask"]] for b in data.eval_iterator(cfg, batch_size=6)])
  train = next(data.train_iterator(cfg, batch_size=18, seed=0))
  assert not {x.tobytes() for x in evals} & {x.tobytes() for x in train["image"]}
  assert len(set(eval_labels.tolist())) > 1  # records were shuffled when written: not one class


def _corrupt_folder(root):
  make_folder(str(root), splits=(("train", 3), ("val", 1)))
  jpeg = io.BytesIO()
  Image.fromarray(np.full((30, 30, 3), 99, np.uint8)).save(jpeg, format="jpeg")
  (root / "train" / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
  (root / "val" / "cat" / "fake.png").write_text("this is text, not a PNG")
  return [str(root / "train" / "dog" / "truncated.jpg"), str(root / "val" / "cat" / "fake.png")]


def test_corrupt_files_are_listed_and_nothing_is_written(tmp_path, capsys):
  root = tmp_path / "pets"
  bad = _corrupt_folder(root)
  data_dir = tmp_path / "tfds"
  with pytest.raises(ValueError) as err:
    data.dataset_info(_cfg(root, data_dir))
  msg = str(err.value)
  assert "2 of 14 image files cannot be read" in msg and "data.skip_corrupt=True" in msg
  for path in bad:
    assert path in msg
  assert not data_dir.exists()  # no partial dataset, not even the data_dir
  # skip_corrupt=True leaves them out, and says how many, on every run that reads the dataset.
  info = data.dataset_info(_cfg(root, data_dir, skip_corrupt=True))
  assert (info.train_size, info.eval_size) == (9, 3)
  assert "data.skip_corrupt=True: 2 corrupt image files left out" in capsys.readouterr().err
  image_folder.forget()
  with pytest.raises(ValueError, match="2 of 14 image files cannot be read"):
    data.dataset_info(_cfg(root, data_dir))  # the build that skipped them does not hide them


def test_a_changed_folder_is_built_again(tmp_path):
  root = tmp_path / "pets"
  make_folder(str(root), splits=(("train", 2), ("val", 1)))
  data_dir = tmp_path / "tfds"
  first = data.dataset_info(_cfg(root, data_dir))
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "dog" / "new.png")
  image_folder.forget()
  second = data.dataset_info(_cfg(root, data_dir))
  assert second.name != first.name and second.train_size == first.train_size + 1


@pytest.mark.parametrize("layout,needle", [
    ("missing", "does not exist"),
    ("empty", "has no split folders"),
    ("flat", "has no class subfolders; it holds images directly, which looks like "
             "DIR/<class>/<image>"),
    ("bad_split", "are not TFDS split names"),
])
def test_bad_layouts_name_the_path(tmp_path, layout, needle):
  root = tmp_path / "imgs"
  if layout != "missing":
    root.mkdir()
  if layout == "flat":
    (root / "cats").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "cats" / "a.png")
  if layout == "bad_split":
    (root / "my-train" / "cat").mkdir(parents=True)
  data_dir = tmp_path / "tfds"
  with pytest.raises(ValueError) as err:
    data.dataset_info(_cfg(root, data_dir))
  msg = str(err.value)
  assert needle in msg and str(root) in msg and "DIR/<split>/<class>/<image>" in msg, msg
  assert not data_dir.exists()


def test_config_fields_are_checked_before_the_folder(tmp_path):
  with pytest.raises(ValueError, match=r"data.name='image_folder' needs data.folder=DIR"):
    data.check_config(_cfg("", tmp_path))
  with pytest.raises(ValueError, match=r"data.folder='x' is set, but data.name='fashion_mnist'"):
    data.check_config(_cfg("x", tmp_path, name="fashion_mnist"))
  bad = _cfg("x", tmp_path).to_dict()
  bad["skip_corrupt"] = "yes"  # a plain object with the fields, as dataset_info also accepts
  with pytest.raises(ValueError, match=r"data.skip_corrupt must be True or False"):
    data.check_config(ml_collections.ConfigDict(bad, type_safe=False))
