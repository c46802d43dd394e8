"""Apply schedules: the per-step keyword arguments a model's `apply` takes in training and eval.

Most models are applied the same way every step (`NoSchedule`). Some take static arguments that the
runner varies: LookupViT trains at a compressed grid drawn per step and is evaluated at several
(`GridSchedule`). The model says which schedule it needs through an optional
`apply_schedule(config)` method, so the training loop holds no model-specific knowledge: it asks
`for_model(model, config)` and uses only the three methods of `ApplySchedule`.

Every keyword value is static (hashable): the loop passes them to jit as static arguments, so each
distinct setting compiles once.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class ApplySchedule(Protocol):
  """What the runner asks of a schedule.

  `headline` names the eval suffix whose metrics the plain keys (`eval/loss`, `eval/accuracy`)
  repeat; "" when the single eval setting already writes the plain keys.
  """
  headline: str

  def train_kwargs(self, step: int) -> dict:
    """Static `model.apply` kwargs of training step `step`: a pure function of (config.seed, step),
    so a resumed run draws what the uninterrupted one did."""

  def train_settings(self) -> list[dict]:
    """Every distinct value `train_kwargs` can return, so the runner can check them before it
    compiles anything."""

  def evals(self) -> list[tuple[str, dict]]:
    """(metric-name suffix, apply kwargs) of each eval setting, e.g. ("@3x3", {"grid": (3, 3)})."""

  def init_kwargs(self) -> dict:
    """The apply kwargs `model.init` is traced with."""


class NoSchedule:
  """Models that take no per-step arguments: one train setting, one eval setting, no suffix."""
  headline = ""

  def __init__(self, config):
    if (tuple(config.get("grids", ())) or tuple(config.get("eval_grids", ()))
        or tuple(config.get("grid_weights", ()))):
      raise ValueError(f"config.grids / config.eval_grids / config.grid_weights are set, but "
                       f"model_name={config.model_name!r} has no compressed-token grid; leave them "
                       "empty")

  def train_kwargs(self, step: int) -> dict:
    del step
    return {}

  def train_settings(self) -> list[dict]:
    return [{}]

  def evals(self) -> list[tuple[str, dict]]:
    return [("", {})]

  def init_kwargs(self) -> dict:
    return {}


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


def grid_name(grid) -> str:
  return f"@{grid[0]}x{grid[1]}"


class GridSchedule:
  """LookupViT: trains at a compressed grid drawn per step from config.grids (weighted by
  config.grid_weights), evaluates at every config.eval_grids entry (default: config.grids).

  The plain eval keys repeat the largest eval grid, the model's full budget.
  """

  def __init__(self, grids, eval_grids, probs, seed: int):
    self.grids = [tuple(int(v) for v in g) for g in grids]
    self.eval_grids = [tuple(int(v) for v in g) for g in eval_grids]
    self.probs = np.asarray(probs, np.float64)
    self.seed = int(seed)
    self.headline = grid_name(max(self.eval_grids, key=lambda g: g[0] * g[1]))

  @classmethod
  def from_config(cls, config) -> GridSchedule:
    grids = [tuple(int(v) for v in g) for g in config.grids]
    if not grids:
      raise ValueError(f"config.grids is empty: model_name={config.model_name!r} needs at least one "
                       "compressed grid (h, w) to train with, e.g. ((3, 3), (5, 5), (7, 7))")
    eval_grids = [tuple(int(v) for v in g) for g in config.eval_grids] or grids
    return cls(grids, eval_grids, grid_probabilities(config, len(grids)), config.seed)

  def train_kwargs(self, step: int) -> dict:
    return {"grid": sample_grid(self.grids, self.probs, self.seed, step)}

  def train_settings(self) -> list[dict]:
    return [{"grid": g} for g in self.grids]

  def evals(self) -> list[tuple[str, dict]]:
    return [(grid_name(g), {"grid": g}) for g in self.eval_grids]

  def init_kwargs(self) -> dict:
    return {"grid": self.grids[-1]}


def for_model(model, config) -> ApplySchedule:
  """The model's own schedule (`model.apply_schedule(config)`) when it defines one, else NoSchedule."""
  make = getattr(model, "apply_schedule", None)
  return make(config) if callable(make) else NoSchedule(config)
