"""`from_official`'s table for RMT (qhfan/RMT): its key names -> vitjax."""
from __future__ import annotations

import re

import numpy as np

from vitjax.convert.mapping import Rule, conv, rule
from vitjax.convert.official.family import (Family, Overrides, bn_rules, dense_rules, depthwise,
                                            stage_depths, state_shape)


# RMT (qhfan/RMT, classfication_release/RMT.py and classification_token_label_release/RMT.py).
# The official patch merging closes stage i (`layers.i.downsample`); vitjax's opens stage i + 1.

_RMT_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\."
_RMT = "stages_{0}/blocks_{1}/"
_RMT_MAX_STAGES = 8


def _rmt_rules() -> tuple[Rule, ...]:
  rules = []
  for i, conv_index in enumerate((0, 3, 6, 9)):       # PatchEmbed: conv, BN, GELU, ...
    rules += dense_rules(rf"patch_embed\.proj\.{conv_index}", f"stem/conv_{i}", conv)
    rules += bn_rules(rf"patch_embed\.proj\.{conv_index + 1}", f"stem/bn_{i}")
  for i in range(_RMT_MAX_STAGES):
    rules += dense_rules(rf"layers\.{i}\.downsample\.reduction", f"stages_{i + 1}/downsample/conv",
                          conv)
    rules += bn_rules(rf"layers\.{i}\.downsample\.norm", f"stages_{i + 1}/downsample/bn")
  b = _RMT_BLOCK
  for src, dst in (("retention_layer_norm", "norm1"), ("final_layer_norm", "norm2")):
    rules += [rule(b + src + r"\.weight", "params/" + _RMT + dst + "/scale"),
              rule(b + src + r"\.bias", "params/" + _RMT + dst + "/bias")]
  for src, dst in (("pos.conv", "cpe"), ("retention.lepe.conv", "attn/lepe"),
                   ("ffn.dwconv.conv", "ffn/dwconv")):
    rules += dense_rules(b + re.escape(src), _RMT + dst, depthwise)
  for src, dst in (("retention.q_proj", "attn/q_proj"), ("retention.k_proj", "attn/k_proj"),
                   ("retention.v_proj", "attn/v_proj"), ("retention.out_proj", "attn/out_proj"),
                   ("ffn.fc1", "ffn/fc1"), ("ffn.fc2", "ffn/fc2")):
    rules += dense_rules(b + re.escape(src), _RMT + dst)
  rules += [rule(b + r"gamma_([12])", "params/" + _RMT + "gamma{2}")]
  rules += dense_rules(r"proj", "proj") + bn_rules(r"norm", "norm")
  rules += dense_rules(r"head", "head") + dense_rules(r"aux_head", "aux_head")
  return tuple(rules)


def _rmt_decay_settings(decay: np.ndarray, stage: int) -> tuple[float, float | None]:
  """(initial_value a, heads_range r) from a stage's `Relpos.decay` buffer log(1 - 2^(-a - r h/H))
  (r is None for one head, which does not show it); checked against the formula."""
  from vitjax.ops import manhattan  # pylint: disable=g-import-not-at-top
  decay = np.asarray(decay, np.float64)
  x = -np.log2(1.0 - np.exp(decay))                                     # a + r h / H
  a = round(float(x[0]), 4)
  r = round(float((x[1] - x[0]) * len(x)), 4) if len(x) > 1 else None
  expected = manhattan.decay_rates(len(x), a, 0.0 if r is None else r)
  if not np.allclose(expected, decay, atol=1e-5, rtol=1e-5):
    raise ValueError(f"layers.{stage}.Relpos.decay = {decay.tolist()} is not RMT's "
                     "log(1 - 2^(-a - r h / H)) for any initial value a and heads range r")
  return a, r


def _rmt_overrides(state) -> Overrides:
  """Depths, widths, heads and decay settings (from the `Relpos.decay` buffers), MLP ratios,
  layer scale per stage, projection width, classes and the token-labelling aux head. Which stages
  use the decomposed form is not in the weights: it keeps the variant's unless given."""
  found: Overrides = {}
  depths = stage_depths(state, _RMT_BLOCK)
  if depths is None:
    return found
  found["depths"] = depths
  dims, heads, inits, ranges, ratios, scales = [], [], [], [], [], []
  for i, depth in enumerate(depths):
    block = f"layers.{i}.blocks.0."
    if not depth or block + "ffn.fc1.weight" not in state or block + "retention.q_proj.weight" \
        not in state or f"layers.{i}.Relpos.decay" not in state:
      return found                                      # the strict conversion lists what is missing
    dims.append(state_shape(state, block + "retention.q_proj.weight")[0])
    ratios.append(state_shape(state, block + "ffn.fc1.weight")[0] / dims[-1])
    decay = np.asarray(state[f"layers.{i}.Relpos.decay"])
    heads.append(len(decay))
    a, r = _rmt_decay_settings(decay, i)
    inits.append(a)
    ranges.append(r)
    scales.append(block + "gamma_1" in state)
  found.update(dims=tuple(dims), num_heads=tuple(heads), init_values=tuple(inits),
               mlp_ratios=tuple(int(r) if r == int(r) else r for r in ratios),
               layer_scales=tuple(scales))
  if None not in ranges:
    found["heads_ranges"] = tuple(ranges)
  if "proj.weight" in state:
    found["projection"] = state_shape(state, "proj.weight")[0]
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  found["token_label"] = "aux_head.weight" in state
  return found


FAMILY = Family(
    name="rmt",
    repository="qhfan/RMT",
    marker=r"layers\.\d+\.blocks\.\d+\.retention\.",
    models={"rmt_t": ("RMT_T3",), "rmt_s": ("RMT_S",), "rmt_b": ("RMT_M2",),
            "rmt_l": ("RMT_L6",)},
    rules=_rmt_rules(),
    overrides=_rmt_overrides,
    always=("num_classes", "token_label"),
    ignore=(r".*\.num_batches_tracked", r"layers\.\d+\.Relpos\.(angle|decay)"))
