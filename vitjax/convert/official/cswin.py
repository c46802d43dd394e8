"""`from_official`'s table for CSWin (microsoft/CSWin-Transformer): its key names -> vitjax."""
from __future__ import annotations

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import Family, Overrides, count_blocks, depthwise, state_shape


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
    embed_dim, _, k, _ = state_shape(state, "stage1_conv_embed.0.weight")
    found.update(embed_dim=embed_dim, patch_size=(k + 1) // 2)
  per_stage = count_blocks(state, _CSW_STAGE)
  if per_stage:
    found["depths"] = tuple(per_stage.get((s,), 0) for s in range(1, max(per_stage)[0] + 1))
  if "stage1.0.mlp.fc1.weight" in state and "embed_dim" in found:
    found["mlp_ratio"] = state_shape(state, "stage1.0.mlp.fc1.weight")[0] / found["embed_dim"]
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  return found


FAMILY = Family(
    name="cswin",
    repository="microsoft/CSWin-Transformer",
    marker=r"stage1_conv_embed\.",
    models={"cswin_tiny_224": ("CSWin_64_12211_tiny_224",),
            "cswin_small_224": ("CSWin_64_24322_small_224",),
            "cswin_base_224": ("CSWin_96_24322_base_224",)},
    rules=_cswin_rules(),
    overrides=_cswin_overrides)
