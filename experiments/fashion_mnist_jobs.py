"""Runs the two Fashion-MNIST main jobs end to end and reports accuracy and wall time.

    python -m experiments.fashion_mnist_jobs [--jobs=vit,lookupvit] [--out=experiments/results]

Jobs left out of --jobs keep the result recorded in OUT/fashion_mnist_jobs.json (`--jobs=` redraws the table and
the plot from it without training).

Each job is the runner's documented command, `python -m vitjax.main --config=configs/NAME.py`, started in a fresh
workdir as a subprocess and timed from start to exit (imports, compiles, training, evals and checkpoints
included). The dataset is prepared once beforehand so that neither job pays for building it. Prints a markdown
table and, for LookupViT, writes a plot of test accuracy against GMACs (XLA-counted multiply-accumulates) for
every evaluated grid of the one trained model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

_JOBS = flags.DEFINE_list("jobs", ["vit", "lookupvit"], "Configs to run (configs/NAME.py).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the table, the JSON results and the plots go.")
_EXTRA = flags.DEFINE_list("extra", [], "Extra --config.KEY=VALUE overrides for every job.")


def run_job(name: str) -> dict:
  workdir = os.path.join("runs", "experiments", name)  # checkpoints stay out of the repository
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "vitjax.main", f"--config=configs/{name}.py", f"--workdir={workdir}"]
  cmd += [f"--config.{e}" for e in _EXTRA.value]
  t0 = time.time()
  subprocess.run(cmd, check=True)
  wall = time.time() - t0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  final = {k: v for r in rows if any(k.startswith("eval/") for k in r) for k, v in r.items()}
  return {"job": name, "wall_sec": wall, "final": final, "steps": rows[-1]["step"],
          "command": "python -m vitjax.main --config=configs/%s.py" % name}


def plot_lookup(result: dict, path: str, reference: dict | None = None):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  final = result["final"]
  grids = sorted({k.split("@")[1] for k in final if k.startswith("eval/accuracy@")},
                 key=lambda g: final[f"eval/gmacs@{g}"])
  macs = [final[f"eval/gmacs@{g}"] * 1e3 for g in grids]
  accs = [final[f"eval/accuracy@{g}"] for g in grids]
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.plot(macs, accs, "o-", label="LookupViT (one model, all grids)")
  for g, m, a in zip(grids, macs, accs):
    ax.annotate(g, (m, a), textcoords="offset points", xytext=(4, -10))
  if reference is not None:  # the ViT job, one point
    ref = reference["final"]
    ax.plot([ref["eval/gmacs"] * 1e3], [ref["eval/accuracy"]], "s", color="C1",
            label=f"ViT ({reference['job']} job)")
  ax.legend(loc="upper left", fontsize=8)
  ax.set(xlabel="MMACs per image (XLA cost analysis)", ylabel="Fashion-MNIST test accuracy")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  from vitjax import data  # pylint: disable=g-import-not-at-top
  from vitjax.configs import common  # pylint: disable=g-import-not-at-top
  if _JOBS.value:
    data.dataset_info(common.data_config())  # Build Fashion-MNIST once, outside the timed jobs.
  results = [run_job(j) for j in _JOBS.value]
  # Jobs not re-run keep their last recorded result, so the table always lists every job.
  path = os.path.join(out, "fashion_mnist_jobs.json")
  if os.path.exists(path):
    ran = {r["job"] for r in results}
    with open(path) as fh:
      results = [r for r in json.load(fh) if r["job"] not in ran] + results
  vit = next((x for x in results if x["job"] == "vit"), None)  # the reference point of the plot
  lines = ["| job | command | steps | wall time | test accuracy | GMACs/image |", "|---|---|---|---|---|---|"]
  for r in results:
    f = r["final"]
    grids = sorted({k.split("@")[1] for k in f if k.startswith("eval/accuracy@")},
                   key=lambda g: f[f"eval/gmacs@{g}"])
    if grids:
      acc = ", ".join(f"{g}: {f[f'eval/accuracy@{g}']:.4f}" for g in grids)
      macs = ", ".join(f"{g}: {f[f'eval/gmacs@{g}']:.4f}" for g in grids)
    else:
      acc, macs = f"{f['eval/accuracy']:.4f}", f"{f['eval/gmacs']:.4f}"
    lines.append(f"| {r['job']} | `{r['command']}` | {r['steps']} | {r['wall_sec'] / 60:.1f} min | "
                 f"{acc} | {macs} |")
    if grids:
      plot_lookup(r, os.path.join(out, f"{r['job']}_accuracy_vs_gmacs.png"), vit)
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(out, "fashion_mnist_jobs.md"), "w") as fh:
    fh.write(table + "\n")
  with open(os.path.join(out, "fashion_mnist_jobs.json"), "w") as fh:
    json.dump(results, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
