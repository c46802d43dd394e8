"""`from_official`'s table for SReT (szq0214/SReT, SReT.py): its key names -> vitjax.

The official stage keeps its blocks in one list, `transformers.{s}.blocks.{i}`, with entry
i = 4r + p of recursive unit r being: p = 0 the shared block F_r, p = 1 the NLL after its first
use, p = 2 F_r again (the same module, so `state_dict()` holds a second, identical copy of its
tensors) and p = 3 the NLL after its recursive use. vitjax keeps F_r once, in
`stages_{s}/blocks_{r}/block`, and the NLLs in `.../nll_0` and `.../nll_1`: the rules below turn
the list index into (r, part), the second copies are skipped (`ignore`) after `_sret_overrides`
has checked that they equal the first.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import (Family, Overrides, bn_rules, dense_rules,
                                            state_shape)

_BLOCK = r"transformers\.(\d+)\.blocks\.(\d+)\."
_PARTS = {0: "block", 1: "nll_0", 3: "nll_1"}     # list position i % 4 -> vitjax submodule
# Decimal numbers i with i % 4 == 2 (the second copy of each shared block): a number's residue
# mod 4 is that of its last two digits, 10a + b = 2a + b (mod 4).
SECOND_USE = r"(?:\d*(?:[02468][26]|[13579][048])|[26])"


class _Groups:
  """What `Rule.match` returns to `apply_rules`: just the groups its targets are filled with."""

  def __init__(self, groups):
    self._groups = tuple(groups)

  def groups(self):
    return self._groups


@dataclasses.dataclass(frozen=True)
class _UnitRule(Rule):
  """A rule over `transformers.{s}.blocks.{i}.<rest>`: its targets see {0} = s, {1} = the unit
  r = i // 4, {2} = the part (`_PARTS[i % 4]`), then the pattern's own groups. Second copies
  (i % 4 == 2) do not match."""

  def match(self, key: str):
    m = re.fullmatch(self.pattern, key)
    if m is None or int(m.group(2)) % 4 not in _PARTS:
      return None
    stage, index, *rest = m.groups()
    return _Groups((stage, str(int(index) // 4), _PARTS[int(index) % 4], *rest))


@dataclasses.dataclass(frozen=True)
class _NextStageRule(Rule):
  """A rule whose first group, a stage index s, reaches the targets as s + 1."""

  def match(self, key: str):
    m = re.fullmatch(self.pattern, key)
    return None if m is None else _Groups((str(int(m.group(1)) + 1), *m.groups()[1:]))


def _unit_rule(tail: str, *targets: str, transform=mapping.copy) -> _UnitRule:
  return _UnitRule(_BLOCK + tail, tuple(targets), transform)


def _pos_embed(x, shapes):
  """(1, C, h, w) -> (1, h, w, C)."""
  return [np.ascontiguousarray(x.transpose(0, 2, 3, 1))] if x.ndim == 4 else [x]


def _sret_rules() -> tuple[Rule, ...]:
  p = "params/"
  rules = [rule(r"pos_embed", p + "stem/pos_embed", transform=_pos_embed)]
  for i in (1, 2, 3):
    rules += dense_rules(rf"patch_embed\.conv{i}", f"stem/conv{i}", conv)
    rules += bn_rules(rf"patch_embed\.bn{i}", f"stem/bn{i}")
  # The pooling closes stage s officially (`pools.s`) and opens stage s + 1 in vitjax.
  rules += [_NextStageRule(r"pools\.(\d+)\.conv\.weight",
                           (p + "stages_{0}/downsample/conv/kernel",), conv),
            _NextStageRule(r"pools\.(\d+)\.conv\.bias", (p + "stages_{0}/downsample/conv/bias",))]
  rules += [rule(r"norm\.weight", p + "norm/scale"), rule(r"norm\.bias", p + "norm/bias")]
  rules += dense_rules(r"head", "head")
  part = p + "stages_{0}/blocks_{1}/{2}/"
  attn = part + "attn/"
  rules += [
      _unit_rule(r"(norm[12])\.weight", part + "{3}/scale"),
      _unit_rule(r"(norm[12])\.bias", part + "{3}/bias"),
      _unit_rule(r"attn\.qkv\.weight", attn + "query/kernel", attn + "key/kernel",
                 attn + "value/kernel", transform=mapping.split(3, linear)),
      _unit_rule(r"attn\.qkv\.bias", attn + "query/bias", attn + "key/bias", attn + "value/bias",
                 transform=mapping.split(3, mapping.copy)),
      _unit_rule(r"attn\.proj\.weight", attn + "out/kernel", transform=linear),
      _unit_rule(r"attn\.proj\.bias", attn + "out/bias"),
      _unit_rule(r"mlp\.fc1\.weight", part + "mlp/Dense_0/kernel", transform=linear),
      _unit_rule(r"mlp\.fc1\.bias", part + "mlp/Dense_0/bias"),
      _unit_rule(r"mlp\.fc2\.weight", part + "mlp/Dense_1/kernel", transform=linear),
      _unit_rule(r"mlp\.fc2\.bias", part + "mlp/Dense_1/bias"),
      _unit_rule(r"(coefficient\d)\.bias", part + "{3}"),
  ]
  return tuple(rules)


def mlp_ratio_of(hidden: list[int], dims: list[int]) -> float | None:
  """The shortest decimal r with int(dim * r) == hidden for every stage (the official hidden
  width is int(dim * mlp_ratio), so the ratio of one stage alone is not always the ratio)."""
  lo = max(h / d for h, d in zip(hidden, dims))
  for decimals in range(7):
    scale = 10 ** decimals
    r = float(np.ceil(lo * scale - 1e-9) / scale)
    if all(int(d * r) == h for h, d in zip(hidden, dims)):
      return int(r) if r == int(r) else r
  return None


def _check_shared_copies(state):
  """The two copies of each shared block (list positions 4r and 4r + 2) must be equal."""
  differ = []
  for key in state:
    m = re.match(_BLOCK + r"(.*)", key)
    if m and int(m.group(2)) % 4 == 2:
      first = f"transformers.{m.group(1)}.blocks.{int(m.group(2)) - 2}.{m.group(3)}"
      if first in state and not np.array_equal(mapping.to_numpy(state[first]),
                                               mapping.to_numpy(state[key])):
        differ.append(f"{first} != {key}")
  if differ:
    listing = mapping._short_list(differ)  # pylint: disable=protected-access
    raise ValueError("Not a consistent official SReT state dict: each shared block appears twice "
                     "(list positions 4r and 4r + 2 of a stage) and both copies must be equal; "
                     "these differ:" + listing)


def _sret_overrides(state) -> Overrides:
  """Widths, depths, MLP ratios and classes, read off the weights (num_heads, groups1 and
  groups2 do not show in them: pass them for a non-standard size). Checks the shared copies."""
  _check_shared_copies(state)
  found: Overrides = {}
  lengths: dict[int, int] = {}
  for key in state:
    if m := re.match(_BLOCK, key):
      s, i = int(m.group(1)), int(m.group(2))
      lengths[s] = max(lengths.get(s, 0), i + 1)
  if not lengths:
    return found
  stages = range(max(lengths) + 1)
  found["depths"] = tuple(lengths.get(s, 0) // 2 for s in stages)   # 4 entries per unit = 2 uses
  norms = [f"transformers.{s}.blocks.0.norm1.weight" for s in stages]
  if all(k in state for k in norms):
    dims = [state_shape(state, k)[0] for k in norms]
    found["dims"] = tuple(dims)
    for field, index in (("mlp_ratio", 0), ("np_mlp_ratio", 1)):
      fc1 = [f"transformers.{s}.blocks.{index}.mlp.fc1.weight" for s in stages]
      if all(k in state for k in fc1):
        ratio = mlp_ratio_of([state_shape(state, k)[0] for k in fc1], dims)
        if ratio is not None:
          found[field] = ratio
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


def _sret_image_size(state, model) -> int:
  """The official `pos_embed` is (1, C, S/8, S/8) for S px images."""
  return 8 * state_shape(state, "pos_embed")[-1] if "pos_embed" in state else 224


FAMILY = Family(
    name="sret",
    repository="szq0214/SReT",
    marker=r"transformers\.\d+\.blocks\.\d+\.coefficient\d\.bias",
    models={"sret_t": ("SReT_T", "SReT_T_distill"), "sret_lt": ("SReT_LT", "SReT_LT_distill"),
            "sret_s": ("SReT_S", "SReT_S_distill")},
    rules=_sret_rules(),
    overrides=_sret_overrides,
    image_size=_sret_image_size,
    ignore=(r".*\.num_batches_tracked", r"transformers\.\d+\.blocks\." + SECOND_USE + r"\..*"))
