"""Vision Transformer (Dosovitskiy et al., 2021) on the common backbone.

Parameter names follow vit_jax (`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head`), so vit_jax and
big_vision checkpoints map onto it by name. Swap the token mixer with
`create_model('vit_s16', mixer='urpe')`, and take the plug-ins of `vitjax.models.plugins` as
switches: `create_model('vit_s16', posemb='rpe2d', norm='dtn', token_reduction='ltm',
reduction_blocks=(4, 8), keep_ratio=0.7)`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers, plugins
from vitjax.models.backbone import (Classifier, Encoder, FeatureInfo, Tokens,
                                    check_feature_blocks)
from vitjax.models.registry import register_model

POOLS = ("tok", "gap")


class VisionTransformer(Classifier):
  """ViT classifier: patches (+CLS) -> learned positions -> blocks -> pool -> linear head.

  Features: 'stem' is the patch embedding, 'stage1'..'stageK' the patch tokens after the blocks
  in `feature_blocks` (default: up to four spread evenly, ending at the last block), all at
  stride `patch_size`.
  """
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = "tok"                 # 'tok' (CLS token) or 'gap' (mean of patch tokens)
  block: Any = "vit"
  mixer: Any = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zero_init: bool = True
  feature_blocks: tuple[int, ...] | None = None
  block_kwargs: Any = None          # extra fields of every block (e.g. a 'vit_parallel' block's)
  # Plug-ins (vitjax.models.plugins): positions, the blocks' norm, token reduction.
  posemb: Any = "learn"
  posemb_kwargs: Any = None
  norm: Any = "ln"
  norm_kwargs: Any = None
  token_reduction: Any = "none"
  reduction_blocks: tuple[int, ...] = ()
  keep_ratio: float = 1.0
  reduction_kwargs: Any = None

  def feature_info(self) -> list[FeatureInfo]:
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    return [FeatureInfo(name, self.width, self.patch_size)
            for name in ["stem"] + [f"stage{i + 1}" for i in range(len(blocks))]]

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    choices.check("pool", self.pool, POOLS)
    plugins.check_switches(posemb=self.posemb, norm=self.norm,
                           token_reduction=self.token_reduction,
                           reduction_blocks=self.reduction_blocks, keep_ratio=self.keep_ratio)
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    layers.check_images(images, self.patch_size)
    x = layers.patch_conv(self.width, self.patch_size)(images)  # (B, h, w, D)
    out = {"stem": x}
    tokens = Tokens.from_map(x)
    b, _, d = tokens.x.shape
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), x.dtype)
      tokens = tokens.replace(x=jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens.x], 1),
                              num_prefix=1)
    block_kwargs = dict(mlp_dim=self.mlp_dim, mixer=self.mixer, mixer_kwargs=self.mixer_kwargs,
                        **dict(self.block_kwargs or {}))
    if self.norm != "ln" or self.norm_kwargs:
      block_kwargs.update(norm=self.norm, norm_kwargs=self.norm_kwargs)
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    tokens, taps = Encoder(self.depth, block=self.block, block_kwargs=block_kwargs, shared=shared,
                           drop_path=self.drop_path, posemb=self.posemb,
                           posemb_kwargs=self.posemb_kwargs, token_reduction=self.token_reduction,
                           reduction_blocks=self.reduction_blocks, keep_ratio=self.keep_ratio,
                           reduction_kwargs=self.reduction_kwargs,
                           collect=blocks if features else (), name="Transformer")(
                               tokens, train=train)
    if features:
      late = [k for k in blocks if taps[k].grid is None]
      if late:
        raise ValueError(
            f"feature_blocks={blocks}: blocks {late} run after a token reducer "
            f"(token_reduction={self.token_reduction!r} before blocks {tuple(self.reduction_blocks)}), "
            "whose tokens no longer lie on a grid; choose feature blocks before the first reducer")
      out.update({f"stage{i + 1}": taps[k].patch_map() for i, k in enumerate(blocks)})
    if self.pool == "tok":
      x = tokens.x[:, 0]
    else:
      mask = None if tokens.mask is None else tokens.mask[:, tokens.num_prefix:]
      x = plugins.masked_mean(tokens.x[:, tokens.num_prefix:], mask)
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    return self.classify(x, out, features, kernel_init=init)


# Sizes of the registered variants, as timm's entry functions give them. The patch-4 variants are
# for 28-32 px inputs (Fashion-MNIST, CIFAR); `nano` is small enough to train in minutes on a
# laptop CPU.
VARIANTS = {
    "vit_ti16": dict(patch_size=16, width=192, depth=12, mlp_dim=768, num_heads=3),
    "vit_s16": dict(patch_size=16, width=384, depth=12, mlp_dim=1536, num_heads=6),
    "vit_b16": dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12),
    "vit_l16": dict(patch_size=16, width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "vit_b32": dict(patch_size=32, width=768, depth=12, mlp_dim=3072, num_heads=12),
    "vit_nano4": dict(patch_size=4, width=128, depth=6, mlp_dim=512, num_heads=4),
    "vit_ti4": dict(patch_size=4, width=192, depth=12, mlp_dim=768, num_heads=3),
    "vit_s4": dict(patch_size=4, width=384, depth=12, mlp_dim=1536, num_heads=6),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(VisionTransformer, kwargs, what="VisionTransformer")
  return VisionTransformer(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
