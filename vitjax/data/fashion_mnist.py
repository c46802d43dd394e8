"""Fashion-MNIST built locally from its IDX files into a TFDS array_record dataset.

Fashion-MNIST: Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms" (arXiv:1708.07747, 2017). 70,000 28x28 grey images of 10 clothing
classes, shipped as four IDX files (LeCun's MNIST format):
{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz).

TFDS's own 'fashion_mnist' builder downloads and writes tfrecord, which needs TensorFlow to read.
This module registers a distinct builder, 'vitjax_fashion_mnist', that writes array_record (readable
with `tfds.data_source` and no TensorFlow). Users keep saying data.name='fashion_mnist';
`ensure_prepared` builds it on first use from the first place that has the four files:
  1. the directory the caller passes (config.data.source_dir),
  2. each directory in SOURCE_DIRS (Debian/Ubuntu's `dataset-fashion-mnist` package installs there),
  3. a download from DOWNLOAD_URL into <data_dir>/downloads/, when the machine is online.
Records keep the IDX order, so eval batches follow the official test-set order.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import urllib.request

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vitjax import console

# The name of the prepared dataset under data_dir (distinct from TFDS's tfrecord 'fashion_mnist').
DATASET_NAME = "vitjax_fashion_mnist"
# Directories searched after config.data.source_dir. Tests monkeypatch this.
SOURCE_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
# Official mirror of the IDX files; None disables the download step (tests set it so).
DOWNLOAD_URL: str | None = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 10.0
# SHA-256 of the official .gz files (as recorded in TFDS's url_checksums), checked after a download.
DOWNLOAD_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# IDX file stem per (split, part); each may be gzipped or not.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
IMAGE_SHAPE = (28, 28, 1)

# IDX type codes (third magic byte) and the big-endian numpy dtype each stands for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped when the name ends in .gz) into a numpy array.

  Layout: 2 zero bytes, a type code, the number of dimensions n, n big-endian uint32 sizes, then the
  data in C order.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(
        f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes.")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as an IDX file, gzipped when `path` ends in .gz (the inverse of `read_idx`)."""
  codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
  dtype = np.dtype(array.dtype).newbyteorder("=")
  if dtype not in codes:
    raise ValueError(f"IDX cannot hold dtype {array.dtype}; allowed: {sorted(str(d) for d in codes)}.")
  header = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[codes[dtype]]).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + body)


def find_idx_files(directory: str) -> dict[tuple[str, str], str] | None:
  """The four IDX paths in `directory` (each .gz or plain), or None when any is missing."""
  found = {}
  for key, stem in IDX_FILES.items():
    for candidate in (stem + ".gz", stem):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        found[key] = path
        break
    else:
      return None
  return found


def _download(target_dir: str) -> dict[tuple[str, str], str]:
  """Fetches the four .gz files from DOWNLOAD_URL into target_dir and checks their SHA-256."""
  for stem in IDX_FILES.values():
    name = stem + ".gz"
    path = os.path.join(target_dir, name)
    if os.path.isfile(path):
      continue
    console.log("downloading %s%s", DOWNLOAD_URL, name)
    with urllib.request.urlopen(DOWNLOAD_URL + name, timeout=DOWNLOAD_TIMEOUT_S) as response:
      payload = response.read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != DOWNLOAD_SHA256[name]:
      raise ValueError(f"Downloaded {name} has SHA-256 {digest}, expected {DOWNLOAD_SHA256[name]}.")
    os.makedirs(target_dir, exist_ok=True)  # only once something arrived
    with tempfile.NamedTemporaryFile(dir=target_dir, delete=False) as tmp:
      tmp.write(payload)
    os.replace(tmp.name, path)  # atomic: a concurrent reader never sees half a file
  return find_idx_files(target_dir)


