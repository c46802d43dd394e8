"""`from_official`'s table for SpectFormer (badripatro/SpectFormers, vanilla architecture): its key names -> vitjax."""
from __future__ import annotations

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule
from vitjax.convert.official.family import Family, Overrides, count_blocks, state_shape


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
    width, _, patch, _ = state_shape(state, "patch_embed.proj.weight")
    found.update(width=width, patch_size=patch)
  blocks = count_blocks(state, r"blocks\.(\d+)\.").get((), 0)
  if blocks:
    found["depth"] = blocks
    found["num_spectral"] = sum(f"blocks.{k}.filter.complex_weight" in state for k in range(blocks))
  if "blocks.0.mlp.fc1.weight" in state:
    found["mlp_dim"] = state_shape(state, "blocks.0.mlp.fc1.weight")[0]
  if "blocks.0.filter.complex_weight" in state:
    h, wf = state_shape(state, "blocks.0.filter.complex_weight")[:2]
    found["filter_size"] = (h, 2 * (wf - 1))
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  return found


def _spectformer_image_size(state, model) -> int:
  """The square input the position table was made for: sqrt(N) patches a side."""
  num = state_shape(state, "pos_embed")[1] if "pos_embed" in state else 196
  side = int(round(num ** 0.5))
  if side * side != num:
    raise ValueError(f"pos_embed holds {num} positions, not a square grid; only square inputs "
                     "are supported")
  return side * model.patch_size


FAMILY = Family(
    name="spectformer",
    repository="badripatro/SpectFormers",
    marker=r"blocks\.\d+\.filter\.complex_weight",
    models={"spectformer_s": ("spectformer-s",)},
    rules=_spectformer_rules(),
    overrides=_spectformer_overrides,
    image_size=_spectformer_image_size)
