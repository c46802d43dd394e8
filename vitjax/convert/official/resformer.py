"""`from_official`'s table for ResFormer (ruitian12/resformer, image_classification/models.py).

The official `ResFormer` is timm's ViT layout (cls_token, patch_embed.proj, blocks.{i}.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head), so the table is the timm ViT table
(`vitjax.convert.timm.VIT_RULES`) without the learned position table, plus the two position
convolutions:
  pos_embed.embed_layer (D, 1, 3, 3)   -> Transformer/posembed_input/{kernel (3, 3, 1, D), bias}
  blocks.{i}.attn.get_v (d, 1, 3, 3)   -> .../MultiHeadDotProductAttention_0/local_pe/{kernel
                                          (3, 3, 1, d), bias}, d the head width
The head width d shows in get_v, so num_heads = D / d is read off the weights like every other
size.
"""
from __future__ import annotations

from vitjax.convert import timm
from vitjax.convert.mapping import Rule, rule
from vitjax.convert.official.family import Family, Overrides, depthwise, state_shape

_BLOCK = r"blocks\.(\d+)\."
_ATTN = "params/Transformer/encoderblock_{0}/MultiHeadDotProductAttention_0/"


def _resformer_rules() -> tuple[Rule, ...]:
  vit = tuple(Rule(r.pattern, tuple("params/" + t for t in r.targets), r.transform)
              for r in timm.VIT_RULES if r.pattern != "pos_embed")
  return vit + (
      rule(r"pos_embed\.embed_layer\.weight", "params/Transformer/posembed_input/kernel",
           transform=depthwise),
      rule(r"pos_embed\.embed_layer\.bias", "params/Transformer/posembed_input/bias"),
      rule(_BLOCK + r"attn\.get_v\.weight", _ATTN + "local_pe/kernel", transform=depthwise),
      rule(_BLOCK + r"attn\.get_v\.bias", _ATTN + "local_pe/bias"),
  )


def _resformer_overrides(state) -> Overrides:
  """width, patch size, depth, heads, MLP width and classes, read off the weights."""
  found: Overrides = {}
  if "patch_embed.proj.weight" in state:
    width, _, patch, _ = state_shape(state, "patch_embed.proj.weight")
    found.update(width=width, patch_size=patch)
  blocks = [int(k.split(".")[1]) for k in state if k.startswith("blocks.")]
  if blocks:
    found["depth"] = max(blocks) + 1
  if "blocks.0.attn.get_v.weight" in state and "width" in found:
    head_dim = state_shape(state, "blocks.0.attn.get_v.weight")[0]
    if head_dim and found["width"] % head_dim == 0:
      found["num_heads"] = found["width"] // head_dim
  if "blocks.0.mlp.fc1.weight" in state:
    found["mlp_dim"] = state_shape(state, "blocks.0.mlp.fc1.weight")[0]
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


FAMILY = Family(
    name="resformer",
    repository="ruitian12/resformer",
    marker=r"pos_embed\.embed_layer\.",
    models={"resformer_tiny_patch16": ("resformer_tiny_patch16",),
            "resformer_small_patch16": ("resformer_small_patch16",),
            "resformer_base_patch16": ("resformer_base_patch16",)},
    rules=_resformer_rules(),
    overrides=_resformer_overrides)
