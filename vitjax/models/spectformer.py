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
from vitjax.models.backbone import EncoderBlock, Tokens, build_mixer, call_mixer
from vitjax.models.registry import register_block, register_model
from vitjax.models.vit import check_images, patch_conv


@register_block("spectral")
class SpectralBlock(nn.Module):
  """GFNet / SpectFormer spectral block: x + DropPath(MLP(LN(mixer(LN(x)))))."""
  mlp_dim: int
  mixer: str = "spectral_gating"
  mixer_kwargs: Any = None
  num_heads: int = 1        # shared mixer fields (see backbone.build_mixer), passed on to a
  attn_impl: str = "xla"    # mixer that declares them; spectral_gating uses neither
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    x = tokens.x
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    mixer = build_mixer(self.mixer, shared, self.mixer_kwargs)
    y = call_mixer(mixer, y, tokens, train=train)
    y = nn.LayerNorm(name="LayerNorm_1")(y)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, name="MlpBlock_0")(y, train=train)
    return tokens.replace(x=x + layers.DropPath(self.drop_path)(y, train=train))


class SpectFormerEncoder(nn.Module):
  """Positions, `num_spectral` spectral blocks, `depth - num_spectral` MHSA blocks, final norm.

  Names follow vit_jax's `Transformer` (posembed_input, encoderblock_{i}, encoder_norm); the
  drop-path rate rises linearly over all `depth` blocks, as in the official code.
  """
  depth: int
  num_spectral: int
  mlp_dim: int
  num_heads: int
  filter_size: tuple[int, int] | None = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    tokens = tokens.replace(x=layers.AddPositionEmbs(name="posembed_input")(tokens.x))
    tokens = tokens.replace(x=nn.Dropout(self.dropout, deterministic=not train)(tokens.x))
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      if i < self.num_spectral:
        block = SpectralBlock(self.mlp_dim, mixer_kwargs=dict(filter_size=self.filter_size),
                              dropout=self.dropout, drop_path=rate, name=f"encoderblock_{i}")
      else:
        block = EncoderBlock(self.mlp_dim, self.num_heads, attn_impl=self.attn_impl,
                             dropout=self.dropout, drop_path=rate, name=f"encoderblock_{i}")
      tokens = block(tokens, train=train)
    return tokens.replace(x=nn.LayerNorm(name="encoder_norm")(tokens.x))


class SpectFormer(nn.Module):
  """Vanilla SpectFormer classifier (mean-pooled, no CLS token)."""
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

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if not 0 <= self.num_spectral <= self.depth:
      raise ValueError(
          f"num_spectral={self.num_spectral} must lie in [0, depth={self.depth}]")
    check_images(images, self.patch_size)
    x = patch_conv(self.width, self.patch_size)(images)                # (B, h, w, D)
    b, h, w, d = x.shape
    tokens = Tokens(x.reshape(b, h * w, d), grid=(h, w), num_prefix=0)
    tokens = SpectFormerEncoder(
        self.depth, self.num_spectral, self.mlp_dim, self.num_heads,
        filter_size=self.filter_size, attn_impl=self.attn_impl, dropout=self.dropout,
        drop_path=self.drop_path, name="Transformer")(tokens, train=train)
    x = tokens.x.mean(axis=1)                                           # (B, D)
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.truncated_normal(0.02)
    return nn.Dense(self.num_classes, kernel_init=init, name="head")(x)


@register_model("spectformer_s")
def spectformer_s(**overrides):
  """Official `spectformer-s` (vanilla): 384 wide, 19 deep (alpha = 4), 6 heads, patch 16."""
  kwargs = dict(patch_size=16, width=384, depth=19, num_spectral=4, mlp_dim=1536, num_heads=6)
  kwargs.update(overrides)
  layers.check_overrides(SpectFormer, kwargs, what="SpectFormer")
  return SpectFormer(**kwargs)
