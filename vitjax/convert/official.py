"""Official (the authors' own) PyTorch state dicts -> vitjax variables.

    import torch, vitjax.convert
    state = torch.load("hornet_tiny_7x7.pth", map_location="cpu", weights_only=True)["model"]
    model, variables, meta = vitjax.convert.from_official(state, "hornet_t")
    logits = model.apply(variables, images_nhwc)      # the official model's logits

The released checkpoints of a paper's own repository keep that repository's key names, which
neither timm nor transformers share. Each supported repository is one `Family` entry in
`FAMILIES`: a regular expression that recognises its state dicts, the vitjax models it covers
(with the official constructor names, which `name` may also be), a table of renaming `Rule`s
whose targets carry their collection ('params/...' or 'batch_stats/...'), and a function that
reads the create_model overrides (depths, widths, classes, ...) off the weights. Adding a family
is adding one entry. Conversion is strict, as `from_timm`: keys that fit no rule, missing
parameters and shape mismatches are reported together in one ValueError, and a state dict of
another family is named as such.

The families and the official code their key names come from (commit ids of the code the golden
fixtures in tests/golden/ were made with are stored in each fixture):
  hornet       raoyongming/HorNet, hornet.py                     hornet_{t,s,b}[_gf]
  spectformer  badripatro/SpectFormers, vanilla_architecture      spectformer_s
  cvt          microsoft/CvT, lib/models/cls_cvt.py               cvt_13, cvt_21, cvt_w24
  rmt          qhfan/RMT, classfication_release/RMT.py (T) and
               classification_token_label_release/RMT.py (S/B/L)  rmt_t, rmt_s, rmt_b, rmt_l
  cswin        microsoft/CSWin-Transformer, models/cswin.py       cswin_{tiny,small,base}_224

Layout differences the rules undo: torch Linear (out, in) -> Flax kernel (in, out); Conv2d
(O, I, kh, kw) -> (kh, kw, I, O); a 1x1 Conv2d -> a Dense kernel; a depthwise Conv2d (C, 1, k, k)
-> (k, k, C) or (k, k, 1, C), whichever the vitjax layer holds; HorNet's GF filter (C, h, w, 2) ->
(h, w, C, 2); BatchNorm running statistics -> 'batch_stats'.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import choices
from vitjax.convert import mapping
from vitjax.convert.mapping import Converted, Rule, conv, linear, rule
from vitjax.models.registry import create_model

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


# ---------------------------------------------------------------------------------------------
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


def _shape(state, key) -> tuple[int, ...]:
  return tuple(np.shape(state[key]))


def _count(state, pattern: str) -> dict[tuple[int, ...], int]:
  """{leading groups: 1 + max last group} over keys matching `pattern` (depths per stage)."""
  out: dict[tuple[int, ...], int] = {}
  for k in state:
    if m := re.match(pattern, k):
      *lead, last = (int(g) for g in m.groups())
      out[tuple(lead)] = max(out.get(tuple(lead), 0), last + 1)
  return out


def _depths(state, pattern: str) -> tuple[int, ...] | None:
  """Blocks per stage from keys `pattern` (groups: stage, block); None when there are none."""
  per_stage = _count(state, pattern)
  if not per_stage:
    return None
  return tuple(per_stage.get((i,), 0) for i in range(max(s for s, in per_stage) + 1))


def _bn_rules(src: str, dst: str) -> list[Rule]:
  """A BatchNorm2d `src` (regex prefix) -> vitjax BatchNorm `dst` (path with its format fields)."""
  return [rule(src + r"\.weight", "params/" + dst + "/scale"),
          rule(src + r"\.bias", "params/" + dst + "/bias"),
          rule(src + r"\.running_mean", "batch_stats/" + dst + "/mean"),
          rule(src + r"\.running_var", "batch_stats/" + dst + "/var")]


def _dense_rules(src: str, dst: str, transform=linear) -> list[Rule]:
  return [rule(src + r"\.weight", "params/" + dst + "/kernel", transform=transform),
          rule(src + r"\.bias", "params/" + dst + "/bias")]


# ---------------------------------------------------------------------------------------------
# HorNet (raoyongming/HorNet, hornet.py). vitjax keeps HorNet's flat layout: stem_conv,
# downsample_{i}_{norm,conv}, stage_{i}_block_{j}/..., norm, head.

_HN_BLOCK = r"stages\.(\d+)\.(\d+)\."
_HN = "params/stage_{0}_block_{1}/"
_HN_GN = _HN_BLOCK + r"gnconv\."


def _hornet_rules() -> tuple[Rule, ...]:
  p = "params/"
  rules = [
      rule(r"downsample_layers\.0\.0\.weight", p + "stem_conv/kernel", transform=conv),
      rule(r"downsample_layers\.0\.0\.bias", p + "stem_conv/bias"),
      rule(r"downsample_layers\.0\.1\.weight", p + "stem_norm/scale"),
      rule(r"downsample_layers\.0\.1\.bias", p + "stem_norm/bias"),
      rule(r"downsample_layers\.(\d+)\.0\.weight", p + "downsample_{0}_norm/scale"),
      rule(r"downsample_layers\.(\d+)\.0\.bias", p + "downsample_{0}_norm/bias"),
      rule(r"downsample_layers\.(\d+)\.1\.weight", p + "downsample_{0}_conv/kernel", transform=conv),
      rule(r"downsample_layers\.(\d+)\.1\.bias", p + "downsample_{0}_conv/bias"),
      rule(_HN_BLOCK + r"gamma([12])", _HN + "gamma{2}"),
      rule(_HN_GN + r"(proj_in|proj_out)\.weight", _HN + "mixer/{2}/kernel", transform=pointwise),
      rule(_HN_GN + r"(proj_in|proj_out)\.bias", _HN + "mixer/{2}/bias"),
      rule(_HN_GN + r"pws\.(\d+)\.weight", _HN + "mixer/pws_{2}/kernel", transform=pointwise),
      rule(_HN_GN + r"pws\.(\d+)\.bias", _HN + "mixer/pws_{2}/bias"),
      # 7x7 depthwise conv, or the global-local filter (GF) in its place
      rule(_HN_GN + r"dwconv\.weight", _HN + "mixer/dwconv/kernel", transform=depthwise),
      rule(_HN_GN + r"dwconv\.bias", _HN + "mixer/dwconv/bias"),
      rule(_HN_GN + r"dwconv\.dw\.weight", _HN + "mixer/dwconv/dw/kernel", transform=depthwise),
      rule(_HN_GN + r"dwconv\.complex_weight", _HN + "mixer/dwconv/complex_weight",
           transform=channels_last),
      rule(_HN_GN + r"dwconv\.(pre_norm|post_norm)\.weight", _HN + "mixer/dwconv/{2}/scale"),
      rule(_HN_GN + r"dwconv\.(pre_norm|post_norm)\.bias", _HN + "mixer/dwconv/{2}/bias"),
      rule(_HN_BLOCK + r"(norm[12])\.weight", _HN + "{2}/scale"),
      rule(_HN_BLOCK + r"(norm[12])\.bias", _HN + "{2}/bias"),
      rule(_HN_BLOCK + r"pwconv1\.weight", _HN + "mlp/Dense_0/kernel", transform=linear),
      rule(_HN_BLOCK + r"pwconv1\.bias", _HN + "mlp/Dense_0/bias"),
      rule(_HN_BLOCK + r"pwconv2\.weight", _HN + "mlp/Dense_1/kernel", transform=linear),
      rule(_HN_BLOCK + r"pwconv2\.bias", _HN + "mlp/Dense_1/bias"),
      rule(r"norm\.weight", p + "norm/scale"),
      rule(r"norm\.bias", p + "norm/bias"),
      rule(r"head\.weight", p + "head/kernel", transform=linear),
      rule(r"head\.bias", p + "head/bias"),
  ]
  return tuple(rules)


def _hornet_overrides(state) -> Overrides:
  """base_dim, depths, gnConv orders, 7x7 or GF per stage (with the GF filter's stored grid),
  the depthwise kernel, MLP ratio, layer scale and classes, read off the weights."""
  found: Overrides = {}
  if "downsample_layers.0.0.weight" in state:
    found["base_dim"] = _shape(state, "downsample_layers.0.0.weight")[0]
  depths = _depths(state, _HN_BLOCK)
  if depths is None:
    return found
  found["depths"] = depths
  orders, variants, filters = [], [], []
  for i, depth in enumerate(depths):
    pre = f"stages.{i}.0.gnconv."
    orders.append(1 + _count(state, rf"stages\.{i}\.0\.gnconv\.pws\.(\d+)\.").get((), 0))
    if pre + "dwconv.complex_weight" in state:
      _, h, wf, _ = _shape(state, pre + "dwconv.complex_weight")
      variants.append("gf")
      filters.append((h, 2 * (wf - 1)))       # a spatial grid whose rfft grid is (h, wf)
    else:
      variants.append("dwconv")
      filters.append(None)
      if pre + "dwconv.weight" in state:
        found["kernel_size"] = _shape(state, pre + "dwconv.weight")[-1]
    del depth
  found.update(orders=tuple(orders), variants=tuple(variants))
  if any(f is not None for f in filters):
    found["filter_sizes"] = tuple(filters)
  if "stages.0.0.pwconv1.weight" in state and "base_dim" in found:
    found["mlp_ratio"] = _shape(state, "stages.0.0.pwconv1.weight")[0] // found["base_dim"]
  if "stages.0.0.norm1.weight" in state and "stages.0.0.gamma1" not in state:
    found["layer_scale_init"] = 0.0
  if "head.weight" in state:
    found["num_classes"] = _shape(state, "head.weight")[0]
  return found


def _hornet_image_size(state, model) -> int:
  """224, or for a GF model the size its first GF filter was made for (stride 16 in stage 3)."""
  for i, size in enumerate(model.filter_sizes or ()):
    if size is not None:
      return size[0] * 4 * 2 ** i
  return 224


# ---------------------------------------------------------------------------------------------
# SpectFormer (badripatro/SpectFormers, vanilla_architecture/spectformer.py): vit_jax names in
# vitjax (embedding, Transformer/encoderblock_{k}, encoder_norm); the first blocks are spectral
# (filter.complex_weight, same (h, w, C, 2) layout), the rest attention with a fused qkv.

_SF_BLOCK = r"blocks\.(\d+)\."
_SF = "params/Transformer/encoderblock_{0}/"
_SF_ATTN = _SF + "MultiHeadDotProductAttention_0/"


def _spectformer_rules() -> tuple[Rule, ...]:
  b = _SF_BLOCK
  return (
      rule(r"patch_embed\.proj\.weight", "params/embedding/kernel", transform=conv),
      rule(r"patch_embed\.proj\.bias", "params/embedding/bias"),
      rule(r"pos_embed", "params/Transformer/posembed_input/pos_embedding"),
      rule(b + r"norm1\.weight", _SF + "LayerNorm_0/scale"),
      rule(b + r"norm1\.bias", _SF + "LayerNorm_0/bias"),
      rule(b + r"norm2\.weight", _SF + "LayerNorm_1/scale"),
      rule(b + r"norm2\.bias", _SF + "LayerNorm_1/bias"),
      rule(b + r"filter\.complex_weight", _SF + "mixer/complex_weight"),
      rule(b + r"attn\.qkv\.weight", _SF_ATTN + "query/kernel", _SF_ATTN + "key/kernel",
           _SF_ATTN + "value/kernel", transform=mapping.split(3, linear)),
      rule(b + r"attn\.qkv\.bias", _SF_ATTN + "query/bias", _SF_ATTN + "key/bias",
           _SF_ATTN + "value/bias", transform=mapping.split(3, mapping.copy)),
      rule(b + r"attn\.proj\.weight", _SF_ATTN + "out/kernel", transform=linear),
      rule(b + r"attn\.proj\.bias", _SF_ATTN + "out/bias"),
      rule(b + r"mlp\.fc1\.weight", _SF + "MlpBlock_0/Dense_0/kernel", transform=linear),
      rule(b + r"mlp\.fc1\.bias", _SF + "MlpBlock_0/Dense_0/bias"),
      rule(b + r"mlp\.fc2\.weight", _SF + "MlpBlock_0/Dense_1/kernel", transform=linear),
      rule(b + r"mlp\.fc2\.bias", _SF + "MlpBlock_0/Dense_1/bias"),
      rule(r"norm\.weight", "params/Transformer/encoder_norm/scale"),
      rule(r"norm\.bias", "params/Transformer/encoder_norm/bias"),
      rule(r"head\.weight", "params/head/kernel", transform=linear),
      rule(r"head\.bias", "params/head/bias"),
  )


def _spectformer_overrides(state) -> Overrides:
  """Width, patch size, depth, spectral block count (the paper's alpha), MLP width, the spectral
  filters' grid and classes. The official code fixes 6 heads (vitjax's default)."""
  found: Overrides = {}
  if "patch_embed.proj.weight" in state:
    width, _, patch, _ = _shape(state, "patch_embed.proj.weight")
    found.update(width=width, patch_size=patch)
  blocks = _count(state, r"blocks\.(\d+)\.").get((), 0)
  if blocks:
    found["depth"] = blocks
    found["num_spectral"] = sum(f"blocks.{k}.filter.complex_weight" in state for k in range(blocks))
  if "blocks.0.mlp.fc1.weight" in state:
    found["mlp_dim"] = _shape(state, "blocks.0.mlp.fc1.weight")[0]
  if "blocks.0.filter.complex_weight" in state:
    h, wf = _shape(state, "blocks.0.filter.complex_weight")[:2]
    found["filter_size"] = (h, 2 * (wf - 1))
  if "head.weight" in state:
    found["num_classes"] = _shape(state, "head.weight")[0]
  return found


def _spectformer_image_size(state, model) -> int:
  """The square input the position table was made for: sqrt(N) patches a side."""
  num = _shape(state, "pos_embed")[1] if "pos_embed" in state else 196
  side = int(round(num ** 0.5))
  if side * side != num:
    raise ValueError(f"pos_embed holds {num} positions, not a square grid; only square inputs "
                     "are supported")
  return side * model.patch_size


# ---------------------------------------------------------------------------------------------
# CvT (microsoft/CvT, lib/models/cls_cvt.py). Stage 0's convolutional embedding is vitjax's
# `stem`, stage i > 0's is `stages_i/downsample`.

_CVT_STAGE = r"stage(\d+)\."
_CVT_BLOCK = _CVT_STAGE + r"blocks\.(\d+)\."
_CVT = "stages_{0}/blocks_{1}/"


def _cvt_rules() -> tuple[Rule, ...]:
  rules = []
  for stage, target in ((r"stage0\.", "stem"), (_CVT_STAGE, "stages_{0}/downsample")):
    rules += _dense_rules(stage + r"patch_embed\.proj", target + "/conv", conv)
    rules += [rule(stage + r"patch_embed\.norm\.weight", "params/" + target + "/norm/scale"),
              rule(stage + r"patch_embed\.norm\.bias", "params/" + target + "/norm/bias")]
  rules.append(rule(_CVT_STAGE + r"cls_token", "params/stages_{0}/cls_token"))
  b = _CVT_BLOCK
  for x in "qkv":
    rules.append(rule(b + rf"attn\.conv_proj_{x}\.conv\.weight",
                      "params/" + _CVT + f"attn/conv_proj_{x}/conv/kernel", transform=depthwise))
    rules += _bn_rules(b + rf"attn\.conv_proj_{x}\.bn", _CVT + f"attn/conv_proj_{x}/bn")
    rules += _dense_rules(b + rf"attn\.proj_{x}", _CVT + f"attn/proj_{x}")
  rules += _dense_rules(b + r"attn\.proj", _CVT + "attn/proj")
  rules += _dense_rules(b + r"mlp\.fc1", _CVT + "mlp/Dense_0")
  rules += _dense_rules(b + r"mlp\.fc2", _CVT + "mlp/Dense_1")
  for norm in ("norm1", "norm2"):
    rules += [rule(b + norm + r"\.weight", "params/" + _CVT + norm + "/scale"),
              rule(b + norm + r"\.bias", "params/" + _CVT + norm + "/bias")]
  rules += [rule(r"norm\.weight", "params/norm/scale"), rule(r"norm\.bias", "params/norm/bias")]
  rules += _dense_rules(r"head", "head")
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
  depths = _count(state, _CVT_BLOCK)
  found["depths"] = tuple(depths.get((i,), 0) for i in stages)
  found["dims"] = tuple(_shape(state, embed.format(i))[0] for i in stages)
  found["patch_sizes"] = tuple(_shape(state, embed.format(i))[-1] for i in stages)
  if "head.weight" in state:
    found["num_classes"] = _shape(state, "head.weight")[0]
  found["cls_token"] = f"stage{stages[-1]}.cls_token" in state
  first = next((i for i, d in zip(stages, found["depths"]) if d), None)
  if first is not None:
    block = f"stage{first}.blocks.0."
    if block + "mlp.fc1.weight" in state:
      ratio = _shape(state, block + "mlp.fc1.weight")[0] / found["dims"][stages.index(first)]
      found["mlp_ratio"] = ratio
    found["qkv_bias"] = block + "attn.proj_q.bias" in state
    if block + "attn.conv_proj_q.conv.weight" in state:
      found["kernel_size"] = _shape(state, block + "attn.conv_proj_q.conv.weight")[-1]
  return found


# ---------------------------------------------------------------------------------------------
# RMT (qhfan/RMT, classfication_release/RMT.py and classification_token_label_release/RMT.py).
# The official patch merging closes stage i (`layers.i.downsample`); vitjax's opens stage i + 1.

_RMT_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\."
_RMT = "stages_{0}/blocks_{1}/"
_RMT_MAX_STAGES = 8


def _rmt_rules() -> tuple[Rule, ...]:
  rules = []
  for i, conv_index in enumerate((0, 3, 6, 9)):       # PatchEmbed: conv, BN, GELU, ...
    rules += _dense_rules(rf"patch_embed\.proj\.{conv_index}", f"stem/conv_{i}", conv)
    rules += _bn_rules(rf"patch_embed\.proj\.{conv_index + 1}", f"stem/bn_{i}")
  for i in range(_RMT_MAX_STAGES):
    rules += _dense_rules(rf"layers\.{i}\.downsample\.reduction", f"stages_{i + 1}/downsample/conv",
                          conv)
    rules += _bn_rules(rf"layers\.{i}\.downsample\.norm", f"stages_{i + 1}/downsample/bn")
  b = _RMT_BLOCK
  for src, dst in (("retention_layer_norm", "norm1"), ("final_layer_norm", "norm2")):
    rules += [rule(b + src + r"\.weight", "params/" + _RMT + dst + "/scale"),
              rule(b + src + r"\.bias", "params/" + _RMT + dst + "/bias")]
  for src, dst in (("pos.conv", "cpe"), ("retention.lepe.conv", "attn/lepe"),
                   ("ffn.dwconv.conv", "ffn/dwconv")):
    rules += _dense_rules(b + re.escape(src), _RMT + dst, depthwise)
  for src, dst in (("retention.q_proj", "attn/q_proj"), ("retention.k_proj", "attn/k_proj"),
                   ("retention.v_proj", "attn/v_proj"), ("retention.out_proj", "attn/out_proj"),
                   ("ffn.fc1", "ffn/fc1"), ("ffn.fc2", "ffn/fc2")):
    rules += _dense_rules(b + re.escape(src), _RMT + dst)
  rules += [rule(b + r"gamma_([12])", "params/" + _RMT + "gamma{2}")]
  rules += _dense_rules(r"proj", "proj") + _bn_rules(r"norm", "norm")
  rules += _dense_rules(r"head", "head") + _dense_rules(r"aux_head", "aux_head")
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
  depths = _depths(state, _RMT_BLOCK)
  if depths is None:
    return found
  found["depths"] = depths
  dims, heads, inits, ranges, ratios, scales = [], [], [], [], [], []
  for i, depth in enumerate(depths):
    block = f"layers.{i}.blocks.0."
    if not depth or block + "ffn.fc1.weight" not in state or block + "retention.q_proj.weight" \
        not in state or f"layers.{i}.Relpos.decay" not in state:
      return found                                      # the strict conversion lists what is missing
    dims.append(_shape(state, block + "retention.q_proj.weight")[0])
    ratios.append(_shape(state, block + "ffn.fc1.weight")[0] / dims[-1])
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
    found["projection"] = _shape(state, "proj.weight")[0]
  if "head.weight" in state:
    found["num_classes"] = _shape(state, "head.weight")[0]
  found["token_label"] = "aux_head.weight" in state
  return found


# ---------------------------------------------------------------------------------------------
# CSWin (microsoft/CSWin-Transformer, models/cswin.py). vitjax: stem/{conv,norm},
# stages_{i}/downsample/{conv,norm} (the official merge{i} precedes stage{i+1}),
# stages_{i}/blocks_{j}/{norm1,attn,norm2,mlp}; the official fused qkv and proj live in the
# block, LePE's get_v in attns.{b}; vitjax keeps all of them in the 'cswin' mixer ('attn').

_CSW_STAGE = r"stage(\d+)\.(\d+)\."


def _cswin_rules() -> tuple[Rule, ...]:
  p = "params/"
  rules = [
      rule(r"stage1_conv_embed\.0\.weight", p + "stem/conv/kernel", transform=conv),
      rule(r"stage1_conv_embed\.0\.bias", p + "stem/conv/bias"),
      rule(r"stage1_conv_embed\.2\.weight", p + "stem/norm/scale"),
      rule(r"stage1_conv_embed\.2\.bias", p + "stem/norm/bias"),
      rule(r"merge(\d+)\.conv\.weight", p + "stages_{0}/downsample/conv/kernel", transform=conv),
      rule(r"merge(\d+)\.conv\.bias", p + "stages_{0}/downsample/conv/bias"),
      rule(r"merge(\d+)\.norm\.weight", p + "stages_{0}/downsample/norm/scale"),
      rule(r"merge(\d+)\.norm\.bias", p + "stages_{0}/downsample/norm/bias"),
      rule(r"norm\.weight", p + "norm/scale"),
      rule(r"norm\.bias", p + "norm/bias"),
      rule(r"head\.weight", p + "head/kernel", transform=linear),
      rule(r"head\.bias", p + "head/bias"),
  ]
  for s in range(1, 5):     # the official model has four stages, stage1 .. stage4
    block = rf"stage{s}\.(\d+)\."
    out = p + f"stages_{s - 1}/blocks_{{0}}/"
    attn = out + "attn/"
    rules += [
        rule(block + r"qkv\.weight", attn + "query/kernel", attn + "key/kernel",
             attn + "value/kernel", transform=mapping.split(3, linear)),
        rule(block + r"qkv\.bias", attn + "query/bias", attn + "key/bias", attn + "value/bias",
             transform=mapping.split(3, mapping.copy)),
        rule(block + r"proj\.weight", attn + "out/kernel", transform=linear),
        rule(block + r"proj\.bias", attn + "out/bias"),
        rule(block + r"attns\.(\d+)\.get_v\.weight", attn + "lepe_{1}/kernel", transform=depthwise),
        rule(block + r"attns\.(\d+)\.get_v\.bias", attn + "lepe_{1}/bias"),
        rule(block + r"(norm[12])\.weight", out + "{1}/scale"),
        rule(block + r"(norm[12])\.bias", out + "{1}/bias"),
        rule(block + r"mlp\.fc1\.weight", out + "mlp/Dense_0/kernel", transform=linear),
        rule(block + r"mlp\.fc1\.bias", out + "mlp/Dense_0/bias"),
        rule(block + r"mlp\.fc2\.weight", out + "mlp/Dense_1/kernel", transform=linear),
        rule(block + r"mlp\.fc2\.bias", out + "mlp/Dense_1/bias"),
    ]
  return tuple(rules)


def _cswin_overrides(state) -> Overrides:
  """embed_dim, stem stride, depths, MLP ratio and classes, read off the weights (num_heads and
  split_size do not show in them: pass them for a non-standard size)."""
  found: Overrides = {}
  if "stage1_conv_embed.0.weight" in state:
    embed_dim, _, k, _ = _shape(state, "stage1_conv_embed.0.weight")
    found.update(embed_dim=embed_dim, patch_size=(k + 1) // 2)
  per_stage = _count(state, _CSW_STAGE)
  if per_stage:
    found["depths"] = tuple(per_stage.get((s,), 0) for s in range(1, max(per_stage)[0] + 1))
  if "stage1.0.mlp.fc1.weight" in state and "embed_dim" in found:
    found["mlp_ratio"] = _shape(state, "stage1.0.mlp.fc1.weight")[0] / found["embed_dim"]
  if "head.weight" in state:
    found["num_classes"] = _shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


# ---------------------------------------------------------------------------------------------
# The table. A family added here is all from_official needs.

FAMILIES: dict[str, Family] = {
    "hornet": Family(
        name="hornet",
        repository="raoyongming/HorNet",
        marker=r"stages\.\d+\.\d+\.gnconv\.",
        models={
            "hornet_t": ("hornet_tiny_7x7",), "hornet_t_gf": ("hornet_tiny_gf",),
            "hornet_s": ("hornet_small_7x7",), "hornet_s_gf": ("hornet_small_gf",),
            "hornet_b": ("hornet_base_7x7",), "hornet_b_gf": ("hornet_base_gf",),
        },
        rules=_hornet_rules(),
        overrides=_hornet_overrides,
        image_size=_hornet_image_size),
    "spectformer": Family(
        name="spectformer",
        repository="badripatro/SpectFormers",
        marker=r"blocks\.\d+\.filter\.complex_weight",
        models={"spectformer_s": ("spectformer-s",)},
        rules=_spectformer_rules(),
        overrides=_spectformer_overrides,
        image_size=_spectformer_image_size),
    "cvt": Family(
        name="cvt",
        repository="microsoft/CvT",
        marker=r"stage\d+\.patch_embed\.",
        models={"cvt_13": ("cvt-13-224x224",), "cvt_21": ("cvt-21-224x224",),
                "cvt_w24": ("cvt-w24-384x384",)},
        rules=_cvt_rules(),
        overrides=_cvt_overrides,
        always=("num_classes", "act"),
        ignore=(r".*\.num_batches_tracked",)),
    "rmt": Family(
        name="rmt",
        repository="qhfan/RMT",
        marker=r"layers\.\d+\.blocks\.\d+\.retention\.",
        models={"rmt_t": ("RMT_T3",), "rmt_s": ("RMT_S",), "rmt_b": ("RMT_M2",),
                "rmt_l": ("RMT_L6",)},
        rules=_rmt_rules(),
        overrides=_rmt_overrides,
        always=("num_classes", "token_label"),
        ignore=(r".*\.num_batches_tracked", r"layers\.\d+\.Relpos\.(angle|decay)")),
    "cswin": Family(
        name="cswin",
        repository="microsoft/CSWin-Transformer",
        marker=r"stage1_conv_embed\.",
        models={"cswin_tiny_224": ("CSWin_64_12211_tiny_224",),
                "cswin_small_224": ("CSWin_64_24322_small_224",),
                "cswin_base_224": ("CSWin_96_24322_base_224",)},
        rules=_cswin_rules(),
        overrides=_cswin_overrides),
}


def supported_models() -> list[str]:
  """vitjax model names `from_official` accepts (the official constructor names work too)."""
  return sorted(n for f in FAMILIES.values() for n in f.models)


def resolve(name: str) -> tuple[Family, str]:
  """vitjax name or official constructor name -> (family, vitjax name)."""
  for family in FAMILIES.values():
    if name in family.models:
      return family, name
    for vitjax_name, official in family.models.items():
      if name in official:
        return family, vitjax_name
  official = sorted(o for f in FAMILIES.values() for names in f.models.values() for o in names)
  raise choices.unknown("name", name, supported_models() + official)


def _is_family(state, family: Family) -> bool:
  return any(re.match(family.marker, k) for k in state)


def check_family(state: Mapping[str, Any], family: Family):
  """One clear error when `state` is not a state dict of `family` (naming the family it is)."""
  if _is_family(state, family):
    return
  others = [f for f in FAMILIES.values() if f is not family and _is_family(state, f)]
  hint = (f" It looks like an official {others[0].name} ({others[0].repository}) state dict; "
          f"convert it as one of {', '.join(sorted(others[0].models))}." if others else "")
  raise ValueError(
      f"Not an official {family.name} ({family.repository}) state dict: no key matches "
      f"{family.marker!r}.{hint} Found {len(state)} keys:"
      + mapping._short_list(sorted(state), limit=12))  # pylint: disable=protected-access


def abstract_variables(model, *example_args) -> dict[str, tuple[int, ...]]:
  """'collection/path' -> shape for every variable of the model (no allocation)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_args)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def from_official(state_dict: Mapping[str, Any], name: str, **overrides) -> Converted:
  """Converts an official state dict into a vitjax model and its variables (strict).

  Args:
    state_dict: official parameter name -> torch tensor or numpy array, as `model.state_dict()`
      of the official code or its released checkpoint files (unwrap {'model': ...} first, or
      read the file with `vitjax.convert.load_state_dict`).
    name: the vitjax model (e.g. 'hornet_t') or the official constructor ('hornet_tiny_7x7').
    **overrides: extra `create_model` fields (those the weights do not show, such as num_heads
      of a non-standard size; drop_path for fine-tuning). They win over what is read from the
      state dict; a size that disagrees with the weights is reported like any other mismatch.

  Returns:
    `Converted(model, variables, meta)`; variables = {'params': ...} plus 'batch_stats' for
    models with BatchNorm.

  Raises:
    ValueError: unknown name, a state dict of another family, or one message listing every key
      or shape that does not fit.
  """
  family, vitjax_name = resolve(name)
  check_family(state_dict, family)
  read = family.overrides(state_dict)
  default = create_model(vitjax_name)
  overrides = {**{k: v for k, v in read.items()
                  if k in family.always or getattr(default, k, None) != v}, **overrides}
  model = create_model(vitjax_name, **overrides)
  size = family.image_size(state_dict, model)
  target = abstract_variables(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  variables = mapping.apply_rules(
      state_dict, family.rules, target, ignore=family.ignore,
      what=f"official {family.name} ({family.repository}) -> vitjax {vitjax_name!r}")
  meta = {"source": "official", "source_model": f"{family.repository} {name}",
          "model_name": vitjax_name, "model_overrides": dict(overrides),
          "image_size": [size, size]}
  return Converted(model, variables, meta)
