"""The grain input pipeline: dataset info, an endless resumable train stream, one padded eval pass.

Both iterators are grain datasets over step numbers: the map for step k works out which examples
make up batch k (for training: a numpy permutation per epoch, drawn from the seed and the epoch
number), reads them together and runs the numpy preprocessing of preprocess.py on the whole batch.
Doing the shuffle per batch rather than per element keeps the Python cost per example near zero;
grain supplies the step index, threads that prefetch whole batches, and the iterator state
('next_index') that checkpoints the stream.

Multi-process (multi-host) runs: with global batch B = batch_size and P processes, process p gets
b = B // P examples per step. Training cuts each global batch of one shuffled stream (the same seed on
every process) into P contiguous slices, so in every step the P local batches are disjoint and
together form the global batch a single process would see. Evaluation cuts each global batch of B
positions the same way and pads positions past the end of the split, so every process runs the same
number of steps and the 'mask' field picks out each real example exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Any

import grain
import numpy as np

from vitjax import choices
from vitjax.data import image_folder
from vitjax.data import preprocess
from vitjax.data import sources

AUGMENTATIONS = ("none", "crop_flip")
CHANNELS = (0, 1, 3)
# Batches decoded in parallel and kept ready; each holds a whole batch, so keep both small.
NUM_THREADS = min(4, os.cpu_count() or 1)
PREFETCH_BATCHES = NUM_THREADS + 2
# Splits of fixed-size images up to this many decoded bytes keep their decoded images in memory.
CACHE_MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset (sizes are in examples)."""
  num_classes: int
  train_size: int
  eval_size: int
  image_shape: tuple[int, int, int]  # (H, W, C) after preprocessing
  # Not compared: two configs that read the same examples are the same dataset to the loop.
  class_names: tuple[str, ...] = dataclasses.field(default=(), compare=False)
  # What tfds.data_source / tfds.builder take to read the prepared copy: 'name[/config]:version'.
  name: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """config.data, checked once."""
  name: str
  data_dir: str
  source_dir: str
  image_size: int
  train_split: str
  eval_split: str
  channels: int
  augment: str
  folder: str = ""
  skip_corrupt: bool = False


def _field(cfg, name: str, default: Any = dataclasses.MISSING) -> Any:
  value = getattr(cfg, name, default)
  if value is dataclasses.MISSING:
    raise ValueError(f"data.{name} is required.")
  return value


def _spec(cfg) -> _Spec:
  """Reads and validates config.data (an ml_collections ConfigDict or any object with the fields)."""
  spec = _Spec(
      name=_field(cfg, "name", "fashion_mnist"),
      data_dir=sources.resolve_data_dir(_field(cfg, "data_dir", "") or ""),
      source_dir=_field(cfg, "source_dir", "") or "",
      image_size=_field(cfg, "image_size"),
      train_split=_field(cfg, "train_split", "train"),
      eval_split=_field(cfg, "eval_split", "test"),
      channels=_field(cfg, "channels", 0),
      augment=_field(cfg, "augment", "none"),
      folder=_field(cfg, "folder", "") or "",
      skip_corrupt=_field(cfg, "skip_corrupt", False),
  )
  if not isinstance(spec.image_size, int) or isinstance(spec.image_size, bool) or spec.image_size < 1:
    raise ValueError(f"data.image_size must be a positive int, got {spec.image_size!r}.")
  if isinstance(spec.channels, bool):   # True == 1 would pass the membership test
    raise choices.unknown("data.channels", spec.channels, CHANNELS)
  choices.check("data.channels", spec.channels, CHANNELS)   # 0 keeps the dataset's channels
  choices.check("data.augment", spec.augment, AUGMENTATIONS)
  for field in ("train_split", "eval_split"):
    if not isinstance(getattr(spec, field), str) or not getattr(spec, field):
      raise ValueError(f"data.{field} must be a TFDS split name such as 'train', got "
                       f"{getattr(spec, field)!r}.")
  if not isinstance(spec.skip_corrupt, bool):
    raise ValueError(f"data.skip_corrupt must be True or False, got {spec.skip_corrupt!r}.")
  if spec.name == image_folder.NAME and not spec.folder:
    raise ValueError("data.name='image_folder' needs data.folder=DIR, a folder laid out as "
                     "DIR/<split>/<class>/<image>.")
  if spec.folder and spec.name != image_folder.NAME:
    raise ValueError(f"data.folder={spec.folder!r} is set, but data.name={spec.name!r}; set "
                     "data.name='image_folder' to read the folder (or clear data.folder).")
  return spec


