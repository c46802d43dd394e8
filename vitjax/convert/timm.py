"""timm (PyTorch Image Models) state dicts -> vitjax variables.

    import torch, vitjax.convert
    state = torch.load("vit_base_patch16_224.pth", map_location="cpu", weights_only=True)
    model, variables, meta = vitjax.convert.from_timm(state, "vit_base_patch16_224")
    logits = model.apply(variables, images_nhwc)      # same logits as timm on images_nchw

Every supported timm architecture is one `Family` entry in `FAMILIES`: the timm model names it
covers and the vitjax model each becomes, a table of renaming `Rule`s (see `mapping.py`), and two
functions that read the create_model overrides (classes, depth) and an input size that fits off
the state dict. The families are ViT (`vit_*_patch*_224`), ConvNeXt (`convnext_atto` ...
`convnext_large`), Swin (`swin_{tiny,small,base}_patch4_window7_224`) and CrossViT
(`crossvit_{tiny,small,base,9,15,18}_240`, `crossvit_{9,15,18}_dagger_240`, the dagger _408s);
adding one is adding one entry, nothing else changes. Conversion is strict: keys that
fit no rule, missing parameters and shape mismatches are reported together in one ValueError.

Layout differences the rules undo:
  * torch Linear stores (out, in); Flax Dense stores (in, out). The attention projections are
    Flax DenseGenerals with a head axis: query/key/value kernels (D, H, d), out kernel (H, d, D).
  * timm fuses q, k, v into one (3D, D) `qkv` Linear whose rows are ordered (q|k|v, head, d).
  * torch Conv2d stores (O, I, kh, kw); Flax Conv stores (kh, kw, I, O). Images are NCHW in timm
    and NHWC in vitjax.
  * timm's ViT position table already includes the CLS slot, like vit_jax's (1, 1 + N, D).
  * timm's small ConvNeXts (atto ... nano, `conv_mlp=True`) hold their MLP as 1x1 convolutions,
    (out, in, 1, 1); on an NHWC map that is a Linear layer, so they load into the same Dense
    kernels as the Linear form of convnext_tiny and up.
  * Swin: timm >= 0.9 downsamples at the start of stages 2-4 (`layers.{i}.downsample`), which is
    vitjax's StageSpec layout; older checkpoints (Microsoft's, downsampling at the end of a stage)
    go through timm's `checkpoint_filter_fn` first. The relative position tables load as they are;
    the window and the heads per stage are read off them, the index buffers are skipped.
  * CrossViT: each branch's position table (1, 1 + N_i, C_i) fixes its grid, so img_scale (and
    the 408 px fine-tunes) are read off them; the official checkpoints' `pos_embed.i` /
    `cls_token.i` load like timm's `pos_embed_i` / `cls_token_i`. The dagger patch embedding's
    Sequential convs `proj.{0,2,4}` become `proj_{0,1,2}`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from vitjax.convert import mapping
from vitjax.convert import timm_crossvit
from vitjax.convert.mapping import Converted, Rule, conv, linear, rule, split
from vitjax.data import pretrained
from vitjax.models.registry import create_model

Overrides = dict[str, Any]
ImageShape = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Family:
  """One timm architecture family and how its state dicts map onto a vitjax model."""
  name: str
  models: Mapping[str, str]              # timm model name -> registered vitjax model name
  rules: Sequence[Rule]
  # state dict -> create_model overrides read off the weights (classes, depth, ...)
  overrides: Callable[[Mapping[str, Any]], Overrides]
  # (state dict, vitjax model) -> shape of an example input the weights fit, (1, H, W, C)
  example_input: Callable[[Mapping[str, Any], Any], ImageShape]
  ignore: Sequence[str] = ()             # source keys that are buffers, not parameters


def _shape(state: Mapping[str, Any], key: str, family: str) -> tuple[int, ...]:
  return mapping.state_shape(state, key, f"timm {family}")


def _vit_overrides(state: Mapping[str, Any]) -> Overrides:
  """num_classes and depth, read off the head and the block keys.

  A state dict without a head keeps the model's default head, which the strict conversion then
  reports as missing (with everything else that does not fit).
  """
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
  found = {"depth": max(blocks) + 1 if blocks else 0}
  if "head.weight" in state:
    found["num_classes"] = tuple(state["head.weight"].shape)[0]
  return found


def _vit_example_input(state: Mapping[str, Any], model) -> ImageShape:
  """(1, H, W, C) whose patch grid matches the position table (patch size from the model)."""
  channels = _shape(state, "patch_embed.proj.weight", "ViT")[1]
  num_tokens = _shape(state, "pos_embed", "ViT")[1] - (1 if "cls_token" in state else 0)
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens:
    raise ValueError(f"timm ViT pos_embed holds {num_tokens} patch positions, not a square grid; "
                     "only square inputs are supported")
  size = grid * model.patch_size
  return (1, size, size, channels)


_BLOCK = r"blocks\.(\d+)\."
_VIT_BLOCK = "Transformer/encoderblock_{0}/"
_ATTN = _VIT_BLOCK + "MultiHeadDotProductAttention_0/"

VIT_RULES = (
    rule(r"cls_token", "cls"),
    rule(r"pos_embed", "Transformer/posembed_input/pos_embedding"),
    rule(r"patch_embed\.proj\.weight", "embedding/kernel", transform=conv),
    rule(r"patch_embed\.proj\.bias", "embedding/bias"),
    rule(_BLOCK + r"norm1\.weight", _VIT_BLOCK + "LayerNorm_0/scale"),
    rule(_BLOCK + r"norm1\.bias", _VIT_BLOCK + "LayerNorm_0/bias"),
    rule(_BLOCK + r"attn\.qkv\.weight", _ATTN + "query/kernel", _ATTN + "key/kernel",
         _ATTN + "value/kernel", transform=split(3, linear)),
    rule(_BLOCK + r"attn\.qkv\.bias", _ATTN + "query/bias", _ATTN + "key/bias",
         _ATTN + "value/bias", transform=split(3, mapping.copy)),
    rule(_BLOCK + r"attn\.proj\.weight", _ATTN + "out/kernel", transform=linear),
    rule(_BLOCK + r"attn\.proj\.bias", _ATTN + "out/bias"),
    rule(_BLOCK + r"norm2\.weight", _VIT_BLOCK + "LayerNorm_1/scale"),
    rule(_BLOCK + r"norm2\.bias", _VIT_BLOCK + "LayerNorm_1/bias"),
    rule(_BLOCK + r"mlp\.fc1\.weight", _VIT_BLOCK + "MlpBlock_0/Dense_0/kernel", transform=linear),
    rule(_BLOCK + r"mlp\.fc1\.bias", _VIT_BLOCK + "MlpBlock_0/Dense_0/bias"),
    rule(_BLOCK + r"mlp\.fc2\.weight", _VIT_BLOCK + "MlpBlock_0/Dense_1/kernel", transform=linear),
    rule(_BLOCK + r"mlp\.fc2\.bias", _VIT_BLOCK + "MlpBlock_0/Dense_1/bias"),
    rule(r"norm\.weight", "Transformer/encoder_norm/scale"),
    rule(r"norm\.bias", "Transformer/encoder_norm/bias"),
    rule(r"head\.weight", "head/kernel", transform=linear),
    rule(r"head\.bias", "head/bias"),
)

_CNX_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\."
_CNX = "stages_{0}/blocks_{1}/"
_CNX_DOWN = r"stages\.(\d+)\.downsample\."


def pointwise(x, shapes):
  """torch Linear (out, in) or 1x1 Conv2d (out, in, 1, 1) weight -> Flax Dense kernel (in, out)."""
  if x.ndim == 4 and x.shape[2:] == (1, 1):
    x = x[:, :, 0, 0]
  return linear(x, shapes)


def _convnext_overrides(state: Mapping[str, Any]) -> Overrides:
  """num_classes and depths, read off the head and the block keys.

  A state dict with `head.norm` but no `head.fc` (timm's num_classes=0) becomes a headless model.
  """
  depths: dict[int, int] = {}
  for k in state:
    if m := re.match(_CNX_BLOCK, k):
      i, j = int(m.group(1)), int(m.group(2))
      depths[i] = max(depths.get(i, 0), j + 1)
  found: Overrides = {}
  if depths:   # a stage without blocks gets depth 0, which the model rejects by name
    found["depths"] = tuple(depths.get(i, 0) for i in range(max(depths) + 1))
  if "head.fc.weight" in state:
    found["num_classes"] = tuple(state["head.fc.weight"].shape)[0]
  elif "head.norm.weight" in state:
    found["num_classes"] = 0
  return found


def _convnext_example_input(state: Mapping[str, Any], model) -> ImageShape:
  """(1, s, s, C) with s the model's total stride (ConvNeXt takes any multiple of it)."""
  channels = tuple(state["stem.0.weight"].shape)[1] if "stem.0.weight" in state else 3
  size = max(f.stride for f in model.feature_info())
  return (1, size, size, channels)


CONVNEXT_RULES = (
    rule(r"stem\.0\.weight", "stem_conv/kernel", transform=conv),
    rule(r"stem\.0\.bias", "stem_conv/bias"),
    rule(r"stem\.1\.weight", "stem_norm/scale"),
    rule(r"stem\.1\.bias", "stem_norm/bias"),
    rule(_CNX_DOWN + r"0\.weight", "stages_{0}/downsample/norm/scale"),
    rule(_CNX_DOWN + r"0\.bias", "stages_{0}/downsample/norm/bias"),
    rule(_CNX_DOWN + r"1\.weight", "stages_{0}/downsample/conv/kernel", transform=conv),
    rule(_CNX_DOWN + r"1\.bias", "stages_{0}/downsample/conv/bias"),
    rule(_CNX_BLOCK + r"gamma", _CNX + "gamma"),
    rule(_CNX_BLOCK + r"conv_dw\.weight", _CNX + "conv_dw/kernel", transform=conv),
    rule(_CNX_BLOCK + r"conv_dw\.bias", _CNX + "conv_dw/bias"),
    rule(_CNX_BLOCK + r"norm\.weight", _CNX + "norm/scale"),
    rule(_CNX_BLOCK + r"norm\.bias", _CNX + "norm/bias"),
    rule(_CNX_BLOCK + r"mlp\.fc1\.weight", _CNX + "mlp/Dense_0/kernel", transform=pointwise),
    rule(_CNX_BLOCK + r"mlp\.fc1\.bias", _CNX + "mlp/Dense_0/bias"),
    rule(_CNX_BLOCK + r"mlp\.fc2\.weight", _CNX + "mlp/Dense_1/kernel", transform=pointwise),
    rule(_CNX_BLOCK + r"mlp\.fc2\.bias", _CNX + "mlp/Dense_1/bias"),
    rule(r"head\.norm\.weight", "head_norm/scale"),
    rule(r"head\.norm\.bias", "head_norm/bias"),
    rule(r"head\.fc\.weight", "head/kernel", transform=linear),
    rule(r"head\.fc\.bias", "head/bias"),
)

_SW_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\."
_SW = "stages_{0}/blocks_{1}/"
_SW_ATTN = _SW + "attn/"
_SW_DOWN = r"layers\.(\d+)\.downsample\."


def _swin_overrides(state: Mapping[str, Any]) -> Overrides:
  """embed_dim, depths, heads per stage, window, patch size, MLP ratio and classes, read off
  the weights (heads from the relative position tables, one column per head)."""
  depths: dict[int, int] = {}
  for k in state:
    if m := re.match(_SW_BLOCK, k):
      i, j = int(m.group(1)), int(m.group(2))
      depths[i] = max(depths.get(i, 0), j + 1)
  found: Overrides = {}
  if "patch_embed.proj.weight" in state:
    embed_dim, _, patch, _ = _shape(state, "patch_embed.proj.weight", "Swin")
    found.update(embed_dim=embed_dim, patch_size=patch)
  if depths:
    n = max(depths) + 1
    found["depths"] = tuple(depths.get(i, 0) for i in range(n))
    tables = [f"layers.{i}.blocks.0.attn.relative_position_bias_table" for i in range(n)]
    if all(t in state for t in tables):
      found["num_heads"] = tuple(_shape(state, t, "Swin")[1] for t in tables)
      found["window"] = (math.isqrt(_shape(state, tables[0], "Swin")[0]) + 1) // 2
    if "layers.0.blocks.0.mlp.fc1.weight" in state and "embed_dim" in found:
      found["mlp_ratio"] = _shape(state, "layers.0.blocks.0.mlp.fc1.weight", "Swin")[0] / (
          found["embed_dim"])
  if "head.fc.weight" in state:
    found["num_classes"] = tuple(state["head.fc.weight"].shape)[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


def _swin_example_input(state: Mapping[str, Any], model) -> ImageShape:
  """(1, s, s, C): the size whose last stage is as large as its (clipped) window, 224 for the
  standard models; the relative position tables' sizes depend on it."""
  channels = _shape(state, "patch_embed.proj.weight", "Swin")[1]
  last = len(model.depths) - 1
  rows = _shape(state, f"layers.{last}.blocks.0.attn.relative_position_bias_table", "Swin")[0]
  grid = (math.isqrt(rows) + 1) // 2
  size = model.patch_size * grid * 2 ** last
  return (1, size, size, channels)


SWIN_RULES = (
    rule(r"patch_embed\.proj\.weight", "stem_conv/kernel", transform=conv),
    rule(r"patch_embed\.proj\.bias", "stem_conv/bias"),
    rule(r"patch_embed\.norm\.weight", "stem_norm/scale"),
    rule(r"patch_embed\.norm\.bias", "stem_norm/bias"),
    rule(_SW_DOWN + r"norm\.weight", "stages_{0}/downsample/norm/scale"),
    rule(_SW_DOWN + r"norm\.bias", "stages_{0}/downsample/norm/bias"),
    rule(_SW_DOWN + r"reduction\.weight", "stages_{0}/downsample/reduction/kernel",
         transform=linear),
    rule(_SW_BLOCK + r"(norm[12])\.weight", _SW + "{2}/scale"),
    rule(_SW_BLOCK + r"(norm[12])\.bias", _SW + "{2}/bias"),
    rule(_SW_BLOCK + r"attn\.qkv\.weight", _SW_ATTN + "query/kernel", _SW_ATTN + "key/kernel",
         _SW_ATTN + "value/kernel", transform=split(3, linear)),
    rule(_SW_BLOCK + r"attn\.qkv\.bias", _SW_ATTN + "query/bias", _SW_ATTN + "key/bias",
         _SW_ATTN + "value/bias", transform=split(3, mapping.copy)),
    rule(_SW_BLOCK + r"attn\.proj\.weight", _SW_ATTN + "out/kernel", transform=linear),
    rule(_SW_BLOCK + r"attn\.proj\.bias", _SW_ATTN + "out/bias"),
    rule(_SW_BLOCK + r"attn\.relative_position_bias_table",
         _SW_ATTN + "relative_position_bias_table"),
    rule(_SW_BLOCK + r"mlp\.fc1\.weight", _SW + "mlp/Dense_0/kernel", transform=linear),
    rule(_SW_BLOCK + r"mlp\.fc1\.bias", _SW + "mlp/Dense_0/bias"),
    rule(_SW_BLOCK + r"mlp\.fc2\.weight", _SW + "mlp/Dense_1/kernel", transform=linear),
    rule(_SW_BLOCK + r"mlp\.fc2\.bias", _SW + "mlp/Dense_1/bias"),
    rule(r"norm\.weight", "norm/scale"),
    rule(r"norm\.bias", "norm/bias"),
    rule(r"head\.fc\.weight", "head/kernel", transform=linear),
    rule(r"head\.fc\.bias", "head/bias"),
)

# The table of supported families.
FAMILIES: dict[str, Family] = {
    "vit": Family(
        name="vit",
        models={
            "vit_tiny_patch16_224": "vit_ti16",
            "vit_small_patch16_224": "vit_s16",
            "vit_base_patch16_224": "vit_b16",
            "vit_large_patch16_224": "vit_l16",
            "vit_base_patch32_224": "vit_b32",
        },
        rules=VIT_RULES,
        overrides=_vit_overrides,
        example_input=_vit_example_input),
    "convnext": Family(
        name="convnext",
        models={name: name for name in (
            "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
            "convnext_small", "convnext_base", "convnext_large")},
        rules=CONVNEXT_RULES,
        overrides=_convnext_overrides,
        example_input=_convnext_example_input),
    "swin": Family(
        name="swin",
        models={name: name for name in (
            "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
            "swin_base_patch4_window7_224")},
        rules=SWIN_RULES,
        overrides=_swin_overrides,
        example_input=_swin_example_input,
        ignore=(r".*relative_position_index", r".*attn_mask")),   # derived buffers
    "crossvit": Family(
        name="crossvit",
        models={**{name: name for name in (
            "crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240", "crossvit_9_240",
            "crossvit_15_240", "crossvit_18_240", "crossvit_9_dagger_240",
            "crossvit_15_dagger_240", "crossvit_18_dagger_240")},
            # 408 px fine-tunes: the same models, img_scale and size read off the tables.
            "crossvit_15_dagger_408": "crossvit_15_dagger_240",
            "crossvit_18_dagger_408": "crossvit_18_dagger_240"},
        rules=timm_crossvit.RULES,
        overrides=timm_crossvit.overrides,
        example_input=timm_crossvit.example_input),
}


def supported_models() -> list[str]:
  """timm model names `from_timm` accepts (a pretrained tag such as '.augreg_in21k' may follow)."""
  return sorted(n for f in FAMILIES.values() for n in f.models)


def resolve(model_name: str) -> tuple[Family, str, str]:
  """timm name (optionally '.tag'ged) or vitjax name -> (family, timm name, vitjax name)."""
  base = model_name.split(".", 1)[0]
  for family in FAMILIES.values():
    if base in family.models:
      return family, base, family.models[base]
    for timm_name, vitjax_name in family.models.items():
      if base == vitjax_name:
        return family, timm_name, vitjax_name
  raise ValueError(f"Unknown timm model_name={model_name!r}. Allowed values: "
                   f"{', '.join(supported_models())} (or their vitjax names).")


def from_timm(state_dict: Mapping[str, Any], model_name: str, **overrides) -> Converted:
  """Converts a timm state dict into a vitjax model and its variables (strict; see module doc).

  Args:
    state_dict: timm parameter name -> torch tensor or numpy array (as from `model.state_dict()`
      or a checkpoint file). The number of classes, the depth and the input size are read from it.
    model_name: the timm architecture (e.g. 'vit_base_patch16_224' or 'convnext_tiny'; tags like
      '.augreg_in21k' are ignored) or the vitjax name it maps to (e.g. 'vit_b16').
    **overrides: extra `create_model` fields, e.g. drop_path=0.1 or attn_impl='auto' for
      fine-tuning, or the sizes of a non-standard timm model (num_heads cannot be read off the
      weights). They win over what is read from the state dict; a size that disagrees with the
      weights is reported like any other mismatch.

  Returns:
    `Converted(model, variables, meta)`; unpack it as a 3-tuple.

  Raises:
    ValueError: unknown model name, or one message listing every key or shape that does not fit.
  """
  family, timm_name, vitjax_name = resolve(model_name)
  overrides = {**family.overrides(state_dict), **overrides}
  model = create_model(vitjax_name, **overrides)
  image_shape = family.example_input(state_dict, model)
  target = mapping.abstract_params(model, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  params = mapping.apply_rules(state_dict, family.rules, target, ignore=family.ignore,
                               what=f"timm {family.name} {timm_name!r} -> vitjax {vitjax_name!r}")
  meta = {"source": "timm", "source_model": timm_name, "model_name": vitjax_name,
          "model_overrides": dict(overrides), "image_size": list(image_shape[1:3]),
          # timm's eval transform of these weights (input size, crop, mean/std), for vitjax.predict
          "preprocess": pretrained.timm_preprocess(model_name, timm_name)}
  return Converted(model, {"params": params}, meta)
