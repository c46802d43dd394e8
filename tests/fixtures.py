"""Small synthetic datasets for the tests: Fashion-MNIST IDX files and a TFDS array_record stand-in.

Both are learnable (each class has its own pattern; noise on top) and small enough to build in about a
second, so tests of the pipeline and of the training loop can run offline.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from vitjax.data import fashion_mnist


def _templates(seed: int, num_classes: int, channels: int) -> np.ndarray:
  """One random 7x7 on/off pattern per class, (K, 7, 7, C); shared by all splits of a dataset."""
  return np.random.default_rng((seed, 7)).random((num_classes, 7, 7, channels)) > 0.5


def _class_images(rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray,
                  size: tuple[int, int]) -> np.ndarray:
  """uint8 (n, H, W, C) images: each label's template scaled up to H x W, plus uniform noise."""
  h, w = size
  c = templates.shape[-1]
  rows = np.arange(h) * 7 // h
  cols = np.arange(w) * 7 // w
  pattern = templates[:, rows][:, :, cols].astype(np.float32) * 180.0  # (K, H, W, C)
  noise = rng.uniform(0.0, 75.0, size=(len(labels), h, w, c))
  return np.clip(pattern[labels] + noise, 0, 255).astype(np.uint8)


def write_fashion_mnist_idx(directory: str, n_train: int = 256, n_test: int = 100,
                            seed: int = 0) -> str:
  """Writes the four gzipped Fashion-MNIST IDX files (28x28 uint8, 10 classes) of synthetic data.

  Returns:
    `directory`, now holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  templates = _templates(seed, 10, 1)
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = _class_images(rng, templates, labels, (28, 28))[..., 0]  # (n, 28, 28)
    for part, array in (("images", images), ("labels", labels)):
      path = os.path.join(directory, fashion_mnist.IDX_FILES[split, part] + ".gz")
      fashion_mnist.write_idx(path, array)
  return directory


def make_image_dataset(data_dir: str, name: str, *, n_train: int, n_eval: int,
                       image_shape: tuple = (40, 40, 3), num_classes: int = 5, seed: int = 0) -> str:
  """Writes an array_record image-classification dataset `name` with 'train' and 'validation' splits.

  A stand-in for imagenet2012 and the like, read back through vitjax.data's generic path. An image_shape
  of (None, None, C) gives images of random sizes between 24 and 48 pixels per side.

  Returns:
    The prepared version folder, <data_dir>/<name>/1.0.0.
  """
  shape = tuple(image_shape)
  templates = _templates(seed, num_classes, shape[2])
  dataset_name = name

  def examples(split: str, n: int):
    rng = np.random.default_rng((seed, 0 if split == "train" else 1))
    labels = rng.integers(0, num_classes, size=n)
    for i, label in enumerate(labels):
      h, w = (int(s) if s else int(rng.integers(24, 49)) for s in shape[:2])
      image = _class_images(rng, templates, labels[i:i + 1], (h, w))[0]
      yield i, {"image": fashion_mnist.png_bytes(image), "label": int(label)}

  class _StandIn(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see VitjaxFashionMnist.code_path

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=shape),
              "label": tfds.features.ClassLabel(num_classes=num_classes),
          }),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train", n_train),
              "validation": self._generate_examples("validation", n_eval)}

    def _generate_examples(self, split, n):
      yield from examples(split, n)

  builder = _StandIn(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.path.join(data_dir, name, "1.0.0")
