"""`from_official`'s table for SOFT (fudan-zvg/SOFT): its key names -> vitjax."""
from __future__ import annotations

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import (Family, Overrides, bn_rules, count_blocks,
                                            dense_rules, depthwise, state_shape)

# SOFT (fudan-zvg/SOFT, models/softmax_free_vision_transformer.py, softmax_free_transformer.py).
# vitjax: stem/{conv,bn}_{0,1,2} (official patch_embed1.proj.{0,1,3,4,6,7}),
# stages_{i}/downsample/{conv,bn} (patch_embed{i+1}), stages_{i}/blocks_{j}/... (block{i+1}.{j}),
# the stage's position table pos_embed{i+1} in its first block, cls_token in the last stage.
# SOFT blocks (block{s}.{j}.att.*): W_q/W_v/ff -> attn/{query,value,out}, Qlandmark_op ->
# attn/landmark, Qnorm_act.0 -> attn/landmark_norm, conv -> attn/dwconv, ff1/ff2 -> mlp.
# Last-stage ViT blocks (block{K}.{j}.*): attn.q and the fused attn.kv -> the 'mhsa' heads.

_STAGES = 4          # the official class always builds four stages (patch_embed1..4, block1..4)
_BLOCK = r"block(\d+)\.(\d+)\."


def _soft_rules() -> tuple[Rule, ...]:
  p = "params/"
  rules = [rule(r"norm\.weight", p + "norm/scale"), rule(r"norm\.bias", p + "norm/bias")]
  rules += dense_rules(r"head", "head")
  for i, index in enumerate((0, 3, 6)):                 # conv, BN, ReLU, ...
    rules += dense_rules(rf"patch_embed1\.proj\.{index}", f"stem/conv_{i}", conv)
    rules += bn_rules(rf"patch_embed1\.proj\.{index + 1}", f"stem/bn_{i}")
  for s in range(1, _STAGES + 1):
    stage = f"stages_{s - 1}/"
    if s > 1:
      rules += dense_rules(rf"patch_embed{s}\.proj\.0", stage + "downsample/conv", conv)
      rules += bn_rules(rf"patch_embed{s}\.proj\.1", stage + "downsample/bn")
    rules += [rule(rf"pos_embed{s}", p + stage + "blocks_0/pos_embed")]
    out = stage + "blocks_{0}/"
    attn = out + "attn/"
    soft = rf"block{s}\.(\d+)\.att\."
    rules += dense_rules(soft + r"mha\.W_q", attn + "query")
    rules += dense_rules(soft + r"mha\.W_v", attn + "value")
    rules += dense_rules(soft + r"mha\.ff", attn + "out")
    rules += [
        rule(soft + r"mha\.attn\.Qlandmark_op\.weight", p + attn + "landmark/kernel",
             transform=conv),
        rule(soft + r"mha\.attn\.Qnorm_act\.0\.weight", p + attn + "landmark_norm/scale"),
        rule(soft + r"mha\.attn\.Qnorm_act\.0\.bias", p + attn + "landmark_norm/bias"),
        rule(soft + r"mha\.attn\.conv\.weight", p + attn + "dwconv", transform=depthwise),
    ]
    for norm in ("norm1", "norm2"):
      rules += [rule(soft + norm + r"\.weight", p + out + norm + "/scale"),
                rule(soft + norm + r"\.bias", p + out + norm + "/bias")]
    rules += dense_rules(soft + r"ff1", out + "mlp/Dense_0")
    rules += dense_rules(soft + r"ff2", out + "mlp/Dense_1")
    vit = rf"block{s}\.(\d+)\."
    mhsa = p + out + "MultiHeadDotProductAttention_0/"
    rules += [
        rule(vit + r"attn\.q\.weight", mhsa + "query/kernel", transform=linear),
        rule(vit + r"attn\.q\.bias", mhsa + "query/bias"),
        rule(vit + r"attn\.kv\.weight", mhsa + "key/kernel", mhsa + "value/kernel",
             transform=mapping.split(2, linear)),
        rule(vit + r"attn\.kv\.bias", mhsa + "key/bias", mhsa + "value/bias",
             transform=mapping.split(2, mapping.copy)),
        rule(vit + r"attn\.proj\.weight", mhsa + "out/kernel", transform=linear),
        rule(vit + r"attn\.proj\.bias", mhsa + "out/bias"),
    ]
    for norm in ("norm1", "norm2"):
      rules += [rule(vit + norm + r"\.weight", p + out + norm + "/scale"),
                rule(vit + norm + r"\.bias", p + out + norm + "/bias")]
    rules += dense_rules(vit + r"mlp\.fc1", out + "mlp/Dense_0")
    rules += dense_rules(vit + r"mlp\.fc2", out + "mlp/Dense_1")
  rules += [rule(r"cls_token", p + f"stages_{_STAGES - 1}/cls_token")]
  return tuple(rules)


def _soft_overrides(state) -> Overrides:
  """Widths, depths, heads, landmark strides, conv sizes, MLP ratio, stem width, the position
  tables' image size and classes, read off the weights. The last stage's heads do not show in
  its weights: they are taken at the SOFT stages' head width (32 in every official model); pass
  num_heads for another split."""
  found: Overrides = {}
  per_stage = count_blocks(state, _BLOCK)
  if not per_stage:
    return found
  k = max(s for s, in per_stage)
  found["depths"] = tuple(per_stage.get((s,), 0) for s in range(1, k + 1))
  dims = []
  for s in range(1, k + 1):
    key = "patch_embed1.proj.6.weight" if s == 1 else f"patch_embed{s}.proj.0.weight"
    if key not in state:
      return found                                 # the strict conversion lists what is missing
    dims.append(state_shape(state, key)[0])
  found["embed_dims"] = tuple(dims)
  heads, ratios, sizes = [], [], []
  for s in range(1, k):
    attn = f"block{s}.0.att.mha.attn."
    if attn + "Qlandmark_op.weight" not in state:
      return found
    head_dim, _, sr, _ = state_shape(state, attn + "Qlandmark_op.weight")
    heads.append(dims[s - 1] // head_dim)
    ratios.append(sr)
    sizes.append(state_shape(state, attn + "conv.weight")[-1] if attn + "conv.weight" in state
                 else 0)
  heads.append(max(dims[-1] // head_dim, 1))
  found.update(num_heads=tuple(heads), sr_ratios=tuple(ratios), conv_sizes=tuple(sizes))
  fc1 = f"block{k}.0.mlp.fc1.weight"
  if fc1 in state:
    ratio = state_shape(state, fc1)[0] / dims[-1]
    found["mlp_ratio"] = int(ratio) if ratio == int(ratio) else ratio
  if "patch_embed1.proj.0.weight" in state:
    found["stem_channels"] = state_shape(state, "patch_embed1.proj.0.weight")[0]
  if "pos_embed1" in state:
    found["pos_size"] = 4 * round(state_shape(state, "pos_embed1")[1] ** 0.5)
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


FAMILY = Family(
    name="soft",
    repository="fudan-zvg/SOFT",
    marker=r"block\d+\.\d+\.att\.mha\.",
    models={"soft_tiny": ("soft_tiny",), "soft_small": ("soft_small",),
            "soft_medium": ("soft_medium",), "soft_large": ("soft_large",),
            "soft_huge": ("soft_huge",)},
    rules=_soft_rules(),
    overrides=_soft_overrides,
    ignore=(r".*\.num_batches_tracked",))
