"""The training loop: mesh, init or restore, jitted steps, evals, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is what `python -m vitjax.main` calls; colabs and tests call it too.
Data parallelism is jit + NamedSharding on a ('data',) mesh over all devices (DESIGN.md, decision 5):
batches are sharded along 'data', parameters and optimizer state are replicated.
Re-running with the same workdir resumes from the last checkpoint, with the same data stream, dropout
keys (folded from the step) and LookupViT grids (drawn from the step), so a resumed run ends where an
uninterrupted one would.
"""
from __future__ import annotations

import functools
import os
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import checkpoint
from vitjax import data as vdata
from vitjax import metrics as vmetrics
from vitjax import optim
from vitjax.models import create_model


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def model_grids(model, config) -> tuple[list, list]:
  """(train grids, eval grids) as lists of (h, w); [None] for models without a compressed grid."""
  takes_grid = hasattr(model, "grid")
  grids = [tuple(int(v) for v in g) for g in config.grids]
  eval_grids = [tuple(int(v) for v in g) for g in config.eval_grids] or grids
  if not takes_grid:
    if grids or eval_grids or config.get("grid_weights"):
      raise ValueError(f"config.grids / config.eval_grids / config.grid_weights are set, but "
                       f"model_name={config.model_name!r} has no compressed-token grid; leave them "
                       "empty")
    return [None], [None]
  if not grids:
    raise ValueError(f"config.grids is empty: model_name={config.model_name!r} needs at least one "
                     "compressed grid (h, w) to train with, e.g. ((3, 3), (5, 5), (7, 7))")
  return grids, eval_grids


def grid_probabilities(config, num_grids: int) -> np.ndarray:
  """Per-step sampling probabilities of config.grids: config.grid_weights normalised, or uniform."""
  weights = tuple(config.get("grid_weights", ())) or (1.0,) * num_grids
  w = np.asarray(weights, np.float64)
  if len(w) != num_grids or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"config.grid_weights={tuple(weights)!r}: give one non-negative weight per entry "
                     f"of config.grids ({num_grids}), not all zero, or () for uniform sampling")
  return w / w.sum()


def sample_grid(grids: list, probs: np.ndarray, seed: int, step: int):
  """The grid of one training step: a pure function of (seed, step), so a resumed run draws the same."""
  return grids[np.random.default_rng([seed, step]).choice(len(grids), p=probs)]


def _apply(model, params, images, grid, **kw):
  extra = {} if grid is None else {"grid": grid}
  return model.apply({"params": params}, images, **extra, **kw)


def make_train_step(model, tx, *, label_smoothing: float = 0.0):
  """A pure `train_step(state, batch, key, grid) -> (state, (loss, param_norm))`; jit with `grid` static.

  The parameter norm is returned so the loop can refuse to checkpoint parameters that went non-finite
  even when the loss of the step that produced them was still finite.
  """
  def loss_fn(params, batch, key, grid):
    logits = _apply(model, params, batch["image"], grid, train=True, rngs={"dropout": key})
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, labels).mean()

  def train_step(state, batch, key, grid=None):
    key = jax.random.fold_in(key, state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key, grid)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    param_norm = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)))
    return new_state, (loss, param_norm)
  return train_step


def make_eval_step(model):
  def eval_step(params, batch, grid=None):
    logits = _apply(model, params, batch["image"], grid, train=False)
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(mask)
  return eval_step


