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

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
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
  if problems:
    return new, problems
  merged = {p: (v if skip and skip.search(p) else jnp.asarray(flat_old[p], v.dtype))
            for p, v in flat_new.items()}
  return _unflatten(merged, new), []


def _flatten(tree):
  return [(tuple(str(getattr(k, "key", k)) for k in path), v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _unflatten(flat: dict, like):
  leaves = [flat["/".join(k)] for k, _ in _flatten(like)]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)
