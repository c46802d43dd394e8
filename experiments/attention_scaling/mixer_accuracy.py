"""Fashion-MNIST test accuracy and GMACs of every wave-1 token mixer in the same small ViT, same budget.

    python -m experiments.attention_scaling.mixer_accuracy [--steps=300] [--mixers=mhsa,urpe,...]

Each mixer trains with its config (`configs/<mixer>.py`, `configs/vit.py` for mhsa: the same vit_nano4 on
28x28 Fashion-MNIST, only the token mixer differs) for the same number of steps, through the same runner
(`vitjax.train.train_and_evaluate`), in this one process; then the test accuracy, XLA-counted GMACs per image
(multiply-accumulates) and the wall time of the run are tabulated. Writes mixer_accuracy.md and .json
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
_MIXERS = flags.DEFINE_list("mixers", MIXERS, "Mixers to train.")
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
  del argv
  from vitjax import train  # pylint: disable=g-import-not-at-top
  results = []
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
    results.append(dict(mixer=mixer, accuracy=row["eval/accuracy"], gmacs=row["eval/gmacs"],
                        wall_sec=time.time() - t0, mixer_kwargs=dict(config.model.get("mixer_kwargs", {}))))
    print(results[-1], flush=True)
  m = config.model
  lines = [f"Same model ({config.model_name}, width {m.width}, depth {m.depth}, {m.num_heads} heads, patch 4, "
           f"GAP head), data (Fashion-MNIST 28x28, no augmentation) and budget ({_STEPS.value} steps of "
           f"batch {config.batch_size}, AdamW, warmup + cosine) for every mixer.",
           "", "| mixer | settings | test accuracy | GMACs/image | wall time (s) |", "|---|---|---|---|---|"]
  for r in results:
    kw = ", ".join(f"{k}={v}" for k, v in r["mixer_kwargs"].items()) or "-"
    lines.append(f"| `{r['mixer']}` | {kw} | {r['accuracy']:.4f} | {r['gmacs']:.4f} | {r['wall_sec']:.0f} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(HERE, "mixer_accuracy.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(HERE, "mixer_accuracy.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