def gmacs(model, params, image_shape, grid) -> float:
  """Multiply-accumulates (x1e9) of one image's forward pass, counted by XLA's cost analysis."""
  fn = jax.jit(lambda p, x: _apply(model, p, x, grid, train=False))
  cost = fn.lower(params, jnp.zeros((1, *image_shape), jnp.float32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / 2e9


def grid_name(grid) -> str:
  return "" if grid is None else f"@{grid[0]}x{grid[1]}"


def _check_batch(name: str, value: int):
  n = jax.device_count()
  if value <= 0 or value % n:
    raise ValueError(f"config.{name}={value} is not divisible by the device count {n}; allowed "
                     f"values are positive multiples of {n}")


def _load_init_from(config, params):
  """Loads config.init_from strictly: every param must match by path and shape unless skipped."""
  loaded, _ = checkpoint.load_params(config.init_from)
  flat_new = {"/".join(k): v for k, v in _flatten(params)}
  flat_old = {"/".join(k): v for k, v in _flatten(loaded)}
  skip = re.compile(config.init_from_skip) if config.init_from_skip else None
  problems = []
  for path, value in flat_new.items():
    if skip and skip.search(path):
      continue
    if path not in flat_old:
      problems.append(f"missing {path}")
    elif flat_old[path].shape != value.shape:
      problems.append(f"shape {path}: checkpoint {flat_old[path].shape} vs model {value.shape}")
  problems += [f"unexpected {p}" for p in flat_old if p not in flat_new and not (skip and skip.search(p))]
  if problems:
    raise ValueError(f"init_from={config.init_from!r} does not fit model_name={config.model_name!r} "
                     f"(init_from_skip={config.init_from_skip!r}): " + "; ".join(problems))
  merged = {p: (v if skip and skip.search(p) else jnp.asarray(flat_old[p], v.dtype))
            for p, v in flat_new.items()}
  return _unflatten(merged, params)


def _flatten(tree):
  return [(tuple(getattr(k, "key", str(k)) for k in path), v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _unflatten(flat: dict, like):
  leaves = [flat["/".join(k)] for k, _ in _flatten(like)]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last eval metrics."""
  if config.distributed:
    jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  _check_batch("batch_size", config.batch_size)
  _check_batch("eval_batch_size", config.eval_batch_size)

  mesh = make_mesh()
  repl = jax.NamedSharding(mesh, jax.P())
  batch_sharding = jax.NamedSharding(mesh, jax.P("data"))
  info = vdata.dataset_info(config.data)
  model = create_model(config.model_name, num_classes=info.num_classes, **config.model.to_dict())
  grids, eval_grids = model_grids(model, config)
  grid_probs = grid_probabilities(config, len(grids))
  tx, schedule = optim.make_optimizer(config)

  key = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(key)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
  for g in set(grids + eval_grids):  # Validates every grid before anything is compiled.
    jax.eval_shape(functools.partial(model.init, grid=g) if g else model.init, init_key, dummy)

  @functools.partial(jax.jit, out_shardings=repl)
  def init_state(k):
    params = (model.init(k, dummy, grid=grids[-1]) if grids[-1] else model.init(k, dummy))["params"]
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

  state = init_state(init_key)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("model %s: %s params", config.model_name, f"{n_params:,}")
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=config.keep_checkpoints)
  writer = vmetrics.MetricWriter(workdir)
  train_iter = vdata.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, state)
    train_iter.set_state(data_state)
    writer.truncate_after(start)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    if config.init_from:
      state = init_state_from(config, state, tx, repl)

  train_step = jax.jit(make_train_step(model, tx, label_smoothing=config.label_smoothing),
                       donate_argnums=(0,), static_argnames=("grid",),
                       out_shardings=(repl, repl))
  eval_step = jax.jit(make_eval_step(model), static_argnames=("grid",))
  macs = {g: gmacs(model, state["params"], info.image_shape, g) for g in eval_grids}

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def evaluate(step):
    row = {}
    for g in eval_grids:
      sums = np.zeros(3)
      for batch in vdata.eval_iterator(config.data, batch_size=config.eval_batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        sums += np.asarray(jax.device_get(eval_step(state["params"], to_global(batch), grid=g)))
      loss, acc = sums[0] / sums[2], sums[1] / sums[2]
      row.update({f"eval/loss{grid_name(g)}": loss, f"eval/accuracy{grid_name(g)}": acc,
                  f"eval/gmacs{grid_name(g)}": macs[g]})
      logging.info("eval step %d%s: loss %.4f accuracy %.4f (%.4f GMACs/image)", step,
                   grid_name(g) or "", loss, acc, macs[g])
    if eval_grids[0] is not None:  # The plain keys report the largest budget.
      big = grid_name(max(eval_grids, key=lambda g: g[0] * g[1]))
      row.update({"eval/loss": row[f"eval/loss{big}"], "eval/accuracy": row[f"eval/accuracy{big}"]})
    if jax.process_index() == 0:
      writer.write(step, row)
      writer.plot()
    return row

  losses, last_row = [], {}
  t_log, step_log = time.time(), start
  try:
    for step in range(start + 1, config.total_steps + 1):
      grid = sample_grid(grids, grid_probs, config.seed, step)
      state, loss = train_step(state, to_global(next(train_iter)), dropout_key, grid=grid)
      losses.append(loss)
      is_ckpt = step % config.checkpoint_every_steps == 0 or step == config.total_steps
      if step % config.log_every_steps == 0 or is_ckpt:
        values, norms = np.asarray(jax.device_get(losses)).T
        bad = np.flatnonzero(~np.isfinite(values) | ~np.isfinite(norms))
        if bad.size:
          ckpt.wait()
          raise FloatingPointError(
              f"loss {values[bad[0]]} / parameter norm {norms[bad[0]]} at step "
              f"{step - len(values) + 1 + bad[0]}: stopping. The last good checkpoint is step "
              f"{ckpt.latest_step()} in {ckpt.directory}")
        elapsed = time.time() - t_log
        sec_per_step = elapsed / max(step - step_log, 1)
        ips = config.batch_size / sec_per_step
        lr = float(schedule(step))
        if jax.process_index() == 0:
          writer.write(step, {"train/loss": values.mean(), "train/lr": lr, "train/images_per_sec": ips})
        vmetrics.log_progress(step, config.total_steps, float(values.mean()), ips, lr, sec_per_step)
        losses, t_log, step_log = [], time.time(), step
      if is_ckpt:
        ckpt.save(step, state, train_iter.get_state())
      if step % config.eval_every_steps == 0 or step == config.total_steps:
        last_row = evaluate(step)
        t_log = time.time()  # Keep eval time out of the training throughput.
    if not last_row and start >= config.total_steps:
      last_row = evaluate(start)
  finally:
    ckpt.close()
  return last_row


def init_state_from(config, state, tx, sharding):
  params = _load_init_from(config, state["params"])
  params = jax.device_put(params, sharding)
  return dict(params=params, opt_state=jax.device_put(tx.init(params), sharding), step=state["step"])
