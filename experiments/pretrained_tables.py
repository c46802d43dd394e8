"""Writes the two data files vitjax ships for pretrained weights, from the timm installed here.

    python -m experiments.pretrained_tables [--check]

  * vitjax/data/imagenet_classes.txt: the 1000 ImageNet-1k class names, line i = class i. Made from
    timm's own files (timm/data/_info/imagenet_synsets.txt, the 1000 WordNet ids in class-index order,
    and imagenet_synset_to_lemma.txt, id -> "lemma, synonyms"), which is the order every ImageNet-1k
    checkpoint in timm, torchvision and big_vision uses. Nothing is downloaded.
  * vitjax/data/timm_preprocess.json: for every timm model name the converter supports, bare and with
    each pretrained tag, the eval preprocessing of timm's pretrained_cfg (input size, crop_pct,
    crop_mode, interpolation, mean, std). `vitjax.convert.from_timm` records the entry in the
    checkpoint's meta, and `python -m vitjax.predict` applies it.

--check compares the files with what timm says now and exits 1 on a difference (tests run the same
comparison when timm is importable). Needs the torch extra; on a CPU-only torch next to a CUDA
torchvision wheel it imports timm through tests/torch_compat.py's workaround.
"""
from __future__ import annotations

import json
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES_PATH = os.path.join(ROOT, "vitjax", "data", "imagenet_classes.txt")
PREPROCESS_PATH = os.path.join(ROOT, "vitjax", "data", "timm_preprocess.json")


def _timm():
  sys.path.insert(0, ROOT)
  from tests import torch_compat  # pylint: disable=g-import-not-at-top
  return torch_compat.import_timm()


def imagenet_classes(timm) -> list[str]:
  del timm  # imported so that timm.data is importable below
  synsets = pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt").decode().split()
  lemmas = dict(line.split("\t", 1) for line in
                pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
                .splitlines() if line.strip())
  assert len(synsets) == 1000, len(synsets)
  return [lemmas[s].strip() for s in synsets]


def preprocess_entry(cfg) -> dict:
  return {"input_size": list(cfg.input_size[1:]), "crop_pct": cfg.crop_pct,
          "crop_mode": cfg.crop_mode or "center", "interpolation": cfg.interpolation,
          "mean": list(cfg.mean), "std": list(cfg.std)}


def timm_preprocess(timm) -> dict:
  from vitjax.convert import timm as vtimm  # pylint: disable=g-import-not-at-top
  table = {}
  for name in vtimm.supported_models():
    table[name] = preprocess_entry(timm.models.get_pretrained_cfg(name))
    for tagged in timm.list_pretrained(name + ".*"):
      table[tagged] = preprocess_entry(timm.models.get_pretrained_cfg(tagged))
  return dict(sorted(table.items()))


def main(argv):
  timm = _timm()
  classes = "\n".join(imagenet_classes(timm)) + "\n"
  table = json.dumps(timm_preprocess(timm), indent=1) + "\n"
  if "--check" in argv:
    same = (open(CLASSES_PATH).read() == classes and json.loads(open(PREPROCESS_PATH).read())
            == json.loads(table))
    print("up to date" if same else "differs from timm " + timm.__version__)
    return 0 if same else 1
  with open(CLASSES_PATH, "w") as f:
    f.write(classes)
  with open(PREPROCESS_PATH, "w") as f:
    f.write(table)
  print(f"wrote {CLASSES_PATH} and {PREPROCESS_PATH} from timm {timm.__version__}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