def locate_sources(source_dir: str, data_dir: str) -> dict[tuple[str, str], str]:
  """Finds (or downloads) the four IDX files; one ValueError listing every place tried otherwise."""
  tried = []
  dirs = ([os.path.expanduser(source_dir)] if source_dir else []) + list(SOURCE_DIRS)
  for directory in dirs:
    files = find_idx_files(directory)
    if files:
      return files
    tried.append(directory)
  download_dir = os.path.join(data_dir, "downloads", DATASET_NAME)
  files = find_idx_files(download_dir)  # an earlier download
  if files:
    return files
  download_error = "download disabled"
  if DOWNLOAD_URL:
    try:
      return _download(download_dir)
    except (OSError, ValueError) as e:  # URLError and socket timeouts are OSErrors
      download_error = f"download from {DOWNLOAD_URL} failed: {e}"
  names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
  places = ", ".join(repr(d) for d in tried) or "(no directory)"
  raise ValueError(
      f"data.name='fashion_mnist' is not prepared in data.data_dir={data_dir!r} and its source "
      f"files were not found. Looked for {names} in: {places}; {download_error}. Get the files with "
      "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download them from "
      "https://github.com/zalandoresearch/fashion-mnist and set data.source_dir=<their directory>.")


def png_bytes(image: np.ndarray) -> bytes:
  """Encodes a uint8 (H, W) or (H, W, 1|3) image as PNG (what tfds.features.Image stores)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png")
  return buffer.getvalue()


class VitjaxFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files, written as array_record (no TensorFlow, no download)."""

  name = DATASET_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the four IDX files; records keep the IDX order."}
  # TFDS looks for a url-checksums file next to the builder's code; for a builder outside the
  # tensorflow_datasets package that lookup imports the `importlib_resources` backport, which
  # Python >= 3.9 installs lack. Nothing is downloaded through TFDS here, so there is no checksums
  # file to find.
  code_path = None

  def __init__(self, *, source_files: dict[tuple[str, str], str] | None = None, **kwargs):
    # Only building needs the files; reading a prepared copy goes through tfds.builder_from_directory.
    self._source_files = source_files
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST (Xiao et al., 2017): 28x28 grey images of 10 clothing classes.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        disable_shuffling=True,  # keep the IDX order (deterministic, official eval order)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are local
    if self._source_files is None:
      raise ValueError("VitjaxFashionMnist needs source_files to build; use ensure_prepared().")
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    images = read_idx(self._source_files[(split, "images")])  # (N, 28, 28) uint8
    labels = read_idx(self._source_files[(split, "labels")])  # (N,) uint8
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2] or len(images) != len(labels):
      raise ValueError(
          f"Fashion-MNIST {split} files hold images {images.shape} and labels {labels.shape}; expected "
          f"(N, 28, 28) and (N,).")
    if labels.size and labels.max() >= len(CLASS_NAMES):
      raise ValueError(f"Fashion-MNIST {split} labels go up to {labels.max()}; expected 0..9.")
    for i in range(len(images)):
      yield i, {"image": png_bytes(images[i]), "label": int(labels[i])}


def ensure_prepared(data_dir: str, source_dir: str = "") -> str:
  """Builds Fashion-MNIST into data_dir unless it is there already; returns the dataset's name there."""
  version_dir = epath.Path(data_dir) / DATASET_NAME / str(VitjaxFashionMnist.VERSION)
  if (version_dir / "dataset_info.json").exists():
    return DATASET_NAME
  files = locate_sources(source_dir, data_dir)
  source = os.path.dirname(files["train", "images"])
  console.log("building Fashion-MNIST into %s from %s", version_dir, source)
  builder = VitjaxFashionMnist(source_files=files, data_dir=data_dir, file_format="array_record")
  try:
    with console.library_output():
      builder.download_and_prepare()
  except Exception:
    # Another process (multi-host on a shared disk) may have finished the same build first.
    if not (version_dir / "dataset_info.json").exists():
      raise
  # TFDS leaves an empty downloads/extracted folder behind; remove it only if it is empty.
  try:
    os.rmdir(os.path.join(data_dir, "downloads", "extracted"))
  except OSError:
    pass
  return DATASET_NAME
