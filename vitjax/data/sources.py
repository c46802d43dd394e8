"""Finding a prepared TFDS image-classification dataset and reading it without TensorFlow.

A dataset is read straight from its prepared directory, <data_dir>/<name>[/<config>]/<version>, with
`tfds.builder_from_directory`, so neither its builder code nor TensorFlow is needed: any TFDS dataset
that was prepared in the array_record format (features 'image' and 'label') works by name. The name may
carry a config and a version as in TFDS ('imagenet2012', 'cifar10:3.0.2', 'name/config:1.0.0'); without
a version the newest prepared one is used. 'fashion_mnist' is built on first use (see fashion_mnist.py), and
so is 'image_folder', from the folder data.folder names (see image_folder.py).
"""
from __future__ import annotations

import functools
import os
import re

from etils import epath
import tensorflow_datasets as tfds

from vitjax.data import fashion_mnist
from vitjax.data import image_folder

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def resolve_data_dir(data_dir: str) -> str:
  """'' -> TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets); '~' is expanded."""
  return os.path.expanduser(data_dir) if data_dir else os.path.expanduser(tfds.core.constants.DATA_DIR)


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split("."))


def _prepared_versions(dataset_dir: epath.Path) -> list[str]:
  """Version folders under dataset_dir that hold a finished build (a dataset_info.json)."""
  if not dataset_dir.is_dir():
    return []
  return sorted((p.name for p in dataset_dir.iterdir()
                 if _VERSION_RE.match(p.name) and (p / "dataset_info.json").exists()), key=_version_key)


def _not_prepared_error(name: str, data_dir: str, detail: str) -> ValueError:
  base = name.split(":")[0].split("/")[0]
  try:
    tfds.builder_cls(base)
    known = True
  except tfds.core.registered.DatasetNotFoundError:
    known = False
  if known:
    how = (f"Prepare it once with `tfds build {base} --data_dir={data_dir} "
           "--file_format=array_record` (or in Python: tfds.builder("
           f"'{base}', data_dir=..., file_format='array_record').download_and_prepare()). Datasets "
           "with manual downloads such as imagenet2012 also need --manual_dir=<folder with the "
           "archives>; builders that use TensorFlow need the 'tf' extra at build time only.")
  else:
    how = ("It is not a TFDS dataset either. Use 'fashion_mnist' (built locally), 'image_folder' "
           "with data.folder=DIR (DIR/<split>/<class>/<image>, built locally), a TFDS dataset name, "
           "or any image-classification dataset prepared with TFDS in array_record format under "
           "data.data_dir.")
  return ValueError(
      f"data.name={name!r} is not prepared under data.data_dir={data_dir!r} ({detail}). {how}")


@functools.lru_cache(maxsize=16)
def open_prepared(path: str) -> tfds.core.DatasetBuilder:
  """The read-only builder of one prepared version folder (cached: reading its JSON costs ~10 ms)."""
  return tfds.builder_from_directory(path)


def open_dataset(name: str, data_dir: str, source_dir: str = "", *, folder: str = "",
                 skip_corrupt: bool = False,
                 splits: dict[str, str] | None = None) -> tfds.core.DatasetBuilder:
  """A read-only TFDS builder for data.name under data_dir, checked to be an array_record classifier.

  Args:
    name: data.name; 'fashion_mnist' and 'image_folder' are built into data_dir on first use.
    data_dir: the resolved data directory (see resolve_data_dir).
    source_dir: data.source_dir, where the Fashion-MNIST IDX files may be.
    folder: data.folder, the DIR/<split>/<class>/<image> folder of data.name='image_folder'.
    skip_corrupt: data.skip_corrupt (image folders: leave out files that do not decode).
    splits: config field -> split string, for image folders to check before building.

  Raises:
    ValueError: naming data.name / data.data_dir and how to prepare the dataset, when it is missing,
      not array_record, or not an image classification dataset.
  """
  if not name or not isinstance(name, str):
    raise ValueError(f"data.name must be a non-empty dataset name, got {name!r}.")
  if name == "fashion_mnist":
    name = fashion_mnist.ensure_prepared(data_dir, source_dir)
  elif name == image_folder.NAME:
    name = image_folder.ensure_prepared(folder, data_dir, skip_corrupt=skip_corrupt, splits=splits)
  base, _, version = name.partition(":")
  dataset_dir = epath.Path(data_dir) / base
  versions = _prepared_versions(dataset_dir)
  if not versions:
    raise _not_prepared_error(name, data_dir, f"no prepared version in {os.fspath(dataset_dir)}")
  if version and version not in versions:
    raise _not_prepared_error(name, data_dir, f"version {version} not found; prepared: {versions}")
  builder = open_prepared(os.fspath(dataset_dir / (version or versions[-1])))

  info = builder.info
  if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"data.name={name!r} in data.data_dir={data_dir!r} is stored as {info.file_format.value}; "
        "reading without TensorFlow needs array_record. Rebuild it with "
        "`tfds build ... --file_format=array_record`.")
  features = info.features
  if "image" not in features or "label" not in features or not isinstance(
      features["label"], tfds.features.ClassLabel):
    raise ValueError(
        f"data.name={name!r} is not an image classification dataset: it needs an 'image' feature and a "
        f"ClassLabel 'label' feature; it has {features}.")
  return builder


def tfds_name(builder: tfds.core.DatasetBuilder) -> str:
  """'name[/config]:version', the string tfds.data_source(..., data_dir=...) reads the copy with."""
  info = builder.info
  config = f"/{info.config_name}" if info.config_name else ""
  return f"{info.name}{config}:{info.version}"


def image_channels(builder: tfds.core.DatasetBuilder) -> int:
  """Channels of the stored images as decoded: 1 for grey, else 3 (alpha and palettes become RGB)."""
  shape = builder.info.features["image"].shape
  return 1 if shape and shape[-1] == 1 else 3


def fixed_image_size(builder: tfds.core.DatasetBuilder) -> tuple[int, int] | None:
  """(H, W) when every stored image has the same size, else None."""
  shape = builder.info.features["image"].shape
  return (shape[0], shape[1]) if shape and None not in shape[:2] else None


def data_source(builder: tfds.core.DatasetBuilder, split: str, *, field: str):
  """The random-access source of `split`, images left encoded (they are decoded in batches later).

  Args:
    builder: from open_dataset.
    split: a TFDS split string ('train', 'test', 'train[:90%]', ...).
    field: the config field that named it, for the error message.
  """
  decoders = None
  if isinstance(builder.info.features["image"], tfds.features.Image):
    decoders = {"image": tfds.decode.SkipDecoding()}
  try:
    return builder.as_data_source(split, decoders=decoders)
  except ValueError as e:
    raise ValueError(
        f"{field}={split!r} is not a split of {builder.info.full_name}: allowed are "
        f"{sorted(builder.info.splits)} or TFDS slices of them such as 'train[:90%]' ({e}).") from None
