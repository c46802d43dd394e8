"""Evaluates a checkpoint on a dataset without training: `python -m vitjax.evaluate`.

    python -m vitjax.evaluate --config=configs/NAME.py[:ARG] --checkpoint=DIR [--config.KEY=VALUE ...]

DIR is a training run's workdir (its latest checkpoint is read: params and BatchNorm statistics, not the
optimizer state) or a directory written by `python -m vitjax.convert`. The config gives the data
(`config.data`, evaluated on `data.eval_split`), the eval batch size and, for LookupViT, the grids
(`config.eval_grids`: every one is evaluated). The model is what DIR records (the run's config.json,
or the converter's meta: model name and overrides such as depth); the config's `model` fields fill in
only what DIR does not record, and a DIR recorded for another `model_name` is an error. Images go
through the config's pipeline (the whole image resized to data.image_size); weights converted from
timm get their own mean/std (recorded in the meta) but not timm's centre crop, so an ImageNet number
can differ from timm's by a little.

Prints top-1 and top-5 accuracy and the loss per eval setting, and appends them as one JSON line to
`<DIR>/evaluations.jsonl` (or --out=FILE). Nothing else is written: no training checkpoint, no
metrics.jsonl line. A run's evals and this command share `train.eval_pass`, so evaluating a run's last
checkpoint gives the accuracy the run logged at its last step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections

from vitjax import main as vmain

OUT_FILE = "evaluations.jsonl"


@dataclasses.dataclass
class Recorded:
  """What a checkpoint directory says about its model and data."""
  kind: str                      # 'run' or 'params'
  path: str
  step: int | None
  model_name: str | None         # None: the directory records none
  overrides: dict                # create_model overrides, without num_classes
  num_classes: int | None
  meta: dict                     # the converter's meta ({} for runs)
  config: Any = None             # a run's config (ConfigDict), from config.json
  dataset: dict | None = None    # a run's dataset.json


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def head_classes(variables: dict) -> int | None:
  """The class count of a checkpoint whose classifier is params['head'] (every vitjax model's)."""
  head = variables.get("params", {}).get("head", {})
  kernel = head.get("kernel") if isinstance(head, dict) else None
  return int(kernel.shape[-1]) if kernel is not None else None


def recorded(variables: dict, record: dict) -> Recorded:
  """Reads the model name, overrides and class count a checkpoint directory records."""
  path = record["path"]
  if record["kind"] == "run":
    config_dict = _read_json(os.path.join(path, "config.json"))
    dataset = _read_json(os.path.join(path, "dataset.json"))
    config = ml_collections.ConfigDict(config_dict) if config_dict else None
    name = config_dict.get("model_name") if config_dict else None
    overrides = {k: v for k, v in (config_dict or {}).get("model", {}).items() if v is not None}
    classes = dataset["num_classes"] if dataset else head_classes(variables)
    return Recorded("run", path, record["step"], name, overrides, classes, {}, config, dataset)
  meta = record["meta"]
  overrides = dict(meta.get("model_overrides") or {})
  classes = overrides.pop("num_classes", None)
  classes = classes if classes is not None else head_classes(variables)
  return Recorded("params", path, None, meta.get("model_name"), overrides, classes, meta)


def check_model_name(rec: Recorded, model_name: str | None, field: str) -> str:
  """The model name to build: the recorded one; `model_name` (from `field`) must agree or fill in."""
  if rec.model_name and model_name and rec.model_name != model_name:
    flag = field if field.startswith("--") else "--" + field
    raise ValueError(f"--checkpoint={rec.path!r} holds a {rec.model_name!r} model, but "
                     f"{field}={model_name!r}; it is a checkpoint for another model (pass "
                     f"{flag}={rec.model_name}, or a checkpoint of a {model_name!r} model)")
  name = rec.model_name or model_name
  if not name:
    raise ValueError(f"--checkpoint={rec.path!r} records no model name; pass --model=NAME "
                     "(a vitjax model name, see vitjax.list_models())")
  return name


def check_fits(model, variables: dict, rec: Recorded, model_name: str, image_shape, init_kwargs):
  """One error listing every path and shape where the checkpoint and the model disagree."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  like = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *image_shape)), **init_kwargs),
                        jax.random.key(0))
  problems = checkpoint.fit_problems(variables, dict(like))
  if problems:
    shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)"
                                         if len(problems) > 12 else "")
    raise ValueError(f"--checkpoint={rec.path!r} does not fit model_name={model_name!r} "
                     f"{rec.overrides or ''} at {image_shape[0]}x{image_shape[1]}x{image_shape[2]}: "
                     f"{shown}. It is a checkpoint for another model or size")


def input_normalization(settings: dict | None):
  """The pipeline gives x = 2u - 1 for pixels u in [0, 1] (mean = std = 0.5). Weights converted with
  another mean/std (timm's ImageNet statistics) get (u - mean) / std instead; None when they match."""
  if not settings or (list(settings["mean"]) == [0.5] * len(settings["mean"])
                      and list(settings["std"]) == [0.5] * len(settings["std"])):
    return None
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mean = jnp.asarray(settings["mean"], jnp.float32)
  std = jnp.asarray(settings["std"], jnp.float32)
  return lambda x: ((x + 1.0) * 0.5 - mean) / std


def evaluate(config, checkpoint_dir: str, *, out: str | None = None) -> dict[str, float]:
  """Evaluates `checkpoint_dir` on config.data's eval split; returns (and writes) the metrics row."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitjax import console  # pylint: disable=g-import-not-at-top
  from vitjax import data as vdata  # pylint: disable=g-import-not-at-top
  from vitjax import train  # pylint: disable=g-import-not-at-top
  from vitjax.models import create_model  # pylint: disable=g-import-not-at-top
  from vitjax.models import schedules  # pylint: disable=g-import-not-at-top
  console.setup()
  t0 = time.time()
  train._check_batch("eval_batch_size", config.eval_batch_size)  # pylint: disable=protected-access
  variables, record = checkpoint.read_for_inference(checkpoint_dir)
  rec = recorded(variables, record)
  model_name = check_model_name(rec, config.model_name, "config.model_name")
  overrides = {**{k: v for k, v in config.model.to_dict().items() if v is not None},
               **rec.overrides}
  overrides.pop("num_classes", None)
  checked = config.copy_and_resolve_references()
  with checked.unlocked():
    checked.model_name = model_name
    checked.model = ml_collections.ConfigDict(overrides)
    checked.data.train_split = checked.data.eval_split  # evaluating needs no train split
  train.check_config(checked, check_batches=False)  # config errors before any data is read
  console.log("checkpoint %s: %s%s", rec.path, model_name,
              f" at step {rec.step}" if rec.step is not None else
              f" (from {rec.meta.get('source', '?')} {rec.meta.get('source_model', '')})")
  info = vdata.dataset_info(checked.data)
  if rec.num_classes is not None and rec.num_classes != info.num_classes:
    raise ValueError(f"--checkpoint={rec.path!r} has a head of {rec.num_classes} classes, but "
                     f"data.name={config.data.name!r} has {info.num_classes}; evaluate it on a "
                     "dataset with the classes it was trained on")
  console.log("data %s: %s eval images (%s), %dx%dx%d, %d classes", info.name,
              f"{info.eval_size:,}", config.data.eval_split, *info.image_shape, info.num_classes)
  model = create_model(model_name, num_classes=info.num_classes, **overrides)
  apply_schedule = schedules.for_model(model, checked)
  check_fits(model, variables, rec, model_name, info.image_shape, apply_schedule.init_kwargs())

  mesh = train.make_mesh()
  variables = jax.device_put(variables, jax.NamedSharding(mesh, jax.P()))
  batch_sharding = jax.NamedSharding(mesh, jax.P("data"))
  normalize = input_normalization(rec.meta.get("preprocess"))
  eval_step = jax.jit(train.make_eval_step(model, normalize), static_argnames=("apply_kwargs",))
  row = {}
  for name, kw in apply_schedule.evals():
    m = train.eval_pass(eval_step, variables, checked.data, batch_size=config.eval_batch_size,
                        apply_kwargs=kw, batch_sharding=batch_sharding)
    row.update({f"eval/loss{name}": m["loss"], f"eval/accuracy{name}": m["accuracy"],
                f"eval/top5{name}": m["top5"]})
    print(f"{info.name} {config.data.eval_split}{name}: top-1 {m['accuracy']:.4f} | top-5 "
          f"{m['top5']:.4f} | loss {m['loss']:.4f} ({int(m['count']):,} images)", flush=True)
  if apply_schedule.headline:
    for k in ("loss", "accuracy", "top5"):
      row[f"eval/{k}"] = row[f"eval/{k}{apply_schedule.headline}"]
  out = out or os.path.join(rec.path, OUT_FILE)
  if jax.process_index() == 0:
    line = {"checkpoint": rec.path, "step": rec.step, "model_name": model_name,
            "dataset": info.name, "split": config.data.eval_split,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: float(v) for k, v in row.items()}}
    with open(out, "a") as f:
      f.write(json.dumps(line) + "\n")
  console.log("wrote %s (%s)", out, console.duration(time.time() - t0))
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; options are --config=..., "
                         "--checkpoint=DIR, --out=FILE and --config.KEY=VALUE.")
  from vitjax import console  # pylint: disable=g-import-not-at-top
  console.setup(flags.FLAGS.verbosity)
  if flags.FLAGS.config is None or not flags.FLAGS.checkpoint:
    raise app.UsageError("--config=configs/NAME.py and --checkpoint=DIR are required.")
  vmain.cli_errors(evaluate, flags.FLAGS.config, flags.FLAGS.checkpoint, out=flags.FLAGS.out)


def run():
  vmain.define_config_flag("Config whose data (data.eval_split) and eval settings are used.")
  flags.DEFINE_string("checkpoint", None, "A training run's workdir or a vitjax.convert output.")
  flags.DEFINE_string("out", None, f"Where to append the results (default: DIR/{OUT_FILE}).")
  vmain.prepare_argv()
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
