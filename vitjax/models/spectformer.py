"""SpectFormer (Patro, Namboodiri & Agneeswaran, 2023, "SpectFormer: Frequency and Attention is
what you need in a Vision Transformer"), vanilla (isotropic) architecture.

Structure of the official vanilla model: a stride-16 patch convolution, a learned position
table (no CLS token), `num_spectral` (the paper's alpha) spectral blocks, then standard
pre-norm MHSA blocks, a final LayerNorm, the mean over tokens and a linear head.

The spectral block is GFNet's block, a *single* residual around filter and MLP together:

    x <- x + DropPath(MLP(LN_2(SG(LN_1(x)))))

with SG the 'spectral_gating' mixer (`vitjax.ops.spectral`). It is registered as block
'spectral', so an all-spectral stack is a GFNet, e.g.
`create_model('vit_s16', block='spectral', mixer='spectral_gating', pool='gap')`.

`spectformer_s` is the official `spectformer-s`: width 384, depth 19 (4 spectral + 15
attention, 6 heads), MLP ratio 4, patch 16; 32,449,768 parameters at 224 px and 1000 classes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from vitjax.models import layers
from vitjax.models.backbone import (Classifier, Encoder, FeatureInfo, StageSpec, Tokens,
                                    build_mixer, call_mixer, check_feature_blocks)
from vitjax.models.registry import register_block, register_model


@register_block("spectral")
class SpectralBlock(nn.Module):
  """GFNet / SpectFormer spectral block: x + DropPath(MLP(LN(mixer(LN(x)))))."""
  mlp_dim: int
  mixer: Any = "spectral_gating"
  mixer_kwargs: Any = None
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    x = tokens.x
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    mixer = build_mixer(self.mixer, dict(dropout=self.dropout), self.mixer_kwargs)
    y = call_mixer(mixer, y, tokens, train=train)
    y = nn.LayerNorm(name="LayerNorm_1")(y)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, name="MlpBlock_0")(y, train=train)
    return tokens.replace(x=x + layers.DropPath(self.drop_path)(y, train=train))


class SpectFormer(Classifier):
  """Vanilla SpectFormer classifier (mean-pooled, no CLS token).

  The encoder is two stages without downsampling: `num_spectral` spectral blocks, then
  `depth - num_spectral` MHSA blocks, with vit_jax's `Transformer` names (posembed_input,
  encoderblock_{i}, encoder_norm); the drop-path rate rises linearly over all `depth` blocks,
  as in the official code. Features as the ViT's (`feature_blocks`).
  """
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 384
  depth: int = 19
  num_spectral: int = 4
  mlp_dim: int = 1536
  num_heads: int = 6
  filter_size: tuple[int, int] | None = None  # grid the spectral filters are built for
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zero_init: bool = False
  feature_blocks: tuple[int, ...] | None = None

  def feature_info(self) -> list[FeatureInfo]:
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    return [FeatureInfo(name, self.width, self.patch_size)
            for name in ["stem"] + [f"stage{i + 1}" for i in range(len(blocks))]]

  def stage_specs(self) -> tuple[StageSpec, ...]:
    spectral = StageSpec(self.num_spectral, self.width, block=SpectralBlock, block_kwargs=dict(
        mlp_dim=self.mlp_dim, mixer_kwargs=dict(filter_size=self.filter_size),
        dropout=self.dropout))
    attention = StageSpec(self.depth - self.num_spectral, self.width, block="vit", block_kwargs=dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, attn_impl=self.attn_impl,
        dropout=self.dropout))
    return spectral, attention

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    if not 0 <= self.num_spectral <= self.depth:
      raise ValueError(
          f"num_spectral={self.num_spectral} must lie in [0, depth={self.depth}]")
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    layers.check_images(images, self.patch_size)
    x = layers.patch_conv(self.width, self.patch_size)(images)         # (B, h, w, D)
    out = {"stem": x}
    tokens, taps = Encoder(stages=self.stage_specs(), drop_path=self.drop_path,
                           posemb_dropout=self.dropout, collect=blocks if features else (),
                           name="Transformer")(Tokens.from_map(x), train=train)
    if features:
      out.update({f"stage{i + 1}": taps[k].patch_map() for i, k in enumerate(blocks)})
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.truncated_normal(0.02)
    return self.classify(tokens.x.mean(axis=1), out, features, kernel_init=init)


@register_model("spectformer_s")
def spectformer_s(**overrides):
  """Official `spectformer-s` (vanilla): 384 wide, 19 deep (alpha = 4), 6 heads, patch 16."""
  kwargs = {**dict(patch_size=16, width=384, depth=19, num_spectral=4, mlp_dim=1536, num_heads=6),
            **overrides}
  layers.check_overrides(SpectFormer, kwargs, what="SpectFormer")
  return SpectFormer(**kwargs)
