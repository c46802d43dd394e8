"""Dynamic Token Normalization (Shao et al., ICLR 2022): the norm plug-in `norm='dtn'` and the
official ViT-T* model it was released with.

  norm='dtn'   - `DynamicTokenNorm`, a block norm for any ViT on a token grid (the math and
                 what happens to a class token, a token mask and large grids are in
                 `vitjax.ops.dtn`): `create_model('vit_nano4', norm='dtn')`,
                 `create_model('vit_s16', norm='dtn', norm_kwargs=dict(pool_size=7))`.
  vit_ti16_star_dtn - ViT-T* with DTN, the official `vit_norm_ti_star(norm_type='dtn')`
                 (wqshao126/DTN, models/vit_norm_mix.py), 5,710,792 parameters.

ViT-T* (the official `VisionTransformer` of vit_norm_mix.py, ConViT's layout):
  patches   16x16 conv -> + learned positions (patch tokens only, 14 x 14 at 224 px)
  blocks    the first depth - cls_blocks (10): pre-norm blocks with DTN (heads = the block's
            heads) on the 196 patch tokens; then the learned class token is prepended
            (`Transformer/cls_token`) and the last cls_blocks (2) use LayerNorm (eps 1e-5);
            the official `local_up_to_layer` is depth - cls_blocks
  block     x + MHSA(N(x)), x + MLP(N(x)): MHSA without qkv bias, MLP ratio 4, exact GELU
  head      LayerNorm (eps 1e-5, `encoder_norm`) -> class token -> Linear
Width 192, depth 12, 4 heads (ViT-Ti has 3). `norm='ln'` gives the paper's ViT-T* LN baseline.
`vitjax.convert.from_official` loads the official weights (DTN and LN models).

Parameters of a DTN layer (official name): `scale` / `bias` (weight / bias: gamma, beta),
`lambda_mean` / `lambda_var` (mean_norm_weight / var_norm_weight: the mixing weights before the
sigmoid, zero at init, i.e. lambda = 1/2), `pos_proj/{kernel,bias}` (pos_proj: the 3 -> H map of
the relative positions, with the official locality init).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers, plugins
from vitjax.models.backbone import (Classifier, Encoder, FeatureInfo, StageSpec, Tokens,
                                    check_feature_blocks)
from vitjax.models.registry import register_model
from vitjax.ops import dtn as dtn_ops

trunc_normal = nn.initializers.truncated_normal


@plugins.register_norm("dtn")
class DynamicTokenNorm(nn.Module):
  """DTN over (B, T, C) tokens; `tokens` gives the grid, the prefix and the mask.

  num_heads: H, the groups the statistics are mixed per (officially the block's heads). None
    takes the enclosing block's `num_heads` (a 'vit' block's norm receives no block fields).
  eps: of the RMS pre-normalisation and of the final division (1e-5).
  pool_size: grids whose longer side exceeds it are pooled for the instance statistics
    (`vitjax.ops.dtn.pool_factor`; 14 officially).
  ddof: 1 (the official unbiased LN variance) or 0.
  only_var: mix the variances only (the official 'dtn_var'; no `lambda_mean`).
  locality_strength / local_init: the official init of `pos_proj`.
  """
  num_heads: int | None = None
  eps: float = 1e-5
  pool_size: int = 14
  ddof: int = 1
  only_var: bool = False
  locality_strength: float = 1.0
  local_init: bool = True

  def heads(self) -> int:
    heads = self.num_heads
    if heads is None:
      heads = getattr(self.parent, "num_heads", None)
    if not isinstance(heads, int) or heads < 1:
      raise ValueError("norm 'dtn' needs num_heads (a positive integer): give "
                       "norm_kwargs=dict(num_heads=...) where its block has no num_heads")
    return heads

  def pos_init(self, heads: int):
    local, covered = dtn_ops.locality_init(heads)

    def init(key, shape, dtype=jnp.float32):
      kernel = trunc_normal(0.02)(key, shape, dtype)
      if self.local_init:
        kernel = jnp.where(covered, jnp.asarray(local, dtype), kernel) * self.locality_strength
      return kernel
    return init

  @nn.compact
  def __call__(self, x, *, tokens: Tokens | None = None):
    if tokens is None or tokens.grid is None:
      raise ValueError("norm 'dtn' needs the tokens on a 2-D grid (its instance statistics "
                       "weigh tokens by their relative positions), but these tokens have none "
                       "(a token reducer before it gathers or merges tokens); use norm='ln' "
                       "there or a reducer that drops by masking")
    heads, c = self.heads(), x.shape[-1]
    if c % heads:
      raise ValueError(f"norm 'dtn': num_heads={heads} must divide the width {c}")
    if self.ddof not in (0, 1):
      raise ValueError(f"norm 'dtn': ddof={self.ddof!r}; allowed values are 0 and 1")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    lambda_mean = (None if self.only_var else
                   self.param("lambda_mean", nn.initializers.zeros, (heads,), jnp.float32))
    lambda_var = self.param("lambda_var", nn.initializers.zeros, (heads,), jnp.float32)
    pos_kernel, pos_bias = layers.DenseParams((3,), (heads,), True, self.pos_init(heads),
                                              nn.initializers.zeros, name="pos_proj")()
    return dtn_ops.dtn(x, scale, bias, lambda_mean, lambda_var, pos_kernel, pos_bias,
                       grid=tokens.grid, num_heads=heads, num_prefix=tokens.num_prefix,
                       eps=self.eps, pool_size=self.pool_size, ddof=self.ddof,
                       mask=tokens.mask).astype(x.dtype)


class StarVisionTransformer(Classifier):
  """ViT* of the DTN paper (module docstring): blocks with `norm` on the patch tokens, then the
  class token and `cls_blocks` LayerNorm blocks.

  Features: 'stem' (the patch embedding) and the patch tokens after each of `feature_blocks`
  (default: four spread over the depth), all at stride `patch_size`.
  """
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  mlp_dim: int = 768
  num_heads: int = 4
  cls_blocks: int = 2             # the official depth - local_up_to_layer
  qkv_bias: bool = False
  norm: Any = "dtn"
  norm_kwargs: Any = None
  eps: float = 1e-5               # the LayerNorms' (the last cls_blocks blocks, final)
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  feature_blocks: tuple[int, ...] | None = None

  def feature_info(self) -> list[FeatureInfo]:
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    return [FeatureInfo(name, self.width, self.patch_size)
            for name in ["stem"] + [f"stage{i + 1}" for i in range(len(blocks))]]

  def stage_specs(self) -> tuple[StageSpec, ...]:
    if not 1 <= self.cls_blocks <= self.depth:
      raise ValueError(f"cls_blocks={self.cls_blocks!r}: allowed values are 1..{self.depth} "
                       "(the last blocks, which see the class token)")
    first = self.depth - self.cls_blocks
    plugins.check_switches(norm=self.norm)
    norm_kwargs = dict(self.norm_kwargs or {})
    fields = layers.module_fields(plugins.get_norm(self.norm))
    if "num_heads" in fields:
      norm_kwargs.setdefault("num_heads", self.num_heads)
    if "epsilon" in fields:         # 'ln': torch's default eps, as the official LayerNorms
      norm_kwargs.setdefault("epsilon", self.eps)
    common = dict(mlp_dim=self.mlp_dim, mixer="mhsa", mixer_kwargs=dict(qkv_bias=self.qkv_bias))
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    late = StageSpec(self.cls_blocks, self.width, "vit",
                     dict(common, norm="ln", norm_kwargs=dict(epsilon=self.eps)), shared,
                     cls_token=True)
    if not first:
      return (late,)
    early = StageSpec(first, self.width, "vit",
                      dict(common, norm=self.norm, norm_kwargs=norm_kwargs), shared)
    return (early, late)

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    specs = self.stage_specs()
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    layers.check_images(images, self.patch_size)
    x = layers.patch_conv(self.width, self.patch_size)(images)             # (B, h, w, D)
    out = {"stem": x}
    tokens, taps = Encoder(stages=specs, drop_path=self.drop_path, posemb="learn",
                           final_norm=False, collect=blocks if features else (),
                           name="Transformer")(Tokens.from_map(x), train=train)
    if features:
      out.update({f"stage{i + 1}": taps[k].patch_map() for i, k in enumerate(blocks)})
    x = nn.LayerNorm(epsilon=self.eps, name="encoder_norm")(tokens.x)[:, 0]
    return self.classify(x, out, features, kernel_init=trunc_normal(0.02))


VARIANTS = {
    "vit_ti16_star_dtn": dict(patch_size=16, width=192, depth=12, mlp_dim=768, num_heads=4),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(StarVisionTransformer, kwargs, what="StarVisionTransformer")
  return StarVisionTransformer(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
