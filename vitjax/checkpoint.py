"""Orbax checkpoints: the only module that imports orbax (DESIGN.md, decision 8).

Two kinds of checkpoint:
  * training checkpoints under `<workdir>/checkpoints/<step>/`, written by `Checkpointer`: the train state
    (params, optimizer state, step, and `batch_stats` for BatchNorm models) plus a JSON item holding the data iterator's state, so a resumed run
    continues the same stream;
  * parameter checkpoints (`save_params` / `load_variables`), which weight converters write and
    `config.init_from` reads (`load_init_from`): params, and the BatchNorm statistics of models that
    have them.
Saves are atomic (Orbax writes to a temporary directory and renames it), so a run killed mid-save keeps its
last complete checkpoint.

`read_for_inference(DIR)` reads the variables of either kind for `vitjax.evaluate` / `vitjax.predict`:
from a workdir, only the params and batch_stats of its latest checkpoint (no optimizer state).
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _abstract(tree):
  """ShapeDtypeStructs that carry each leaf's sharding, so restored arrays land where `tree`'s live."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the training loop."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, create: bool = True):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: Any):
    """Starts an asynchronous save of `state` (a pytree) and `data_state` (JSON-serialisable)."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, like_state: Any, *, model_name: str = "") -> tuple[Any, Any]:
    """Restores (state, data_state) at `step`; arrays take the shapes and shardings of `like_state`.

    The saved state must hold the same entries as `like_state`: a BatchNorm model resumed from a
    checkpoint without `batch_stats` (or the reverse) is a different model, not a resumable run.
    """
    saved = set(self._mngr.item_metadata(step)["state"].keys())
    where = os.path.join(self.directory, str(step))
    if "batch_stats" in like_state and "batch_stats" not in saved:
      raise ValueError(no_batch_stats_message(f"checkpoint {where!r}", model_name,
                                              like_state["batch_stats"]) +
                       "; it was written by a run of another model: use a new workdir")
    if saved != set(like_state):
      raise ValueError(f"checkpoint {where!r} holds {sorted(saved)}, but model_name={model_name!r} "
                       f"trains {sorted(like_state)}; it was written by a run of another model: "
                       "use a new workdir")
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like_state)), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def read_state(self, step: int) -> Any:
    """The train state at `step` as saved (no target structure: dicts and host-default arrays)."""
    return self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def save_params(directory: str, params: Any, meta: dict | None = None, batch_stats: Any = None):
  """Writes a parameter checkpoint: `<directory>/params` (Orbax), `<directory>/meta` (JSON) and,
  for models with BatchNorm, `<directory>/batch_stats` (their running statistics, which a
  fine-tune needs as much as the weights)."""
  directory = os.path.abspath(directory)
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta or {})))
  if batch_stats is not None:
    items["batch_stats"] = ocp.args.StandardSave(batch_stats)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.Composite(**items), force=True)


def load_variables(directory: str, like_params: Any | None = None) -> tuple[dict, dict]:
  """Reads a checkpoint written by `save_params`; returns (variables, meta).

  `variables` is {"params": ...} plus "batch_stats" when the checkpoint holds them (the converters'
  variables layout); arrays are host/default-device arrays, or take `like_params`' shardings.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, "params")):
    raise ValueError(f"init_from={directory!r} is not a parameter checkpoint (no 'params' inside); "
                     "write one with `python -m vitjax.convert ...` or vitjax.checkpoint.save_params")
  items = dict(params=(ocp.args.StandardRestore(_abstract(like_params)) if like_params is not None
                       else ocp.args.StandardRestore()),
               meta=ocp.args.JsonRestore())
  if os.path.isdir(os.path.join(directory, "batch_stats")):
    items["batch_stats"] = ocp.args.StandardRestore()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(directory, ocp.args.Composite(**items))
  variables = {k: out[k] for k in ("params", "batch_stats") if k in items}
  return variables, dict(out["meta"] or {})


def load_params(directory: str, like_params: Any | None = None) -> tuple[Any, dict]:
  """Reads a checkpoint written by `save_params`; returns (params, meta) (see `load_variables`)."""
  variables, meta = load_variables(directory, like_params)
  return variables["params"], meta


def batchnorm_layers(batch_stats) -> list[str]:
  """The module paths that own running statistics, for error messages."""
  paths = {"/".join(k[:-1]) for k, _ in _flatten(batch_stats)}
  return sorted(paths)


def no_batch_stats_message(what: str, model_name: str, batch_stats) -> str:
  layers = batchnorm_layers(batch_stats)
  shown = ", ".join(layers[:6]) + (f" (+{len(layers) - 6} more)" if len(layers) > 6 else "")
  return f"{what} has no batch_stats, but model_name={model_name!r} has BatchNorm layers: {shown}"