def check_config(cfg):
  """Checks config.data's fields without reading any data (the runner calls it first)."""
  _spec(cfg)


def _open(spec: _Spec):
  splits = {"data.train_split": spec.train_split, "data.eval_split": spec.eval_split}
  return sources.open_dataset(spec.name, spec.data_dir, spec.source_dir, folder=spec.folder,
                              skip_corrupt=spec.skip_corrupt, splits=splits)


def _local_batch(batch_size: int, process_index: int, process_count: int) -> int:
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}.")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}.")
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size must be a positive multiple of process_count={process_count}, got "
                     f"{batch_size!r}.")
  return batch_size // process_count


def dataset_info(cfg) -> DatasetInfo:
  """Sizes, class count and preprocessed image shape of config.data's dataset.

  Builds Fashion-MNIST into data.data_dir on first use if needed.
  """
  spec = _spec(cfg)
  builder = _open(spec)
  train = sources.data_source(builder, spec.train_split, field="data.train_split")
  evals = sources.data_source(builder, spec.eval_split, field="data.eval_split")
  channels = spec.channels or sources.image_channels(builder)
  return DatasetInfo(
      num_classes=builder.info.features["label"].num_classes,
      train_size=len(train),
      eval_size=len(evals),
      image_shape=(spec.image_size, spec.image_size, channels),
      class_names=tuple(builder.info.features["label"].names),
      name=sources.tfds_name(builder),
  )


class _DecodedSplit:
  """Decoded images of one split, filled in as examples are first read (decode once per process).

  Rows are written before their `done` flag, and two threads racing on one row write the same bytes,
  so concurrent grain threads can share it without a lock.
  """

  def __init__(self, num_examples: int, image_shape: tuple[int, int, int]):
    self.images = np.empty((num_examples,) + image_shape, np.uint8)  # (N, H, W, C)
    self.labels = np.empty((num_examples,), np.int32)  # (N,)
    self.done = np.zeros((num_examples,), bool)  # (N,)


@functools.lru_cache(maxsize=4)
def _decoded_split(dataset_path: str, split: str, num_examples: int,
                   image_shape: tuple[int, int, int]) -> _DecodedSplit:
  # Keyed by the prepared folder, so every iterator over a split in this process shares one copy.
  del dataset_path, split  # only part of the key
  return _DecodedSplit(num_examples, image_shape)


class _BatchReader:
  """Reads the examples at a batch of indices and preprocesses them together.

  A split whose images all have one size and fit in CACHE_MAX_BYTES (Fashion-MNIST: 47 MB, CIFAR:
  150 MB) keeps every image it decodes, so from the second epoch on a batch is a numpy gather and
  the per-step host cost no longer includes 256 PNG decodes, which on a small machine would take
  CPU time from the training step. Nothing is decoded ahead of use, so start-up stays instant.
  """

  def __init__(self, spec: _Spec, split: str, field: str, *, augment: bool):
    builder = _open(spec)
    self.source = sources.data_source(builder, split, field=field)
    if not len(self.source):
      raise ValueError(f"{field}={split!r} of data.name={spec.name!r} is empty.")
    self._decode_channels = sources.image_channels(builder)
    self.image_shape = (spec.image_size, spec.image_size, spec.channels or self._decode_channels)
    self._spec = spec
    self._augment = augment
    self._decoded = None
    stored = sources.fixed_image_size(builder)
    if stored and len(self.source) * stored[0] * stored[1] * self._decode_channels <= CACHE_MAX_BYTES:
      self._decoded = _decoded_split(os.fspath(builder.data_dir), split, len(self.source),
                                     stored + (self._decode_channels,))

  def _read(self, indices: np.ndarray):
    """Decoded images (a uint8 batch, or a list when sizes differ) and int32 labels."""
    records = self.source.__getitems__(indices.tolist())
    images = [preprocess.decode_image(r["image"], self._decode_channels) for r in records]
    if len({im.shape for im in images}) == 1:
      images = np.stack(images)  # (b, H, W, C) uint8: the whole-batch path
    return images, np.asarray([r["label"] for r in records], np.int32)

  def _load(self, indices: np.ndarray):
    cache = self._decoded
    if cache is None:
      return self._read(indices)
    todo = np.unique(indices[~cache.done[indices]])
    if todo.size:
      cache.images[todo], cache.labels[todo] = self._read(todo)
      cache.done[todo] = True
    return cache.images[indices], cache.labels[indices]  # (b, H, W, C) uint8, (b,) int32

  def __call__(self, indices: np.ndarray,
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    images, label = self._load(indices)
    image = preprocess.preprocess_batch(images, image_size=self._spec.image_size,
                                        channels=self._spec.channels, augment=self._augment, rng=rng)
    return {"image": image, "label": label}


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=NUM_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)


