"""What pretrained checkpoints expect: ImageNet's class names and timm's eval preprocessing.

Both are data files shipped inside the package (nothing is downloaded at run or test time), written
by `python -m experiments.pretrained_tables` from the timm installed in the development environment:

  * imagenet_classes.txt: the 1000 ImageNet-1k class names, line i = class i, as "lemma, synonyms"
    (timm's imagenet_synsets.txt order, names from its imagenet_synset_to_lemma.txt).
  * timm_preprocess.json: per timm model name (bare, which is timm's default tag, or 'name.tag') the
    eval transform of its pretrained_cfg: input_size, crop_pct, crop_mode, interpolation, mean, std.
    Weights trained with other statistics give wrong predictions under the wrong mean/std, so the
    converter records the entry in the checkpoint's meta and `vitjax.predict` applies it.
"""
from __future__ import annotations

import functools
import json
import os

_DIR = os.path.dirname(os.path.abspath(__file__))
IMAGENET_CLASSES_FILE = os.path.join(_DIR, "imagenet_classes.txt")
TIMM_PREPROCESS_FILE = os.path.join(_DIR, "timm_preprocess.json")
# timm's defaults (timm.data.constants) for a model the table does not list.
TIMM_DEFAULT = {"crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# vitjax's own runs scale [0, 255] to [-1, 1] (vitjax/data/preprocess.py): mean = std = 0.5.
VITJAX_MEAN_STD = ([0.5], [0.5])


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
  with open(IMAGENET_CLASSES_FILE, encoding="utf-8") as f:
    names = tuple(line.rstrip("\n") for line in f)
  assert len(names) == 1000, f"{IMAGENET_CLASSES_FILE} holds {len(names)} names, not 1000"
  return names


@functools.lru_cache(maxsize=1)
def _timm_table() -> dict:
  with open(TIMM_PREPROCESS_FILE, encoding="utf-8") as f:
    return json.load(f)


def timm_preprocess(model_name: str, timm_name: str = "") -> dict:
  """timm's eval preprocessing of `model_name` ('vit_base_patch16_224.augreg_in21k' or a bare name).

  A tag the table lacks falls back to the bare `timm_name` (timm's default tag), an unknown model
  to timm's generic defaults; 'source' says which was used.
  """
  table = _timm_table()
  for key in (model_name, timm_name or model_name.split(".", 1)[0]):
    if key in table:
      return {**table[key], "source": f"timm pretrained_cfg of {key}"}
  return {**TIMM_DEFAULT, "source": "timm defaults (model not in vitjax/data/timm_preprocess.json)"}


def read_labels(path: str, num_classes: int, *, field: str = "--labels") -> tuple[str, ...]:
  """Class names from a text file, one per line (blank lines at the end ignored).

  Raises:
    ValueError: naming the file when it is missing or its line count is not `num_classes`.
  """
  if not os.path.isfile(path):
    raise ValueError(f"{field}={path!r} does not exist; expected a text file with one class name "
                     f"per line ({num_classes} lines)")
  with open(path, encoding="utf-8") as f:
    names = f.read().rstrip("\n").split("\n")
  names = [n.rstrip("\r") for n in names]
  if len(names) != num_classes:
    raise ValueError(f"{field}={path!r} has {len(names)} lines, but the checkpoint's head has "
                     f"{num_classes} classes; expected one class name per line, line i naming "
                     "class i")
  return tuple(names)
