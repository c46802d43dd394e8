"""Input pipelines: TFDS array_record datasets read without TensorFlow and iterated with grain.

    info = vitjax.data.dataset_info(config.data)
    train = vitjax.data.train_iterator(config.data, batch_size=256, seed=0)
    batch = next(train)              # {'image': (256, S, S, C) float32 in [-1, 1],
                                     #  'label': (256,) int32}
    state = train.get_state()        # JSON-serialisable; train.set_state(state) resumes the stream
    for batch in vitjax.data.eval_iterator(config.data, batch_size=256):
      ...                            # plus 'mask': False on the padding of the last batch

config.data fields: name ('fashion_mnist', 'image_folder', or any TFDS image-classification dataset
prepared as array_record under data_dir), data_dir ('' = TFDS's default), source_dir (where the
Fashion-MNIST IDX files are), folder (name='image_folder': DIR/<split>/<class>/<image>, built into
data_dir on first use; see image_folder.py), skip_corrupt (image folders: leave out files that do not
decode instead of stopping), image_size, train_split, eval_split (TFDS split strings, slices such as
'train[:90%]' included), channels (0 keep, 1 grey, 3 RGB), augment ('none' or 'crop_flip').
"""
import importlib

# Loaded on first use (PEP 562), so `from vitjax.data import pretrained` (what the weight converter
# needs) does not import TFDS and grain.
_EXPORTS = {"read_idx": "fashion_mnist", "write_idx": "fashion_mnist", "DatasetInfo": "pipeline",
            "check_config": "pipeline", "dataset_info": "pipeline", "eval_iterator": "pipeline",
            "train_iterator": "pipeline"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"vitjax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'vitjax.data' has no attribute {name!r}")
