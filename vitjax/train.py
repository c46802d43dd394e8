"""The training loop: mesh, init or restore, jitted steps, evals, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is what `python -m vitjax.main` calls; colabs and tests call it too.
Data parallelism is jit + NamedSharding on a ('data',) mesh over all devices (DESIGN.md, decision 5):
batches are sharded along 'data', parameters and optimizer state are replicated.
Re-running with the same workdir resumes from the last checkpoint, with the same data stream, dropout
keys (folded from the step) and per-step apply arguments (drawn from the step by the model's schedule,
`vitjax.models.schedules`, e.g. LookupViT's grids), so a resumed run ends where an uninterrupted one
would. The loop knows no model: what varies per step comes from the schedule, and BatchNorm running
statistics (`batch_stats`) travel in the train state next to the params.

Every config error that needs no data (batch sizes against the device count, data fields, the model
name and fields, the image size against the model's stride, LookupViT grids, the plug-in fields of
vitjax/train_plugins.py: train and eval resolutions, the REINFORCE policy) is raised by
`check_config` before any data is read or anything is written, each naming its field. The console
shows the runner's own lines only (vitjax/console.py).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import checkpoint
from vitjax import console
from vitjax import data as vdata
from vitjax import metrics as vmetrics
from vitjax import optim
from vitjax import train_plugins
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


def make_train_step(model, tx, *, label_smoothing: float = 0.0,
                    options: train_plugins.StepOptions | None = None):
  """A pure `train_step(state, batch, key, apply_kwargs=()) -> (state, (loss, norm))`.

  `apply_kwargs` is a tuple of (name, value) items (`static_kwargs(schedule.train_kwargs(step))`);
  jit it as a static argument. When the state holds `batch_stats` (BatchNorm models), the model is
  applied with them mutable and the step stores the updated running statistics. They are
  computed over the batch as one global array: under jit with the batch sharded along 'data',
  XLA inserts the cross-device reductions, so 8 devices give the statistics of the whole batch,
  as one device would. The collection 'aux_loss' is mutable too: whatever a model sows there
  (auxiliary losses, already weighted) is summed into the training loss.

  `options` (`train_plugins.StepOptions.from_config(config)`) adds the plug-ins' training:
  ResFormer's multi-resolution replicas with their scale-consistency loss, IA-RED²'s REINFORCE
  loss on what a model sows into 'policy', the phase that trains only the token reducers, and
  LTM's IB term, whose centroids and Q the loop passes as `ib` (`InformationBottleneck.arrays`;
  vitjax/train_plugins.py). The defaults leave the step as it was.

  The norm of the parameters (and running statistics) is returned so the loop can refuse to
  checkpoint a state that went non-finite even when the loss of the step that produced it was
  still finite.
  """
  opts = options or train_plugins.StepOptions()
  sizes = opts.resolutions if len(opts.resolutions) > 1 else ()
  features = bool(sizes) and opts.scale_consistency > 0 or opts.ib_weight > 0

  def loss_fn(params, batch_stats, batch, key, kwargs, ib):
    mutable = ["aux_loss", "policy"] + ([] if batch_stats is None else ["batch_stats"])
    replicas = [train_plugins.resize_images(batch["image"], s) for s in sizes] or [batch["image"]]
    total, teacher = 0.0, None
    for i, images in enumerate(replicas):  # ResFormer: largest side first
      rng = key if i == 0 else jax.random.fold_in(key, i)
      out, updates = model.apply(_variables(params, batch_stats), images, train=True,
                                 rngs={"dropout": rng}, mutable=mutable,
                                 **({"features": True} if features else {}), **kwargs)
      logits, feats = out if features else (out, None)
      if batch_stats is not None:
        batch_stats = updates["batch_stats"]
      labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]),
                                   label_smoothing)
      # Auxiliary losses a model sows into 'aux_loss' (e.g. ShiftAddViT's MoE load balancing,
      # already weighted) are added to the training loss.
      aux = sum(jnp.sum(x) for x in jax.tree.leaves(updates.get("aux_loss", {})))
      loss = optax.softmax_cross_entropy(logits, labels).mean() + aux
      pairs = train_plugins.policy_pairs(updates.get("policy", {}))
      if pairs and opts.policy_weight:
        loss += opts.policy_weight * train_plugins.reinforce_loss(
            logits, batch["label"], pairs, penalty=opts.penalty)
      if teacher is not None:
        loss += opts.scale_consistency * train_plugins.scale_consistency_loss(
            feats["pre_logits"], teacher)
      if i == 0 and opts.ib_weight:   # LTM's IB term, at the data's side
        loss += opts.ib_weight * train_plugins.ib_loss(batch["image"], feats["pre_logits"],
                                                       batch["label"], ib, beta=opts.ib_beta)
      teacher = feats["pre_logits"] if features else None
      total += loss
    return total / len(replicas), batch_stats

  def train_step(state, batch, key, apply_kwargs=(), ib=None):
    key = jax.random.fold_in(key, state["step"])
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state.get("batch_stats"), batch, key, dict(apply_kwargs), ib)
    if opts.phase1_steps:  # IA-RED² phase 1: only the token reducers learn
      frozen = state["step"] < opts.phase1_steps
      trainable = train_plugins.reducer_param_mask(state["params"])
      grads = train_plugins.freeze_backbone(grads, trainable, frozen)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    if opts.phase1_steps:  # weight decay too
      updates = train_plugins.freeze_backbone(updates, trainable, frozen)
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    if batch_stats is not None:
      new_state["batch_stats"] = batch_stats
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(state_variables(new_state))))
    return new_state, (loss, norm)
  return train_step


def make_eval_step(model, normalize=None, image_size: int | None = None):
  """`eval_step(variables, batch, apply_kwargs=()) -> (loss sum, top-1 correct, top-5 correct,
  count)` over the batch's real examples (batch['mask']); BatchNorm layers use their running
  averages (train=False, nothing mutable). Top-5 is top-k with k = min(5, classes).

  `normalize` maps the pipeline's [-1, 1] images to what the weights expect (converted weights
  trained with other mean/std); None keeps them. `image_size` resizes the test images to that
  side first (`train_plugins.resize_images`, antialiased bicubic); None keeps their size.
  """
  def eval_step(variables, batch, apply_kwargs=()):
    images = batch["image"] if normalize is None else normalize(batch["image"])
    if image_size is not None:
      images = train_plugins.resize_images(images, image_size)
    logits = model.apply(variables, images, train=False, **dict(apply_kwargs))
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    correct5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(correct5 * mask), jnp.sum(mask)
  return eval_step


def eval_pass(eval_step, variables, data_config, *, batch_size: int, apply_kwargs: dict,
              batch_sharding) -> dict[str, float]:
  """One pass over data_config's eval split: {'loss', 'accuracy', 'top5', 'count'}.

  The runner's evals and `python -m vitjax.evaluate` both call this, so a checkpoint evaluated
  later gives the numbers its run logged.
  """
  sums = np.zeros(4)
  for batch in vdata.eval_iterator(data_config, batch_size=batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
    sums += np.asarray(jax.device_get(eval_step(variables, to_global(batch, batch_sharding),
                                                apply_kwargs=static_kwargs(apply_kwargs))))
  return {"loss": sums[0] / sums[3], "accuracy": sums[1] / sums[3], "top5": sums[2] / sums[3],
          "count": sums[3]}


def to_global(batch: dict, batch_sharding) -> dict:
  """This process's part of a batch -> global arrays sharded along 'data'."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


