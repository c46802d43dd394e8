"""The `Family` record of `from_official` and the transforms and readers its tables share."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vitjax.convert.mapping import Rule, linear, rule

Overrides = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
  """One official repository and how its state dicts map onto vitjax models."""
  name: str
  repository: str                        # where the official code lives (owner/name on GitHub)
  marker: str                            # regex: some key of every state dict of the family matches
  models: Mapping[str, Sequence[str]]    # vitjax model name -> official constructor names
  rules: Sequence[Rule]                  # targets are 'params/...' or 'batch_stats/...'
  overrides: Callable[[Mapping[str, Any]], Overrides]
  # (state dict, model) -> the training image side the weights are meant for (meta['image_size'])
  image_size: Callable[[Mapping[str, Any], Any], int] = lambda state, model: 224
  always: Sequence[str] = ("num_classes",)   # overrides kept in meta even at their default
  ignore: Sequence[str] = ()                 # source keys that are derived buffers, skipped


# Transforms shared by the tables.

def pointwise(x, shapes):
  """1x1 Conv2d weight (out, in, 1, 1) or Linear (out, in) -> Dense kernel (in, out)."""
  if x.ndim == 4 and x.shape[2:] == (1, 1):
    x = x[:, :, 0, 0]
  return linear(x, shapes)


def depthwise(x, shapes):
  """Depthwise Conv2d weight (C, 1, kh, kw) -> (kh, kw, C), or (kh, kw, 1, C) where the vitjax
  layer keeps Flax's grouped-conv layout (whichever the target's rank is)."""
  if x.ndim != 4 or x.shape[1] != 1:
    return [x]
  y = np.ascontiguousarray(x[:, 0].transpose(1, 2, 0))                  # (kh, kw, C)
  if shapes[0] is not None and len(shapes[0]) == 4:
    y = y[:, :, None, :]
  return [y]


def channels_last(x, shapes):
  """HorNet's GF filter (C, h, w, 2) -> vitjax's (h, w, C, 2)."""
  return [np.ascontiguousarray(x.transpose(1, 2, 0, 3))] if x.ndim == 4 else [x]


def state_shape(state, key) -> tuple[int, ...]:
  return tuple(np.shape(state[key]))


def count_blocks(state, pattern: str) -> dict[tuple[int, ...], int]:
  """{leading groups: 1 + max last group} over keys matching `pattern` (depths per stage)."""
  out: dict[tuple[int, ...], int] = {}
  for k in state:
    if m := re.match(pattern, k):
      *lead, last = (int(g) for g in m.groups())
      out[tuple(lead)] = max(out.get(tuple(lead), 0), last + 1)
  return out


def stage_depths(state, pattern: str) -> tuple[int, ...] | None:
  """Blocks per stage from keys `pattern` (groups: stage, block); None when there are none."""
  per_stage = count_blocks(state, pattern)
  if not per_stage:
    return None
  return tuple(per_stage.get((i,), 0) for i in range(max(s for s, in per_stage) + 1))


def bn_rules(src: str, dst: str) -> list[Rule]:
  """A BatchNorm2d `src` (regex prefix) -> vitjax BatchNorm `dst` (path with its format fields)."""
  return [rule(src + r"\.weight", "params/" + dst + "/scale"),
          rule(src + r"\.bias", "params/" + dst + "/bias"),
          rule(src + r"\.running_mean", "batch_stats/" + dst + "/mean"),
          rule(src + r"\.running_var", "batch_stats/" + dst + "/var")]


def dense_rules(src: str, dst: str, transform=linear) -> list[Rule]:
  return [rule(src + r"\.weight", "params/" + dst + "/kernel", transform=transform),
          rule(src + r"\.bias", "params/" + dst + "/bias")]
