"""Fashion-MNIST test accuracy and GMACs of vitjax's token mixers at one small budget.

    python -m experiments.attention_scaling.mixer_accuracy [--steps=300] [--mixers=mhsa,urpe,...]

Each entry trains with its config (`configs/<name>.py`, `configs/vit.py` for mhsa) for the same number of
steps, through the same runner (`vitjax.train.train_and_evaluate`), in this one process; then the test
accuracy, XLA-counted GMACs per image (multiply-accumulates) and the wall time of the run are tabulated.
The wave-1 mixers' configs are the same vit_nano4 with only the token mixer swapped; `soft`, `vir` and
`shiftadd` are their families' Fashion-MNIST configs (the model column says which). Rows of earlier runs
in mixer_accuracy.json are kept (a mixer run again replaces its row); writes mixer_accuracy.md and .json
next to this file.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import time

from absl import app
from absl import flags

MIXERS = ["mhsa", "krpe_fft", "urpe", "gmm_mask", "spectral_gating", "hyena_nd", "gnconv"]
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per mixer (batch 128).")
_MIXERS = flags.DEFINE_list("mixers", MIXERS, "Mixers (config names) to train.")
HERE = os.path.dirname(os.path.abspath(__file__))


def _describe(config) -> str:
  m = config.model
  if config.model_name == "vit_nano4":
    return f"vit_nano4 ({m.width} wide, {m.depth} blocks)"
  return config.model_name


def main(argv):
  del argv
  from vitjax import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(HERE, "mixer_accuracy.json")
  results = []
  if os.path.exists(path):
    with open(path) as f:
      results = [r for r in json.load(f) if r["mixer"] not in _MIXERS.value]
  for mixer in _MIXERS.value:
    config = importlib.import_module(
        f"vitjax.configs.{'vit' if mixer == 'mhsa' else mixer}").get_config()
    config.total_steps = _STEPS.value
    config.warmup_steps = min(config.warmup_steps, _STEPS.value // 5)
    config.eval_every_steps = config.checkpoint_every_steps = _STEPS.value
    config.log_every_steps = 50
    config.data.augment = "none"
    workdir = os.path.join("runs", "experiments", "mixers", mixer)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    row = train.train_and_evaluate(config, workdir)
    results.append(dict(mixer=mixer, model=_describe(config), steps=_STEPS.value,
                        accuracy=row["eval/accuracy"], gmacs=row["eval/gmacs"],
                        wall_sec=time.time() - t0, load_after=os.getloadavg()[0],
                        mixer_kwargs=dict(config.model.get("mixer_kwargs", {}))))
    print(results[-1], flush=True)
  lines = ["Fashion-MNIST 28x28 (32 px where the model column says so), no augmentation, the same budget "
           f"for every row ({_STEPS.value} steps of batch 128, AdamW, warmup + cosine).",
           "", "| mixer (config) | model | settings | test accuracy | GMACs/image | wall time (s) |",
           "|---|---|---|---|---|---|"]
  for r in results:
    if r.get("steps", _STEPS.value) != _STEPS.value:
      continue
    kw = ", ".join(f"{k}={v}" for k, v in r["mixer_kwargs"].items()) or "-"
    model = r.get("model", "vit_nano4 (96 wide, 3 blocks)")
    lines.append(f"| `{r['mixer']}` | {model} | {kw} | {r['accuracy']:.4f} | {r['gmacs']:.4f} | "
                 f"{r['wall_sec']:.0f} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(HERE, "mixer_accuracy.md"), "w") as f:
    f.write(table + "\n")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