def gmacs(model, variables, image_shape, apply_kwargs: dict | None = None) -> float:
  """Multiply-accumulates (x1e9) of one image's forward pass, counted by XLA's cost analysis."""
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, **(apply_kwargs or {})))
  cost = fn.lower(variables, jnp.zeros((1, *image_shape), jnp.float32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / 2e9


def _check_batch(name: str, value: int):
  n = jax.device_count()
  if not isinstance(value, int) or value <= 0 or value % n:
    raise ValueError(f"config.{name}={value} is not divisible by the device count {n}; allowed "
                     f"values are positive multiples of {n}")


def total_stride(model) -> int | None:
  """The image size must be a multiple of this: the patch size of a ViT, the product of the stem's
  and every downsampling layer's strides of a multi-stage model (DESIGN.md, decision 11)."""
  info = getattr(model, "feature_info", None)
  if not callable(info):
    return None
  return max(f.stride for f in info())


def check_config(config, *, check_batches: bool = True):
  """Raises the first config error that needs no data, naming its field; returns (model, schedule).

  Runs before the data is touched, so a wrong image size is reported as such even when the
  dataset is not prepared yet. The model is built with its default head (the class count comes
  from the data later); `jax.eval_shape` traces `init` at every train and eval setting, which
  raises the model's own errors (bad grids, sizes) without compiling or allocating anything.
  """
  if check_batches:
    _check_batch("batch_size", config.batch_size)
    _check_batch("eval_batch_size", config.eval_batch_size)
  vdata.check_config(config.data)
  model = create_model(config.model_name, **config.model.to_dict())
  size = config.data.image_size
  stride = total_stride(model)
  if stride and size % stride:
    patch = getattr(model, "patch_size", None)
    what = f"patch_size={patch}" if isinstance(patch, int) and patch == stride else "its stem and stages"
    raise ValueError(f"config.data.image_size={size} gives {size}x{size} images, but "
                     f"model_name={config.model_name!r} needs a multiple of its total stride {stride} "
                     f"({what}); allowed values are multiples of {stride}")
  apply_schedule = schedules.for_model(model, config)
  settings = [apply_schedule.init_kwargs(), *apply_schedule.train_settings(),
              *(kw for _, kw in apply_schedule.evals())]
  dummy = jax.ShapeDtypeStruct((1, size, size, config.data.channels or 3), jnp.float32)
  for kw in {static_kwargs(kw): kw for kw in settings}.values():
    shapes = jax.eval_shape(functools.partial(model.init, **kw), jax.random.key(0), dummy)
    # 'aux_loss' and 'policy' are what a step sows (losses, REINFORCE terms), not state.
    if set(shapes) - {"params", "batch_stats", "aux_loss", "policy"}:
      raise ValueError(f"model_name={config.model_name!r} keeps variable collections "
                       f"{sorted(shapes)}; the runner carries only 'params' and 'batch_stats'")
  # The plug-in fields; the model is traced at every other train and eval side it will see.
  variables = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
  for side in train_plugins.check_config(config, stride, variables["params"]):
    jax.eval_shape(functools.partial(model.apply, **apply_schedule.init_kwargs()), variables,
                   jax.ShapeDtypeStruct((1, side, side, dummy.shape[-1]), jnp.float32))
  opts = train_plugins.StepOptions.from_config(config)
  for field, value, without in opts.pre_logits_users():  # the step reads pre_logits
    try:
      jax.eval_shape(functools.partial(model.apply, features=True,
                                       **apply_schedule.init_kwargs()), variables, dummy)
    except ValueError as e:
      raise ValueError(f"config.{field}={value} uses the pre_logits of apply(..., features=True), "
                       f"which model_name={config.model_name!r} cannot give here: {e}; set "
                       f"config.{field}=0 {without}") from None
  return model, apply_schedule


def write_run_files(workdir: str, config, info):
  """config.json (the run's config) and dataset.json (what the data turned out to be: its TFDS
  name, class names and image shape), which `vitjax.evaluate` and `vitjax.predict` read back."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "dataset.json"), "w") as f:
    json.dump({"name": info.name, "num_classes": info.num_classes,
               "image_shape": list(info.image_shape), "class_names": list(info.class_names),
               "train_size": info.train_size, "eval_size": info.eval_size}, f, indent=1)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last eval metrics."""
  console.setup()
  t_start = time.time()
  if config.distributed:
    jax.distributed.initialize()
  devices = jax.devices()
  console.log("devices: %d x %s (%s), process %d/%d, JAX %s", len(devices), devices[0].platform,
              devices[0].device_kind, jax.process_index(), jax.process_count(), jax.__version__)
  check_config(config)  # before any data is read or anything is written

  mesh = make_mesh()
  repl = jax.NamedSharding(mesh, jax.P())
  batch_sharding = jax.NamedSharding(mesh, jax.P("data"))
  info = vdata.dataset_info(config.data)
  console.log("data %s: %s train (%s), %s eval (%s), %dx%dx%d images, %d classes", info.name,
              f"{info.train_size:,}", config.data.train_split, f"{info.eval_size:,}",
              config.data.eval_split, *info.image_shape, info.num_classes)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_run_files(workdir, config, info)
  model = create_model(config.model_name, num_classes=info.num_classes, **config.model.to_dict())
  apply_schedule = schedules.for_model(model, config)
  evals = apply_schedule.evals()
  tx, lr_schedule = optim.make_optimizer(config)

  key = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(key)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)

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
  console.log("model %s: %s params", config.model_name, f"{n_params:,}")
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
    console.log("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    if config.init_from:
      state = init_state_from(config, state, tx, repl)
      console.log("initialised from %s (kept fresh: %s)", config.init_from,
                  config.init_from_skip or "nothing")

  train_step = jax.jit(make_train_step(model, tx, label_smoothing=config.label_smoothing,
                                       options=train_plugins.StepOptions.from_config(config)),
                       donate_argnums=(0,), static_argnames=("apply_kwargs",),
                       out_shardings=(repl, repl))
  # Each eval setting at each test-image side (config.eval_resolutions), one eval step per side.
  evals, headline = train_plugins.eval_settings(evals, config)
  sides = {side for _, _, side in evals}
  eval_steps = {side: jax.jit(make_eval_step(
      model, image_size=None if side == config.data.image_size else side),
      static_argnames=("apply_kwargs",)) for side in sides}
  macs = {name: gmacs(model, state_variables(state), (side, side, info.image_shape[-1]), kw)
          for name, kw, side in evals}

  def evaluate(step):
    row = {}
    for name, kw, side in evals:
      m = eval_pass(eval_steps[side], state_variables(state), config.data,
                    batch_size=config.eval_batch_size, apply_kwargs=kw,
                    batch_sharding=batch_sharding)
      row.update({f"eval/loss{name}": m["loss"], f"eval/accuracy{name}": m["accuracy"],
                  f"eval/top5{name}": m["top5"], f"eval/gmacs{name}": macs[name]})
      console.log("eval step %d%s: loss %.4f | top-1 %.4f | top-5 %.4f | %.4f GMACs/image", step,
                  name, m["loss"], m["accuracy"], m["top5"], macs[name])
    # The plain keys repeat the headline setting: the schedule's (LookupViT's largest grid) at
    # data.image_size.
    headline_name = apply_schedule.headline + (headline or "")
    if headline_name:
      row.update({"eval/loss": row[f"eval/loss{headline_name}"],
                  "eval/accuracy": row[f"eval/accuracy{headline_name}"],
                  "eval/top5": row[f"eval/top5{headline_name}"],
                  "eval/gmacs": row[f"eval/gmacs{headline_name}"]})
    if jax.process_index() == 0:
      writer.write(step, row)
      writer.plot()
    return row

  ib = train_plugins.information_bottleneck(config, model, info, apply_schedule.init_kwargs())
  losses, last_row = [], {}
  # Images/s count only steps that ran a compiled step: the first step of each apply setting (one
  # per LookupViT grid) compiles, and is timed apart and left out, as are evals. Time left adds
  # the remaining evals at the duration of the last one.
  t_log, timed, excluded, compiled = time.time(), 0, 0.0, set()
  eval_seconds = 0.0
  n_evals_after = lambda s: sum(1 for k in range(s + 1, config.total_steps + 1)  # noqa: E731
                                if k % config.eval_every_steps == 0 or k == config.total_steps)
  progress = console.Progress(config.total_steps, start)
  try:
    for step in range(start + 1, config.total_steps + 1):
      if ib is not None:  # LTM's IB: new feature clusters and Q when due, left out of the timing
        excluded += ib.refresh(step, state, state_variables, config.eval_batch_size, losses)
      kw = static_kwargs(apply_schedule.train_kwargs(step))
      first = kw not in compiled
      if first:
        jax.block_until_ready(losses)  # finish the steps before, so only this one is set apart
        t_first = time.time()
      state, loss = train_step(state, to_global(next(train_iter), batch_sharding), dropout_key,
                               apply_kwargs=kw, ib=None if ib is None else ib.arrays(step))
      losses.append(loss)
      if first:
        compiled.add(kw)
        jax.block_until_ready(loss)
        excluded += time.time() - t_first
      else:
        timed += 1
      progress.advance(step)
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
        if timed:
          sec_per_step = max(time.time() - t_log - excluded, 1e-9) / timed
        else:  # only compiling steps so far: their time is all there is
          sec_per_step = (time.time() - t_log) / max(len(values), 1)
        ips = config.batch_size / sec_per_step
        lr = float(lr_schedule(step))
        if jax.process_index() == 0:
          writer.write(step, {"train/loss": values.mean(), "train/lr": lr, "train/images_per_sec": ips})
        left = (config.total_steps - step) * sec_per_step + n_evals_after(step) * eval_seconds
        progress.report(step, float(values.mean()), ips, lr, left)
        losses, t_log, timed, excluded = [], time.time(), 0, 0.0
      if is_ckpt:
        ckpt.save(step, state, train_iter.get_state())
        console.log("checkpoint step %d: %s", step, os.path.join(ckpt.directory, str(step)))
      if step % config.eval_every_steps == 0 or step == config.total_steps:
        t_eval = time.time()
        last_row = evaluate(step)
        eval_seconds = time.time() - t_eval
        t_log, timed, excluded = time.time(), 0, 0.0  # Keep eval time out of the throughput.
    if not last_row and start >= config.total_steps:
      last_row = evaluate(start)
  finally:
    progress.close()
    ckpt.close()
  if last_row:
    console.log("done: step %d in %s, eval top-1 %.4f, top-5 %.4f; workdir %s", config.total_steps,
                console.duration(time.time() - t_start), last_row["eval/accuracy"],
                last_row["eval/top5"], workdir)
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
