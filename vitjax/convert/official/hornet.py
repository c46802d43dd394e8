"""`from_official`'s table for HorNet (raoyongming/HorNet): its key names -> vitjax."""
from __future__ import annotations

from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import (Family, Overrides, channels_last, count_blocks,
                                            depthwise, pointwise, stage_depths, state_shape)


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
    found["base_dim"] = state_shape(state, "downsample_layers.0.0.weight")[0]
  depths = stage_depths(state, _HN_BLOCK)
  if depths is None:
    return found
  found["depths"] = depths
  orders, variants, filters = [], [], []
  for i, depth in enumerate(depths):
    pre = f"stages.{i}.0.gnconv."
    orders.append(1 + count_blocks(state, rf"stages\.{i}\.0\.gnconv\.pws\.(\d+)\.").get((), 0))
    if pre + "dwconv.complex_weight" in state:
      _, h, wf, _ = state_shape(state, pre + "dwconv.complex_weight")
      variants.append("gf")
      filters.append((h, 2 * (wf - 1)))       # a spatial grid whose rfft grid is (h, wf)
    else:
      variants.append("dwconv")
      filters.append(None)
      if pre + "dwconv.weight" in state:
        found["kernel_size"] = state_shape(state, pre + "dwconv.weight")[-1]
    del depth
  found.update(orders=tuple(orders), variants=tuple(variants))
  if any(f is not None for f in filters):
    found["filter_sizes"] = tuple(filters)
  if "stages.0.0.pwconv1.weight" in state and "base_dim" in found:
    found["mlp_ratio"] = state_shape(state, "stages.0.0.pwconv1.weight")[0] // found["base_dim"]
  if "stages.0.0.norm1.weight" in state and "stages.0.0.gamma1" not in state:
    found["layer_scale_init"] = 0.0
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  return found


def _hornet_image_size(state, model) -> int:
  """224, or for a GF model the size its first GF filter was made for (stride 16 in stage 3)."""
  for i, size in enumerate(model.filter_sizes or ()):
    if size is not None:
      return size[0] * 4 * 2 ** i
  return 224


FAMILY = Family(
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
    image_size=_hornet_image_size)
