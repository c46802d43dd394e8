"""Issue 14's Fashion-MNIST measurements: the ViT job with one plug-in switched on per run.

    python -m experiments.plugins_fashion_mnist [--jobs=learn,resformer,...] [--out=experiments/plugins]
    python -m experiments.plugins_fashion_mnist --runlocal --out=SMOKE_OUT --runs=SMOKE_RUNS  # smoke test

Each job is `python -m vitjax.main --config=configs/plugins.py:ARG` (vitjax/configs/plugins.py: the
model, steps, batch and optimizer of configs/vit.py), started in a fresh workdir as a subprocess and
timed from start to exit. Jobs:

  learn, resformer, rpe2d   positions; trained at 28 px (resformer at 28, 20 and 16 px with its
                            scale-consistency loss) and evaluated at 20, 28 and 36 px
  resformer_single          ablations: ResFormer's positions trained at 28 px only, and the
  learn_multires            learned table with ResFormer's multi-resolution recipe
  ltm, iared2, random       a token reducer before block 1 keeping half of the patch tokens;
                            ltm@0.7, iared2@0.7, random@0.7 keep 70% of them
  iared2_ft                 IA-RED²'s two phases from the learn job's weights: interpreters only,
                            then jointly (configs/plugins.py:...,finetune); needs the learn job
  dtn                       DTN in place of every LayerNorm

Writes OUT/plugins_fashion_mnist.json (every job's final eval row, wall time, command),
OUT/plugins_fashion_mnist.md (the two tables), OUT/accuracy_vs_resolution.png (learn, resformer,
rpe2d) and OUT/reducers_accuracy_vs_gmacs.png (the reducers next to the plain ViT, the learn job).
GMACs are multiply-accumulates of one 28 px test image (XLA cost analysis), as the runner logs them.
Jobs left out of --jobs keep their recorded rows (`--jobs=` redraws the tables from the JSON).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

KEEPS = (0.5, 0.7)        # keep ratios of the token reducers (the first is the plain job name's)
REDUCERS = tuple(f"{r}{'' if k == KEEPS[0] else f'@{k}'}" for r in ("ltm", "iared2", "random")
                 for k in KEEPS) + ("iared2_ft",)
JOBS = {
    "learn": "posemb=learn", "resformer": "posemb=resformer", "rpe2d": "posemb=rpe2d",
    # Ablations: ResFormer's positions without its recipe, and its recipe with the learned table.
    "resformer_single": "posemb=resformer,multires=off", "learn_multires": "posemb=learn,multires=on",
    **{job: f"reduction={job.split('@')[0]},keep={job.split('@')[1] if '@' in job else KEEPS[0]}"
       for job in REDUCERS if job != "iared2_ft"},
    "iared2_ft": "reduction=iared2,keep=0.5,finetune",
    "dtn": "norm=dtn",
}
POSITIONS = ("learn", "resformer", "rpe2d", "resformer_single", "learn_multires")
SIDES = (20, 28, 36)
PATCHES = 49              # 7 x 7 patch tokens at 28 px

_JOBS = flags.DEFINE_list("jobs", list(JOBS), f"Jobs to run, of {', '.join(JOBS)}.")
_OUT = flags.DEFINE_string("out", "experiments/plugins", "Where the tables, JSON and plots go.")
_RUNS = flags.DEFINE_string("runs", "runs/experiments/plugins", "Workdirs (kept out of the repo).")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Smoke test: every config with `runlocal`.")
_EXTRA = flags.DEFINE_multi_string("extra", [], "KEY=VALUE: --config.KEY=VALUE for every job, "
                                   "e.g. --extra=data.eval_split=test[:512] in a smoke test.")


def config_arg(job: str) -> str:
  return JOBS[job] + (",runlocal" if _RUNLOCAL.value else "")


def export_params(workdir: str) -> str:
  """The latest params of a run's workdir as a parameter checkpoint (what config.init_from reads)."""
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  variables, step = checkpoint.read_run_variables(os.path.join(workdir, "checkpoints"))
  out = os.path.join(workdir, "params_final")
  checkpoint.save_params(out, variables["params"], {"from": workdir, "step": step},
                         variables.get("batch_stats"))
  return out


