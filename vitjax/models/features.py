"""Features (DESIGN.md, decision 11): what every registered model exposes besides its logits.

  FeatureInfo          - one feature map's key, channels and stride;
  spaced_blocks        - the default feature taps of an isotropic model;
  check_feature_blocks - validates a model's `feature_blocks`;
  Classifier           - the contract every registered model keeps (`features=True`,
                         `num_classes=0`, `feature_info()`).

Re-exported by `vitjax.models.backbone`.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn



class FeatureInfo(NamedTuple):
  """One feature map of `apply(..., features=True)`: its key in `out`, channels and stride
  relative to the input image."""
  name: str
  channels: int
  stride: int


def spaced_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
  """`count` block indices spread evenly over `depth` blocks, ending at the last one: the default
  feature taps of an isotropic model (ViT-B: blocks 2, 5, 8, 11)."""
  count = min(count, depth)
  return tuple(round((n + 1) * depth / count) - 1 for n in range(count))


def check_feature_blocks(blocks, depth: int) -> tuple[int, ...]:
  blocks = spaced_blocks(depth) if blocks is None else tuple(int(b) for b in blocks)
  bad = [b for b in blocks if not 0 <= b < depth]
  if bad or not blocks:
    raise ValueError(f"feature_blocks={blocks!r}: allowed values are block indices 0..{depth - 1}")
  return blocks


class Classifier(nn.Module):
  """What every registered model keeps (DESIGN.md, decision 11).

    logits = model.apply(variables, images, train=False)
    logits, out = model.apply(variables, images, train=False, features=True)

  `out` holds 'stem', 'stage1' ... 'stageK' ((B, h, w, C) maps; for an isotropic model, the patch
  tokens after each of its `feature_blocks` as a grid) and 'pre_logits' (B, D). With
  `num_classes=0` the model has no head and returns pre_logits in place of logits.
  `feature_info()` gives each map's channels and stride (`vitjax.feature_info(name)`).
  """
  num_classes: int = 1000

  def feature_info(self) -> list[FeatureInfo]:
    raise NotImplementedError(f"{type(self).__name__} does not list its features")

  def classify(self, pre_logits, out: dict, features: bool, *, kernel_init=None):
    """The 'head' Dense on pre_logits (none when num_classes == 0); the return value of apply."""
    out["pre_logits"] = pre_logits
    logits = pre_logits
    if self.num_classes:
      init = kernel_init or nn.initializers.zeros
      logits = nn.Dense(self.num_classes, kernel_init=init, name="head")(pre_logits)
    return (logits, out) if features else logits
