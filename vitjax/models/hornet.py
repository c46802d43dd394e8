"""HorNet (Rao et al., NeurIPS 2022, "HorNet: Efficient High-Order Spatial Interactions with
Recursive Gated Convolutions"): a ConvNeXt-style hierarchical backbone whose token mixer is gnConv.

Official structure (raoyongming/HorNet, hornet.py), NHWC here:
  stem      4x4 stride-4 conv -> LayerNorm
  stage i   (i > 0: LayerNorm -> 2x2 stride-2 conv, doubling the width) then depths[i] blocks
  block     x + DropPath(gamma_1 * gnConv(LN(x))),  x + DropPath(gamma_2 * MLP(LN(x)))
            (layer scale gamma initialised to 1e-6, MLP ratio 4, exact GELU)
  head      mean over the grid -> LayerNorm -> Linear
gnConv orders are 2, 3, 4, 5 in the four stages, its scale s = 1/3. The GF variants replace the
depthwise 7x7 conv of stages 3 and 4 by the global-local filter, whose Fourier filters are built
for the stage grid at init (14x14 and 7x7 at 224 px, the official 14x8 and 7x4 rfft sizes).

The block is registered as 'hornet' and works on the token carry, so any stack of blocks can use
it, e.g. an isotropic HorNet-style ViT: `create_model('vit_s16', block='hornet', mixer='gnconv',
pool='gap')`. The mixer is `vitjax.models.spectral_mixers.GnConv`.

Parameter counts at 224 px, 1000 classes, equal to the official module structure (the README
rounds them to whole millions): hornet_t 22,409,512 (README 22M), hornet_t_gf 22,991,848 (23M),
hornet_s 49,528,264 (50M), hornet_s_gf 50,401,768 (50M), hornet_b 87,256,680 (87M),
hornet_b_gf 88,421,352 (88M).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import (MultiStageModel, StageNames, StageSpec, Tokens, build_mixer,
                                    call_mixer, check_per_stage)
from vitjax.models.registry import register_block, register_model
from vitjax.models.spectral_mixers import GNCONV_VARIANTS

trunc_normal = nn.initializers.truncated_normal


@register_block("hornet")
class HorNetBlock(nn.Module):
  """HorNet / ConvNeXt-style block with layer scale; the mixer (default 'gnconv') needs the grid."""
  mlp_dim: int
  mixer: Any = "gnconv"
  mixer_kwargs: Any = None
  layer_scale_init: float = 1e-6  # <= 0 turns layer scale off, as in the official code
  dropout: float = 0.0
  drop_path: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  def _layer_scale(self, name, y):
    if self.layer_scale_init <= 0:
      return y
    gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (y.shape[-1],),
                       jnp.float32)
    return gamma * y

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    x = tokens.x                                                        # (B, N, C)
    y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    y = call_mixer(build_mixer(self.mixer, dict(dropout=self.dropout), self.mixer_kwargs), y,
                   tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(self._layer_scale("gamma1", y), train=train)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, kernel_init=self.kernel_init,
                        bias_init=nn.initializers.zeros, name="mlp")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(self._layer_scale("gamma2", y), train=train)
    return tokens.replace(x=x)


class HorNet(MultiStageModel):
  """Hierarchical HorNet classifier (four stages, widths base_dim * (1, 2, 4, 8)).

  The parameter layout is flat, as before the multi-stage backbone existed (`stem_conv`,
  `downsample_{i}_norm`, `stage_{i}_block_{j}`, ...), so older checkpoints load unchanged.
  """
  num_classes: int = 1000
  depths: tuple[int, ...] = (2, 3, 18, 2)
  base_dim: int = 64
  orders: tuple[int, ...] = (2, 3, 4, 5)
  variants: tuple[str, ...] = ("dwconv",) * 4   # per stage: 'dwconv' (7x7) or 'gf'
  kernel_size: int = 7
  scale: float = 1.0 / 3.0
  filter_sizes: Any = None                       # per-stage GF grid; None: the init grid
  mlp_ratio: int = 4
  layer_scale_init: float = 1e-6
  dropout: float = 0.0
  drop_path: float = 0.0
  head_init_scale: float = 1.0

  STAGE_NAMES: ClassVar[StageNames] = StageNames(stage=None, block="stage_{i}_block_{j}",
                                                 downsample="downsample_{i}")

  def check(self):
    check_per_stage(self, ("orders", "variants"))
    for v in self.variants:
      choices.check("variants entry", v, GNCONV_VARIANTS)

  def stem_stride(self) -> int:
    return 4

  def stem(self, images, *, train: bool):
    x = nn.Conv(self.base_dim, (4, 4), strides=(4, 4), padding="VALID",
                kernel_init=trunc_normal(0.02), name="stem_conv")(images)
    return nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)              # (B, H/4, W/4, C0)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    specs = []
    for i, depth in enumerate(self.depths):
      dim = self.base_dim * 2 ** i
      mixer_kwargs = dict(order=self.orders[i], variant=self.variants[i],
                          kernel_size=self.kernel_size, scale=self.scale,
                          filter_size=None if self.filter_sizes is None else self.filter_sizes[i])
      down = None if i == 0 else dict(norm_name=f"downsample_{i}_norm",
                                      conv_name=f"downsample_{i}_conv")
      specs.append(StageSpec(
          depth, dim, block=HorNetBlock,
          block_kwargs=dict(mlp_dim=self.mlp_ratio * dim, mixer_kwargs=mixer_kwargs,
                            layer_scale_init=self.layer_scale_init, dropout=self.dropout),
          downsample=None if i == 0 else "norm_conv", downsample_kwargs=down))
    return tuple(specs)

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-6, name="norm")(tokens.x.mean(axis=1))  # (B, C3)

  def head_init(self):
    return lambda key, shape, dtype=jnp.float32: (
        trunc_normal(0.02)(key, shape, dtype) * self.head_init_scale)


# All official ImageNet-1k HorNets: depths (2, 3, 18, 2), orders (2, 3, 4, 5), s = 1/3; the GF
# variants use the global-local filter in the last two stages.
_GF = ("dwconv", "dwconv", "gf", "gf")
_BASE = dict(depths=(2, 3, 18, 2), orders=(2, 3, 4, 5))
VARIANTS = {
    "hornet_t": dict(_BASE, base_dim=64, variants=("dwconv",) * 4),
    "hornet_t_gf": dict(_BASE, base_dim=64, variants=_GF),
    "hornet_s": dict(_BASE, base_dim=96, variants=("dwconv",) * 4),
    "hornet_s_gf": dict(_BASE, base_dim=96, variants=_GF),
    "hornet_b": dict(_BASE, base_dim=128, variants=("dwconv",) * 4),
    "hornet_b_gf": dict(_BASE, base_dim=128, variants=_GF),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(HorNet, kwargs, what="HorNet")
  return HorNet(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
