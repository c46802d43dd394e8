"""Orbax checkpoints: the only module that imports orbax (DESIGN.md, decision 8).

Two kinds of checkpoint:
  * training checkpoints under `<workdir>/checkpoints/<step>/`, written by `Checkpointer`: the train state
    (params, optimizer state, step) plus a JSON item holding the data iterator's state, so a resumed run
    continues the same stream;
  * parameter-only checkpoints (`save_params` / `load_params`), which weight converters write and
    `config.init_from` reads.
Saves are atomic (Orbax writes to a temporary directory and renames it), so a run killed mid-save keeps its
last complete checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
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
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: Any):
    """Starts an asynchronous save of `state` (a pytree) and `data_state` (JSON-serialisable)."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, like_state: Any) -> tuple[Any, Any]:
    """Restores (state, data_state) at `step`; arrays take the shapes and shardings of `like_state`."""
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


def save_params(directory: str, params: Any, meta: dict | None = None):
  """Writes a parameter-only checkpoint: `<directory>/params` (Orbax) and `<directory>/meta` (JSON)."""
  directory = os.path.abspath(directory)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta or {}))), force=True)


def load_params(directory: str, like_params: Any | None = None) -> tuple[Any, dict]:
  """Reads a checkpoint written by `save_params`; returns (params, meta) as host/default-device arrays."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, "params")):
    raise ValueError(f"init_from={directory!r} is not a parameter checkpoint (no 'params' inside); "
                     "write one with `python -m vitjax.convert ...` or vitjax.checkpoint.save_params")
  restore = (ocp.args.StandardRestore(_abstract(like_params)) if like_params is not None
             else ocp.args.StandardRestore())
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(directory, ocp.args.Composite(params=restore, meta=ocp.args.JsonRestore()))
  return out["params"], dict(out["meta"] or {})
