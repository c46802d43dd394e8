"""`from_official`'s table for CvT (microsoft/CvT): its key names -> vitjax."""
from __future__ import annotations

import re

from vitjax.convert.mapping import Rule, conv, rule
from vitjax.convert.official.family import (Family, Overrides, bn_rules, count_blocks,
                                            dense_rules, depthwise, state_shape)


# CvT (microsoft/CvT, lib/models/cls_cvt.py). Stage 0's convolutional embedding is vitjax's
# `stem`, stage i > 0's is `stages_i/downsample`.

_CVT_STAGE = r"stage(\d+)\."
_CVT_BLOCK = _CVT_STAGE + r"blocks\.(\d+)\."
_CVT = "stages_{0}/blocks_{1}/"


def _cvt_rules() -> tuple[Rule, ...]:
  rules = []
  for stage, target in ((r"stage0\.", "stem"), (_CVT_STAGE, "stages_{0}/downsample")):
    rules += dense_rules(stage + r"patch_embed\.proj", target + "/conv", conv)
    rules += [rule(stage + r"patch_embed\.norm\.weight", "params/" + target + "/norm/scale"),
              rule(stage + r"patch_embed\.norm\.bias", "params/" + target + "/norm/bias")]
  rules.append(rule(_CVT_STAGE + r"cls_token", "params/stages_{0}/cls_token"))
  b = _CVT_BLOCK
  for x in "qkv":
    rules.append(rule(b + rf"attn\.conv_proj_{x}\.conv\.weight",
                      "params/" + _CVT + f"attn/conv_proj_{x}/conv/kernel", transform=depthwise))
    rules += bn_rules(b + rf"attn\.conv_proj_{x}\.bn", _CVT + f"attn/conv_proj_{x}/bn")
    rules += dense_rules(b + rf"attn\.proj_{x}", _CVT + f"attn/proj_{x}")
  rules += dense_rules(b + r"attn\.proj", _CVT + "attn/proj")
  rules += dense_rules(b + r"mlp\.fc1", _CVT + "mlp/Dense_0")
  rules += dense_rules(b + r"mlp\.fc2", _CVT + "mlp/Dense_1")
  for norm in ("norm1", "norm2"):
    rules += [rule(b + norm + r"\.weight", "params/" + _CVT + norm + "/scale"),
              rule(b + norm + r"\.bias", "params/" + _CVT + norm + "/bias")]
  rules += [rule(r"norm\.weight", "params/norm/scale"), rule(r"norm\.bias", "params/norm/bias")]
  rules += dense_rules(r"head", "head")
  return tuple(rules)


def _cvt_overrides(state) -> Overrides:
  """Depths, widths, embedding kernels, classes, MLP ratio, qkv bias, projection kernel and the
  class token, read off the weights. num_heads, strides and paddings are not in the weights: they
  keep the variant's values unless given. The activation is the official QuickGELU."""
  stages = sorted({int(m.group(1)) for k in state if (m := re.match(_CVT_STAGE, k))})
  embed = "stage{}.patch_embed.proj.weight"
  if not stages or any(embed.format(i) not in state for i in stages):
    return {}
  found: Overrides = {"act": "quick_gelu"}
  depths = count_blocks(state, _CVT_BLOCK)
  found["depths"] = tuple(depths.get((i,), 0) for i in stages)
  found["dims"] = tuple(state_shape(state, embed.format(i))[0] for i in stages)
  found["patch_sizes"] = tuple(state_shape(state, embed.format(i))[-1] for i in stages)
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  found["cls_token"] = f"stage{stages[-1]}.cls_token" in state
  first = next((i for i, d in zip(stages, found["depths"]) if d), None)
  if first is not None:
    block = f"stage{first}.blocks.0."
    if block + "mlp.fc1.weight" in state:
      ratio = state_shape(state, block + "mlp.fc1.weight")[0] / found["dims"][stages.index(first)]
      found["mlp_ratio"] = ratio
    found["qkv_bias"] = block + "attn.proj_q.bias" in state
    if block + "attn.conv_proj_q.conv.weight" in state:
      found["kernel_size"] = state_shape(state, block + "attn.conv_proj_q.conv.weight")[-1]
  return found


FAMILY = Family(
    name="cvt",
    repository="microsoft/CvT",
    marker=r"stage\d+\.patch_embed\.",
    models={"cvt_13": ("cvt-13-224x224",), "cvt_21": ("cvt-21-224x224",),
            "cvt_w24": ("cvt-w24-384x384",)},
    rules=_cvt_rules(),
    overrides=_cvt_overrides,
    always=("num_classes", "act"),
    ignore=(r".*\.num_batches_tracked",))
