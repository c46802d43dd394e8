"""`from_official`'s table for DTN (wqshao126/DTN, models/vit_norm_mix.py with the `DTN` of
models/normkit/norms/dtn.py): its key names -> vitjax's `vit_ti16_star_dtn` layout.

vitjax: embedding (patch conv), Transformer/{posembed_input, cls_token, encoderblock_{k}},
encoder_norm, head. A block's norm1 / norm2 are LayerNorm_0 / LayerNorm_1 (a DTN layer's
weight, bias, mean_norm_weight, var_norm_weight, pos_proj -> scale, bias, lambda_mean,
lambda_var, pos_proj); the fused qkv Linear (no bias in ViT*) splits into query / key / value.
The official DTN builds its relative-position table lazily as a plain attribute, so state dicts
hold no buffer to skip.
"""
from __future__ import annotations

import re

import numpy as np

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import Family, Overrides, dense_rules, state_shape

_BLOCK = r"blocks\.(\d+)\."
_DTN_KEY = r"blocks\.(\d+)\.norm1\.var_norm_weight"


def _dtn_rules() -> tuple[Rule, ...]:
  p = "params/"
  out = p + "Transformer/encoderblock_{0}/"
  attn = out + "MultiHeadDotProductAttention_0/"
  rules = [
      rule(r"patch_embed\.proj\.weight", p + "embedding/kernel", transform=conv),
      rule(r"patch_embed\.proj\.bias", p + "embedding/bias"),
      rule(r"cls_token", p + "Transformer/cls_token"),
      rule(r"pos_embed", p + "Transformer/posembed_input/pos_embedding"),
      rule(r"norm\.weight", p + "encoder_norm/scale"),
      rule(r"norm\.bias", p + "encoder_norm/bias"),
      *dense_rules(r"head", "head"),
      rule(_BLOCK + r"attn\.qkv\.weight", attn + "query/kernel", attn + "key/kernel",
           attn + "value/kernel", transform=mapping.split(3, linear)),
      rule(_BLOCK + r"attn\.qkv\.bias", attn + "query/bias", attn + "key/bias",
           attn + "value/bias", transform=mapping.split(3, mapping.copy)),
      *dense_rules(_BLOCK + r"attn\.proj", "Transformer/encoderblock_{0}/"
                   "MultiHeadDotProductAttention_0/out"),
      *dense_rules(_BLOCK + r"mlp\.fc1", "Transformer/encoderblock_{0}/MlpBlock_0/Dense_0"),
      *dense_rules(_BLOCK + r"mlp\.fc2", "Transformer/encoderblock_{0}/MlpBlock_0/Dense_1"),
  ]
  for official, ours in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
    norm = out + ours + "/"
    rules += [
        rule(_BLOCK + official + r"\.weight", norm + "scale"),
        rule(_BLOCK + official + r"\.bias", norm + "bias"),
        rule(_BLOCK + official + r"\.mean_norm_weight", norm + "lambda_mean"),
        rule(_BLOCK + official + r"\.var_norm_weight", norm + "lambda_var"),
        rule(_BLOCK + official + r"\.pos_proj\.weight", norm + "pos_proj/kernel",
             transform=linear),
        rule(_BLOCK + official + r"\.pos_proj\.bias", norm + "pos_proj/bias"),
    ]
  return tuple(rules)


def _dtn_overrides(state) -> Overrides:
  """Width, patch size, depth, MLP width, heads (DTN's groups are the block's heads), the blocks
  after the class token joins (those without DTN), DTN's `only_var`, qkv bias and classes, read
  off the weights."""
  found: Overrides = {}
  if "patch_embed.proj.weight" in state:
    width, _, patch, _ = state_shape(state, "patch_embed.proj.weight")
    found.update(width=width, patch_size=patch)
  blocks = {int(m.group(1)) for k in state if (m := re.match(_BLOCK, k))}
  if blocks:
    found["depth"] = max(blocks) + 1
  if "blocks.0.mlp.fc1.weight" in state:
    found["mlp_dim"] = state_shape(state, "blocks.0.mlp.fc1.weight")[0]
  dtn_blocks = {int(m.group(1)) for k in state if (m := re.fullmatch(_DTN_KEY, k))}
  if dtn_blocks:
    if "depth" in found:     # the official local_up_to_layer is the number of DTN blocks
      found["cls_blocks"] = found["depth"] - (max(dtn_blocks) + 1)
    first = min(dtn_blocks)
    if f"blocks.{first}.norm1.pos_proj.weight" in state:
      found["num_heads"] = state_shape(state, f"blocks.{first}.norm1.pos_proj.weight")[0]
    if f"blocks.{first}.norm1.mean_norm_weight" not in state:
      found["norm_kwargs"] = {"only_var": True}
  found["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


def _dtn_image_size(state, model) -> int:
  """The side of the square patch grid of `pos_embed` (patch tokens only) times the patch."""
  if "pos_embed" not in state:
    return 224
  side = int(round(state_shape(state, "pos_embed")[1] ** 0.5))
  return side * model.patch_size


FAMILY = Family(
    name="dtn",
    repository="wqshao126/DTN",
    marker=r"blocks\.\d+\.norm[12]\.var_norm_weight",
    models={"vit_ti16_star_dtn": ("vit_norm_ti_star",)},
    rules=_dtn_rules(),
    overrides=_dtn_overrides,
    image_size=_dtn_image_size)


_LAYER_KEYS = {"weight": "scale", "bias": "bias", "mean_norm_weight": "lambda_mean",
               "var_norm_weight": "lambda_var"}


def layer_from_official(state, *, pool_size: int = 14, eps: float = 1e-5):
  """One official `DTN` layer's state dict (weight, bias, mean_norm_weight, var_norm_weight,
  pos_proj.weight / .bias) -> (`DynamicTokenNorm`, its variables); strict about the keys.
  Apply it as `layer.apply(variables, x, tokens=Tokens(x, grid=(h, w)))`."""
  from vitjax.models.dtn import DynamicTokenNorm  # pylint: disable=g-import-not-at-top
  allowed = {*_LAYER_KEYS, "pos_proj.weight", "pos_proj.bias"}
  unknown = sorted(set(state) - allowed)
  missing = sorted(allowed - set(state) - {"mean_norm_weight"})
  if unknown or missing:
    raise ValueError(f"Not an official DTN layer state dict: unknown keys {unknown}, missing "
                     f"keys {missing}; allowed keys: {sorted(allowed)}")
  params = {ours: mapping.to_numpy(state[k]) for k, ours in _LAYER_KEYS.items() if k in state}
  kernel = np.ascontiguousarray(mapping.to_numpy(state["pos_proj.weight"]).T)     # (3, H)
  params["pos_proj"] = {"kernel": kernel, "bias": mapping.to_numpy(state["pos_proj.bias"])}
  layer = DynamicTokenNorm(num_heads=params["lambda_var"].shape[0], eps=eps, pool_size=pool_size,
                           only_var="lambda_mean" not in params)
  return layer, {"params": params}
