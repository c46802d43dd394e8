"""`from_official`'s table for T2T-ViT (yitu-opensource/T2T-ViT): its key names -> vitjax.

Official layout (models/t2t_vit.py, token_performer.py, token_transformer.py) -> vitjax
(`vitjax.models.t2t`):
  tokens_to_token.attention{i}.*   -> tokens_to_token/attention{i}/* (Performer: norm1, kqv, proj,
                                      norm2, mlp.0 / mlp.2 -> mlp/Dense_0 / Dense_1, and the frozen
                                      random features `w` -> batch_stats/.../random_features;
                                      transformer: attn.qkv, attn.proj -> qkv, proj, mlp.fc1/fc2)
  tokens_to_token.project, cls_token, norm, head   -> the same names
  blocks.{k}.*                     -> Transformer/encoderblock_{k}/{norm1, attn, norm2, mlp}, the
                                      fused qkv split into query / key / value heads
  pos_embed                        -> nothing: vitjax computes the sinusoid table. The state dict's
                                      table is checked against it (it sets the image size).
"""
from __future__ import annotations

import numpy as np

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, linear, rule
from vitjax.convert.official.family import Family, Overrides, count_blocks, dense_rules, state_shape
from vitjax.models.t2t import sinusoid_table

_T2T = r"tokens_to_token\.attention(\d+)\."
_T2T_DST = "tokens_to_token/attention{0}/"
_BLOCK = r"blocks\.(\d+)\."
_BLOCK_DST = "Transformer/encoderblock_{0}/"


def _norm_rules(src: str, dst: str) -> list[Rule]:
  return [rule(src + r"\.weight", "params/" + dst + "/scale"),
          rule(src + r"\.bias", "params/" + dst + "/bias")]


def _t2t_rules() -> tuple[Rule, ...]:
  t, d = _T2T, _T2T_DST
  attn = "params/" + _BLOCK_DST + "attn/"
  b = _BLOCK
  return tuple([
      # T2T layers, both types.
      *_norm_rules(t + "norm1", d + "norm1"), *_norm_rules(t + "norm2", d + "norm2"),
      *dense_rules(t + "kqv", d + "kqv"),                          # Performer
      *dense_rules(t + "proj", d + "proj"),
      *dense_rules(t + r"mlp\.0", d + "mlp/Dense_0"),
      *dense_rules(t + r"mlp\.2", d + "mlp/Dense_1"),
      rule(t + "w", "batch_stats/" + d + "random_features"),
      rule(t + r"attn\.qkv\.weight", "params/" + d + "qkv/kernel", transform=linear),  # transformer
      *dense_rules(t + r"attn\.proj", d + "proj"),
      *dense_rules(t + r"mlp\.fc1", d + "mlp/Dense_0"),
      *dense_rules(t + r"mlp\.fc2", d + "mlp/Dense_1"),
      *dense_rules(r"tokens_to_token\.project", "tokens_to_token/project"),
      rule(r"cls_token", "params/cls_token"),
      # Backbone blocks.
      *_norm_rules(b + "norm1", _BLOCK_DST + "norm1"),
      *_norm_rules(b + "norm2", _BLOCK_DST + "norm2"),
      rule(b + r"attn\.qkv\.weight", attn + "query/kernel", attn + "key/kernel",
           attn + "value/kernel", transform=mapping.split(3, linear)),
      rule(b + r"attn\.qkv\.bias", attn + "query/bias", attn + "key/bias", attn + "value/bias",
           transform=mapping.split(3, mapping.copy)),
      rule(b + r"attn\.proj\.weight", attn + "out/kernel", transform=linear),
      rule(b + r"attn\.proj\.bias", attn + "out/bias"),
      *dense_rules(b + r"mlp\.fc1", _BLOCK_DST + "mlp/Dense_0"),
      *dense_rules(b + r"mlp\.fc2", _BLOCK_DST + "mlp/Dense_1"),
      *_norm_rules(r"norm", "norm"),
      *dense_rules(r"head", "head"),
  ])


def _t2t_overrides(state) -> Overrides:
  """embed_dim, depth, MLP ratio, T2T layer type, token_dim, the Performer's kernel_ratio, qkv
  bias and classes, read off the weights (num_heads does not show in them: pass it for a
  non-standard size). Checks that `pos_embed` is the sinusoid table vitjax computes."""
  found: Overrides = {}
  if "cls_token" in state:
    found["embed_dim"] = state_shape(state, "cls_token")[-1]
  depth = count_blocks(state, _BLOCK + r"norm1\.weight").get((), 0)
  if depth:
    found["depth"] = depth
  if "blocks.0.mlp.fc1.weight" in state and "embed_dim" in found:
    found["mlp_ratio"] = state_shape(state, "blocks.0.mlp.fc1.weight")[0] / found["embed_dim"]
  found["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
  if "tokens_to_token.attention1.kqv.weight" in state:
    found["tokens_type"] = "performer"
  elif "tokens_to_token.attention1.attn.qkv.weight" in state:
    found["tokens_type"] = "transformer"
  proj = [k for k in ("tokens_to_token.attention1.proj.weight",
                       "tokens_to_token.attention1.attn.proj.weight") if k in state]
  if proj:
    found["token_dim"] = state_shape(state, proj[0])[0]
    if "tokens_to_token.attention1.w" in state:
      found["kernel_ratio"] = state_shape(state, "tokens_to_token.attention1.w")[0] / found[
          "token_dim"]
  if "head.weight" in state:
    found["num_classes"] = state_shape(state, "head.weight")[0]
  elif "norm.weight" in state:
    found["num_classes"] = 0
  if "pos_embed" in state:
    _check_pos_embed(state)
  return found


def _check_pos_embed(state):
  table = mapping.to_numpy(state["pos_embed"])
  if table.ndim != 3 or table.shape[0] != 1:
    raise ValueError(f"pos_embed has shape {table.shape}; expected (1, tokens + 1, embed_dim)")
  expected = sinusoid_table(table.shape[1], table.shape[2])
  diff = float(np.abs(table[0] - expected).max())
  if diff > 1e-3:
    raise ValueError(
        f"pos_embed {table.shape} is not the sinusoid table of {table.shape[1]} positions (max "
        f"|diff| {diff:.3g}); vitjax computes that table from the token count and cannot load "
        "another one (e.g. one resized for a new image size)")


def _t2t_image_size(state, model) -> int:
  """The square input the position table was made for: sqrt(N) tokens a side."""
  num = state_shape(state, "pos_embed")[1] - 1 if "pos_embed" in state else 196
  side = int(round(num ** 0.5))
  if side * side != num:
    raise ValueError(f"pos_embed holds {num} patch positions, not a square grid; only square "
                     "inputs are supported")
  return side * model.total_stride()


FAMILY = Family(
    name="t2t",
    repository="yitu-opensource/T2T-ViT",
    marker=r"tokens_to_token\.",
    models={name: (name,) for name in (
        "t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24",
        "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24")},
    rules=_t2t_rules(),
    overrides=_t2t_overrides,
    image_size=_t2t_image_size,
    ignore=(r"pos_embed",))