def load_init_from(path: str, params: Any, *, skip: str, model_name: str,
                   batch_stats: Any = None) -> tuple[Any, Any]:
  """Loads `config.init_from` strictly into fresh (params, batch_stats); returns the merged pair.

  Every entry must match by path and shape unless its path (e.g. 'head/kernel', within params or
  within batch_stats) matches the regex `skip`, which keeps its fresh init: a fine-tune that
  silently dropped or invented weights would train something other than what was asked for.
  A BatchNorm model (`batch_stats` given) needs the checkpoint's statistics too.
  """
  loaded, _ = load_variables(path)
  if batch_stats is not None and "batch_stats" not in loaded:
    raise ValueError(no_batch_stats_message(f"init_from checkpoint {path!r}", model_name,
                                            batch_stats) +
                     "; write it with vitjax.checkpoint.save_params(..., batch_stats=...)")
  pattern = re.compile(skip) if skip else None
  params, problems = _merge(params, loaded["params"], pattern, "")
  if batch_stats is not None or "batch_stats" in loaded:
    batch_stats, more = _merge(batch_stats if batch_stats is not None else {},
                               loaded.get("batch_stats", {}), pattern, "batch_stats/")
    problems += more
  if problems:
    raise ValueError(f"init_from={path!r} does not fit model_name={model_name!r} "
                     f"(init_from_skip={skip!r}): " + "; ".join(problems))
  return params, batch_stats


def _merge(new, old, skip, prefix: str) -> tuple[Any, list[str]]:
  """`new` with every non-skipped leaf taken from `old`, plus the list of mismatches."""
  flat_new = {"/".join(k): v for k, v in _flatten(new)}
  flat_old = {"/".join(k): v for k, v in _flatten(old)}
  problems = _problems(flat_new, flat_old, skip, prefix)
  if problems:
    return new, problems
  merged = {p: (v if skip and skip.search(p) else jnp.asarray(flat_old[p], v.dtype))
            for p, v in flat_new.items()}
  return _unflatten(merged, new), []


def _problems(flat_new: dict, flat_old: dict, skip, prefix: str) -> list[str]:
  problems = []
  for path, value in flat_new.items():
    if skip and skip.search(path):
      continue
    if path not in flat_old:
      problems.append(f"missing {prefix}{path}")
    elif flat_old[path].shape != value.shape:
      problems.append(f"shape {prefix}{path}: checkpoint {flat_old[path].shape} vs model {value.shape}")
  problems += [f"unexpected {prefix}{p}" for p in flat_old
               if p not in flat_new and not (skip and skip.search(p))]
  return problems


def _flatten(tree):
  return [(tuple(str(getattr(k, "key", k)) for k in path), v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _unflatten(flat: dict, like):
  leaves = [flat["/".join(k)] for k, _ in _flatten(like)]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _host_abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def read_run_variables(directory: str, step: int | None = None) -> tuple[dict, int]:
  """{'params', 'batch_stats'?} of a training checkpoint under `directory` (a workdir's
  checkpoints/ folder) at `step` (default: the latest), and that step. The optimizer state and the
  data iterator's state stay on disk."""
  mngr = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{directory!r} holds no finished checkpoint")
    saved = mngr.item_metadata(step)["state"]
    target = {k: _host_abstract(saved[k]) for k in ("params", "batch_stats") if k in saved}
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    mngr.close()
  return dict(out["state"]), step


def checkpoint_kind(directory: str) -> str:
  """'run' (a workdir, DIR/checkpoints/<step>), 'params' (DIR/params, as vitjax.convert writes), or
  a ValueError naming DIR and what was expected."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise ValueError(f"--checkpoint={directory!r} does not exist; expected a training run's "
                     "workdir or a directory written by `python -m vitjax.convert`")
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    return "run"
  if os.path.isdir(os.path.join(directory, "params")):
    return "params"
  raise ValueError(f"--checkpoint={directory!r} is neither a training run's workdir (no "
                   "checkpoints/ folder) nor a parameter checkpoint written by `python -m "
                   "vitjax.convert` or vitjax.checkpoint.save_params (no params/ folder)")


def read_for_inference(directory: str) -> tuple[dict, dict]:
  """(variables, record) of a workdir (its latest checkpoint) or a parameter checkpoint.

  `record` = {'kind': 'run' | 'params', 'path', 'step' (runs), 'meta' (parameter checkpoints: what
  the converter recorded)}. Arrays land on the default device.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  kind = checkpoint_kind(directory)
  if kind == "run":
    try:
      variables, step = read_run_variables(os.path.join(directory, "checkpoints"))
    except ValueError as e:
      raise ValueError(f"--checkpoint={directory!r} is a workdir, but {e}; train it first") from None
    return variables, {"kind": kind, "path": directory, "step": step, "meta": {}}
  variables, meta = load_variables(directory)
  return variables, {"kind": kind, "path": directory, "step": None, "meta": meta}


def fit_problems(variables: dict, like: dict) -> list[str]:
  """Every path or shape where `variables` differ from `like` (e.g. jax.eval_shape of model.init),
  over params and batch_stats: an empty list when the checkpoint fits the model."""
  problems = []
  for coll in sorted(set(variables) | set(like)):
    if coll not in variables:
      problems.append(f"missing {coll} (the model has {len(_flatten(like[coll]))} entries)")
    elif coll not in like:
      problems.append(f"unexpected {coll} (the model has none)")
    else:
      prefix = "" if coll == "params" else coll + "/"
      problems += _problems({"/".join(k): v for k, v in _flatten(like[coll])},
                            {"/".join(k): v for k, v in _flatten(variables[coll])}, None, prefix)
  return problems