def run_job(job: str) -> dict:
  workdir = os.path.join(_RUNS.value, job)
  shutil.rmtree(workdir, ignore_errors=True)
  command = f"python -m vitjax.main --config=configs/plugins.py:{config_arg(job)}"
  overrides = [f"--config.{e}" for e in _EXTRA.value]
  if job == "iared2_ft":
    overrides.append(f"--config.init_from={export_params(os.path.join(_RUNS.value, 'learn'))}")
    command += " --config.init_from=LEARN_PARAMS"
  command += "".join(f" --config.{e}" for e in _EXTRA.value)
  cmd = [sys.executable, "-m", "vitjax.main", f"--config=configs/plugins.py:{config_arg(job)}",
         f"--workdir={workdir}", *overrides]
  t0 = time.time()
  subprocess.run(cmd, check=True)
  wall = time.time() - t0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = {k: v for r in rows if any(k.startswith("eval/") for k in r) for k, v in r.items()}
  out = {"job": job, "wall_sec": wall, "steps": rows[-1]["step"], "final": final,
         "command": command}
  if job.startswith("iared2"):
    out["tokens_in_play"] = tokens_in_play(workdir)
  return out


def tokens_in_play(workdir: str) -> float:
  """Mean fraction of the patch tokens a reducer leaves in play at eval over the test set (28 px),
  from what the reducers sow as 'policy'/'kept' (IA-RED²: the bucket's tokens with pi >= its
  threshold); 1.0 for a model without such a reducer."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import vitjax  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitjax import data  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json")) as fh:
    config = ml_collections.ConfigDict(json.load(fh))
  variables, _ = checkpoint.read_run_variables(os.path.join(workdir, "checkpoints"))
  model = vitjax.create_model(config.model_name, num_classes=10, **config.model.to_dict())
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["policy"])[1])
  total, count = 0.0, 0
  for batch in data.eval_iterator(config.data, batch_size=500):
    kept = jax.tree.leaves(apply(variables, batch["image"]))
    if not kept:
      return 1.0
    mask = batch["mask"].astype(bool)
    total += float(sum(k[mask].sum() for k in kept) / len(kept))
    count += int(mask.sum())
  return total / count


def tables(results: dict) -> str:
  lines = ["Positions: trained at 28 px, test images resized (antialiased bicubic) to each side.", "",
           "| job | " + " | ".join(f"accuracy @{s}" for s in SIDES)
           + " | loss 28 -> 36 (points) | GMACs @28 | wall time |",
           "|---|" + "---:|" * (len(SIDES) + 3)]
  for job in POSITIONS:
    if job in results:
      f = results[job]["final"]
      accs = " | ".join(f"{f[f'eval/accuracy@{s}']:.4f}" if f"eval/accuracy@{s}" in f else "-"
                        for s in SIDES)
      drop = (f"{100 * (f['eval/accuracy@28'] - f['eval/accuracy@36']):.2f}"
              if "eval/accuracy@36" in f else "-")
      lines.append(f"| {job} | {accs} | {drop} | {f['eval/gmacs']:.4f} | "
                   f"{results[job]['wall_sec'] / 60:.1f} min |")
  lines += ["", "Token reducers before block 1 at two keep ratios, and DTN, next to the plain ViT "
            "(accuracy and GMACs of the eval forward at 28 px). Tokens in play: the mean fraction "
            "of the 49 patch tokens the blocks after the reducer use (IA-RED² measured: its policy "
            "masks tokens inside the kept bucket, which the GMACs count whole).", "",
            "| job | keep | tokens in play at eval | accuracy | GMACs | GMACs / ViT's | wall time |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  ref = results.get("learn", {}).get("final", {}).get("eval/gmacs")
  for job in ("learn", *REDUCERS, "dtn"):
    if job in results:
      f = results[job]["final"]
      rel = f"{f['eval/gmacs'] / ref:.2f}" if ref else "-"
      name = "ViT (learn)" if job == "learn" else job
      keep = "-" if job in ("learn", "dtn") else job.split("@")[1] if "@" in job else KEEPS[0]
      play = (results[job]["tokens_in_play"] if "tokens_in_play" in results[job] else
              1.0 if keep == "-" else math.ceil(float(keep) * PATCHES) / PATCHES)
      lines.append(f"| {name} | {keep} | {play:.3f} | {f['eval/accuracy']:.4f} | "
                   f"{f['eval/gmacs']:.4f} | {rel} | "
                   f"{results[job]['wall_sec'] / 60:.1f} min |")
  lines += ["", "Commands:", ""] + [f"- {r['job']}: `{r['command']}`" for r in results.values()]
  return "\n".join(lines)


def plots(results: dict, out: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for job in POSITIONS:
    if job in results:
      f = results[job]["final"]
      sides = [s for s in SIDES if f"eval/accuracy@{s}" in f]
      label = {"resformer": "resformer (trained at 28, 20, 16)",
               "resformer_single": "resformer positions, trained at 28 only",
               "learn_multires": "learn, trained at 28, 20, 16"}.get(job, job)
      ax.plot(sides, [f[f"eval/accuracy@{s}"] for s in sides],
              "o-" if job in POSITIONS[:3] else "s--", label=label)
  ax.axvline(28, color="grey", lw=0.8, ls=":")
  ax.set(xlabel="test image side (px); the data's side is 28", xticks=SIDES,
         ylabel="Fashion-MNIST test accuracy")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy_vs_resolution.png"), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for i, job in enumerate(("learn", *REDUCERS)):
    if job in results:
      f = results[job]["final"]
      ax.plot([f["eval/gmacs"] * 1e3], [f["eval/accuracy"]], "s" if job == "learn" else "o",
              color=f"C{i}", label="ViT (no reduction)" if job == "learn" else job)
  ax.set(xlabel="MMACs per 28 px image (XLA cost analysis)",
         ylabel="Fashion-MNIST test accuracy")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "reducers_accuracy_vs_gmacs.png"), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  unknown = sorted(set(_JOBS.value) - set(JOBS))
  if unknown:
    raise ValueError(f"--jobs: unknown {', '.join(unknown)}; allowed values: {', '.join(JOBS)}")
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "plugins_fashion_mnist.json")
  results = {}
  if os.path.exists(path):
    with open(path) as fh:
      results = {r["job"]: r for r in json.load(fh)}
  for job, row in results.items():   # jobs recorded before the column existed
    workdir = os.path.join(_RUNS.value, job)
    if job.startswith("iared2") and "tokens_in_play" not in row and os.path.isdir(workdir):
      row["tokens_in_play"] = tokens_in_play(workdir)
  if _JOBS.value:
    from vitjax import data  # pylint: disable=g-import-not-at-top
    from vitjax.configs import common  # pylint: disable=g-import-not-at-top
    data.dataset_info(common.data_config())  # Build Fashion-MNIST once, outside the timed jobs.
  # learn first: iared2_ft starts from its weights.
  for job in sorted(_JOBS.value, key=lambda j: list(JOBS).index(j)):
    results[job] = run_job(job)
    with open(path, "w") as fh:   # after every job, so a stopped run keeps what finished
      json.dump(list(results.values()), fh, indent=1)
  text = tables(results)
  print(text)
  with open(os.path.join(out, "plugins_fashion_mnist.md"), "w") as fh:
    fh.write(text + "\n")
  plots(results, out)


if __name__ == "__main__":
  app.run(main)
