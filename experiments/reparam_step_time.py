"""Training-step time of a merged reparameterized ViT relative to its unmerged (parallel-branch)
form (Zhou, Chaudhary, Datta, 2025; `vitjax.models.reparam`).

    python -m experiments.reparam_step_time                 # both settings, 15 repeats of 5 steps
    python -m experiments.reparam_step_time --settings=fashion_mnist --repeats=3 --steps=2

Settings (branches B = 3 in both):
  * fashion_mnist: the Fashion-MNIST reference model (vitjax/configs/vit.py: vit_nano4, width 96,
    depth 3, 3 heads, MLP 384, gap pooling, 28 px, 1 channel, 10 classes), batch 128;
  * vit_ti16_d6: ViT-Ti/16 at 224 px with depth 6 (the paper's 12 -> 6 layers), batch 8.
The unmerged model has B parallel MHSA (H heads) and FFN (F hidden) branches per block; the merged
one is the plain ViT with B*H heads and B*F hidden units (`reparam.merge`), the same
multiply-accumulates but fewer, larger products. One step = forward + softmax cross-entropy +
backward + AdamW update (`vitjax.train.make_train_step`, optax.adamw), jitted, no dropout. Both
start from the same function (merged from the unmerged init, random head), and the first step's
losses are printed as a check. Runs of `--steps` steps alternate between the two models in one
process (the order swapped every repeat, so load drift hits both alike); reported are the medians
over `--repeats` runs of the time per step and their ratio merged / unmerged (< 1: merged is
faster).
The 1-minute load average is recorded before and after. Writes `reparam_step_time.json` and
`reparam_step_time.md` next to this file (or to --out_dir).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "fashion_mnist": dict(name="vit_nano4", image=(28, 28, 1), batch=128, branches=3,
                          model=dict(width=96, depth=3, num_heads=3, mlp_dim=384, pool="gap",
                                     num_classes=10)),
    "vit_ti16_d6": dict(name="vit_ti16", image=(224, 224, 3), batch=8, branches=3,
                        model=dict(depth=6, num_classes=1000)),
}


def _build(setting: dict):
  """(unmerged model, its variables, merged model, its variables, batch)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import vitjax  # pylint: disable=g-import-not-at-top
  from vitjax.models import reparam  # pylint: disable=g-import-not-at-top
  # A random (not zero) head, so that the first-step losses of the two forms check the merge.
  model = vitjax.create_model(setting["name"], block="vit_parallel", head_zero_init=False,
                              block_kwargs=dict(branches=setting["branches"]), **setting["model"])
  rng = np.random.default_rng(0)
  images = rng.standard_normal((setting["batch"], *setting["image"])).astype(np.float32)
  labels = rng.integers(0, setting["model"]["num_classes"], setting["batch"]).astype(np.int32)
  variables = model.init(jax.random.key(0), images[:1])
  plain, merged = reparam.merge(model, variables)
  return model, variables, plain, merged, {"image": images, "label": labels}


def _stepper(model, variables, batch):
  """A jitted train step on a fixed batch, its state, and a function running n steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vitjax import train  # pylint: disable=g-import-not-at-top
  tx = optax.adamw(2e-3, weight_decay=0.05)
  params = jax.tree.map(jnp.array, variables["params"])   # copies: the state is donated
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  step = jax.jit(train.make_train_step(model, tx), donate_argnums=0)
  key = jax.random.key(0)
  batch = jax.device_put(batch)
  holder = {"state": state}

  def run(n: int) -> float:
    """Seconds per step over n steps (the state carries on from run to run)."""
    start = time.perf_counter()
    for _ in range(n):
      holder["state"], _ = step(holder["state"], batch, key)
    jax.block_until_ready(holder["state"])
    return (time.perf_counter() - start) / n

  def first_loss() -> float:
    holder["state"], (loss, _) = step(holder["state"], batch, key)   # also compiles
    return float(loss)
  return run, first_loss


def measure(setting_name: str, repeats: int, steps: int) -> dict:
  setting = SETTINGS[setting_name]
  model, variables, plain, merged, batch = _build(setting)
  runs = {"unmerged": _stepper(model, variables, batch), "merged": _stepper(plain, merged, batch)}
  first = {k: first_loss() for k, (_, first_loss) in runs.items()}
  print(f"{setting_name}: first-step loss unmerged {first['unmerged']:.6f}, merged "
        f"{first['merged']:.6f}", flush=True)
  times = {k: [] for k in runs}
  order = list(runs)
  for r in range(repeats):
    for k in (order if r % 2 == 0 else order[::-1]):
      times[k].append(runs[k][0](steps))
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = med["merged"] / med["unmerged"]
  print(f"{setting_name}: unmerged {1e3 * med['unmerged']:.2f} ms/step, merged "
        f"{1e3 * med['merged']:.2f} ms/step, merged/unmerged {ratio:.3f}", flush=True)
  return {"setting": setting_name, **{k: v for k, v in setting.items() if k != "model"},
          "model": setting["model"], "first_loss": first, "seconds_per_step": times,
          "median_ms": {k: 1e3 * v for k, v in med.items()}, "ratio_merged_over_unmerged": ratio}


def _markdown(results: list[dict], meta: dict) -> str:
  lines = ["# Merged vs unmerged training step (structural reparameterization, B = 3)", "",
           f"Command: `{meta['command']}`. {meta['machine']}; 1-minute load average "
           f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after. Medians over "
           f"{meta['repeats']} alternating runs of {meta['steps']} steps "
           "(forward + backward + AdamW, jitted).", "",
           "| setting | batch | unmerged ms/step | merged ms/step | merged / unmerged |",
           "|---|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['setting']} | {r['batch']} | {r['median_ms']['unmerged']:.2f} | "
                 f"{r['median_ms']['merged']:.2f} | {r['ratio_merged_over_unmerged']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out_dir", default=HERE)
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(HERE))
  names = [s for s in args.settings.split(",") if s]
  unknown = [s for s in names if s not in SETTINGS]
  if unknown or args.repeats < 1 or args.steps < 1:
    raise SystemExit(f"--settings: allowed values are {', '.join(SETTINGS)} (got {unknown}); "
                     "--repeats and --steps must be >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()[0]
  results = [measure(name, args.repeats, args.steps) for name in names]
  meta = dict(command="python -m experiments.reparam_step_time " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              machine=f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
                      f"{os.cpu_count()} cores, {platform.machine()}, jax {jax.__version__}",
              load_before=load_before, load_after=os.getloadavg()[0], repeats=args.repeats,
              steps=args.steps)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "reparam_step_time.json"), "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  text = _markdown(results, meta)
  with open(os.path.join(args.out_dir, "reparam_step_time.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
