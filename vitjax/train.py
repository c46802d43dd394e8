"""The training loop: mesh, init or restore, jitted steps, evals, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is what `python -m vitjax.main` calls; colabs and tests call it too.
Data parallelism is jit + NamedSharding on a ('data',) mesh over all devices (DESIGN.md, decision 5):
batches are sharded along 'data', parameters and optimizer state are replicated.
Re-running with the same workdir resumes from the last checkpoint, with the same data stream, dropout
keys (folded from the step) and per-step apply arguments (drawn from the step by the model's schedule,
`vitjax.models.schedules`, e.g. LookupViT's grids), so a resumed run ends where an uninterrupted one
would. The loop knows no model: what varies per step comes from the schedule, and BatchNorm running
statistics (`batch_stats`) travel in the train state next to the params.
"""
from __future__ import annotations

import functools
import os
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
from vitjax.models import schedules


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def static_kwargs(kwargs: dict) -> tuple:
  """Apply kwargs as a hashable tuple of items, the form jit takes as a static argument."""
  return tuple(sorted(kwargs.items()))


def _variables(params, batch_stats):
  return {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}


def state_variables(state) -> dict:
  """The model variables held by a train state: params, and batch_stats for BatchNorm models."""
  return _variables(state["params"], state.get("batch_stats"))


def make_train_step(model, tx, *, label_smoothing: float = 0.0):
  """A pure `train_step(state, batch, key, apply_kwargs=()) -> (state, (loss, norm))`.

  `apply_kwargs` is a tuple of (name, value) items (`static_kwargs(schedule.train_kwargs(step))`);
  jit it as a static argument. When the state holds `batch_stats` (BatchNorm models), the model is
  applied with them mutable and the step stores the updated running statistics. They are
  computed over the batch as one global array: under jit with the batch sharded along 'data',
  XLA inserts the cross-device reductions, so 8 devices give the statistics of the whole batch,
  as one device would.

  The norm of the parameters (and running statistics) is returned so the loop can refuse to
  checkpoint a state that went non-finite even when the loss of the step that produced it was
  still finite.
  """
  def loss_fn(params, batch_stats, batch, key, kwargs):
    variables = _variables(params, batch_stats)
    if batch_stats is None:
      logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": key}, **kwargs)
    else:
      logits, updates = model.apply(variables, batch["image"], train=True, rngs={"dropout": key},
                                    mutable=["batch_stats"], **kwargs)
      batch_stats = updates["batch_stats"]
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, labels).mean(), batch_stats

  def train_step(state, batch, key, apply_kwargs=()):
    key = jax.random.fold_in(key, state["step"])
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state.get("batch_stats"), batch, key, dict(apply_kwargs))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    if batch_stats is not None:
      new_state["batch_stats"] = batch_stats
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(state_variables(new_state))))
    return new_state, (loss, norm)
  return train_step


def make_eval_step(model):
  """`eval_step(variables, batch, apply_kwargs=()) -> (loss sum, correct sum, count)`; BatchNorm
  layers use their running averages (train=False, nothing mutable)."""
  def eval_step(variables, batch, apply_kwargs=()):
    logits = model.apply(variables, batch["image"], train=False, **dict(apply_kwargs))
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(mask)
  return eval_step


def gmacs(model, variables, image_shape, apply_kwargs: dict | None = None) -> float:
  """Multiply-accumulates (x1e9) of one image's forward pass, counted by XLA's cost analysis."""
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, **(apply_kwargs or {})))
  cost = fn.lower(variables, jnp.zeros((1, *image_shape), jnp.float32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / 2e9


def _check_batch(name: str, value: int):
  n = jax.device_count()
  if value <= 0 or value % n:
    raise ValueError(f"config.{name}={value} is not divisible by the device count {n}; allowed "
                     f"values are positive multiples of {n}")


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
  apply_schedule = schedules.for_model(model, config)
  evals = apply_schedule.evals()
  tx, lr_schedule = optim.make_optimizer(config)

  key = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(key)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
  settings = [apply_schedule.init_kwargs(), *apply_schedule.train_settings(), *(kw for _, kw in evals)]
  for kw in {static_kwargs(kw): kw for kw in settings}.values():  # Checks before compiling.
    shapes = jax.eval_shape(functools.partial(model.init, **kw), init_key, dummy)
    if set(shapes) - {"params", "batch_stats"}:
      raise ValueError(f"model_name={config.model_name!r} keeps variable collections "
                       f"{sorted(shapes)}; the runner carries only 'params' and 'batch_stats'")

  @functools.partial(jax.jit, out_shardings=repl)
  def init_state(k):
    variables = model.init(k, dummy, **apply_schedule.init_kwargs())
    params = variables["params"]
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state

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
    state, data_state = ckpt.restore(start, state, model_name=config.model_name)
    train_iter.set_state(data_state)
    writer.truncate_after(start)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    if config.init_from:
      state = init_state_from(config, state, tx, repl)

  train_step = jax.jit(make_train_step(model, tx, label_smoothing=config.label_smoothing),
                       donate_argnums=(0,), static_argnames=("apply_kwargs",),
                       out_shardings=(repl, repl))
  eval_step = jax.jit(make_eval_step(model), static_argnames=("apply_kwargs",))
  macs = {name: gmacs(model, state_variables(state), info.image_shape, kw) for name, kw in evals}

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def evaluate(step):
    row = {}
    for name, kw in evals:
      sums = np.zeros(3)
      for batch in vdata.eval_iterator(config.data, batch_size=config.eval_batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        sums += np.asarray(jax.device_get(eval_step(state_variables(state), to_global(batch),
                                                    apply_kwargs=static_kwargs(kw))))
      loss, acc = sums[0] / sums[2], sums[1] / sums[2]
      row.update({f"eval/loss{name}": loss, f"eval/accuracy{name}": acc,
                  f"eval/gmacs{name}": macs[name]})
      logging.info("eval step %d%s: loss %.4f accuracy %.4f (%.4f GMACs/image)", step, name, loss,
                   acc, macs[name])
    headline = apply_schedule.headline  # The plain keys repeat the schedule's headline setting.
    if headline:
      row.update({"eval/loss": row[f"eval/loss{headline}"],
                  "eval/accuracy": row[f"eval/accuracy{headline}"]})
    if jax.process_index() == 0:
      writer.write(step, row)
      writer.plot()
    return row

  losses, last_row = [], {}
  t_log, step_log = time.time(), start
  try:
    for step in range(start + 1, config.total_steps + 1):
      kw = static_kwargs(apply_schedule.train_kwargs(step))
      state, loss = train_step(state, to_global(next(train_iter)), dropout_key, apply_kwargs=kw)
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
        lr = float(lr_schedule(step))
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
  """A fresh state whose params (and batch_stats) come from config.init_from, strictly matched."""
  params, batch_stats = checkpoint.load_init_from(
      config.init_from, state["params"], skip=config.init_from_skip, model_name=config.model_name,
      batch_stats=state.get("batch_stats"))
  params = jax.device_put(params, sharding)
  new = dict(params=params, opt_state=jax.device_put(tx.init(params), sharding), step=state["step"])
  if "batch_stats" in state:
    new["batch_stats"] = jax.device_put(batch_stats, sharding)
  return new
