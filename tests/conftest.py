"""Test-wide JAX setup: 8 fake CPU devices, a persistent compilation cache, no TF on GPUs."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get("VITJAX_TEST_CACHE",
                        os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import os as _os  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

from tests import fixtures  # noqa: E402

FMNIST_TRAIN, FMNIST_TEST = 256, 45   # an odd test split exercises the padded last eval batch


class FashionMnist(NamedTuple):
  """The synthetic Fashion-MNIST every test shares: IDX files, a TFDS data_dir, and the arrays."""
  source_dir: str                      # the four gzipped IDX files
  data_dir: str                        # where vitjax.data builds the array_record copy
  arrays: dict                         # split ('train' | 'test') -> (uint8 (n, 28, 28), labels)


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> FashionMnist:
  """A small learnable Fashion-MNIST stand-in (tests/fixtures.py), written once per session."""
  from vitjax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("fmnist")
  source = fixtures.write_fashion_mnist_idx(str(root / "idx"), n_train=FMNIST_TRAIN,
                                            n_test=FMNIST_TEST, seed=1)
  arrays = {split: tuple(fashion_mnist.read_idx(
      _os.path.join(source, f"{stem}-{part}-ubyte.gz")) for part in ("images-idx3", "labels-idx1"))
            for split, stem in (("train", "train"), ("test", "t10k"))}
  return FashionMnist(source, str(root / "tfds"), arrays)