def train_iterator(cfg, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """The endless, shuffled, resumable training stream of this process.

  Epochs repeat, each reshuffled from `seed` (same seed -> same stream). The returned grain
  DatasetIterator has get_state() (a small JSON-serialisable dict) and set_state(state): a fresh
  iterator restored to a saved state continues with exactly the batches the saved one would have
  produced.

  Args:
    cfg: config.data.
    batch_size: the global batch size B (over all processes).
    seed: shuffle and augmentation seed; give every process the same one.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    An iterator of {'image': float32 (b, S, S, C) in [-1, 1], 'label': int32 (b,)}, b = B // P.
  """
  spec = _spec(cfg)
  local = _local_batch(batch_size, process_index, process_count)
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  reader = _BatchReader(spec, spec.train_split, "data.train_split", augment=spec.augment == "crop_flip")
  num_examples, seed = len(reader.source), int(seed) % 2**63

  @functools.lru_cache(maxsize=2)  # a step needs at most two epochs' orders
  def epoch_order(epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, epoch))).permutation(
        num_examples)

  def read(step: int) -> dict[str, np.ndarray]:
    # Positions of this process's slice of global batch `step` in the endless stream of epochs.
    positions = step * batch_size + process_index * local + np.arange(local)  # (b,)
    epoch, offset = np.divmod(positions, num_examples)
    indices = np.concatenate([epoch_order(e)[offset[epoch == e]] for e in np.unique(epoch)])  # (b,)
    # The augmentation draw depends only on (seed, process, step): reproducible after a restore.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, process_index, step)))
    return reader(indices, rng)

  # grain supplies the step index, prefetching threads and the checkpointable position ('next_index').
  ds = grain.MapDataset.range(sys.maxsize).map(read)
  return iter(ds.to_iter_dataset(_read_options()))


def eval_iterator(cfg, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """One in-order pass over the eval split of this process, padded to whole batches.

  Every process yields the same number of batches, ceil(N / B). Padding examples have a zero image,
  label 0 and mask False. Iterating the result again starts a new pass.

  Args:
    cfg: config.data.
    batch_size: the global batch size B (over all processes).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    An iterable of {'image': float32 (b, S, S, C), 'label': int32 (b,), 'mask': bool (b,)}, b = B // P.
  """
  spec = _spec(cfg)
  local = _local_batch(batch_size, process_index, process_count)
  reader = _BatchReader(spec, spec.eval_split, "data.eval_split", augment=False)
  num_examples = len(reader.source)
  empty_image = np.zeros((0,) + reader.image_shape, np.float32)

  def read(step: int) -> dict[str, np.ndarray]:
    positions = step * batch_size + process_index * local + np.arange(local)  # (b,)
    mask = positions < num_examples
    if mask.any():
      batch = reader(positions[mask])
    else:
      batch = {"image": empty_image, "label": np.zeros((0,), np.int32)}
    pad = local - int(mask.sum())  # real examples come first within a local batch
    return {
        "image": np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
        "label": np.pad(batch["label"], (0, pad)),
        "mask": mask,
    }

  num_steps = math.ceil(num_examples / batch_size)
  return grain.MapDataset.range(num_steps).map(read).to_iter_dataset(_read_options())
