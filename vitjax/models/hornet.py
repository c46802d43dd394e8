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
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers
from vitjax.models.backbone import Tokens, build_mixer, call_mixer
from vitjax.models.registry import register_block, register_model
from vitjax.models.spectral_mixers import GNCONV_VARIANTS

trunc_normal = nn.initializers.truncated_normal


@register_block("hornet")
class HorNetBlock(nn.Module):
  """HorNet / ConvNeXt-style block with layer scale; the mixer (default 'gnconv') needs the grid."""
  mlp_dim: int
  mixer: str = "gnconv"
  mixer_kwargs: Any = None
  layer_scale_init: float = 1e-6  # <= 0 turns layer scale off, as in the official code
  num_heads: int = 1              # shared mixer fields (see backbone.build_mixer); gnconv
  attn_impl: str = "xla"          # uses neither, other mixers may
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
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(self._layer_scale("gamma1", y), train=train)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, kernel_init=self.kernel_init,
                        bias_init=nn.initializers.zeros, name="mlp")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(self._layer_scale("gamma2", y), train=train)
    return tokens.replace(x=x)


class HorNet(nn.Module):
  """Hierarchical HorNet classifier (four stages, widths base_dim * (1, 2, 4, 8))."""
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

  def _check(self, images):
    n = len(self.depths)
    for field in ("orders", "variants"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"{field} needs one entry per stage ({n}); got {getattr(self, field)}")
    for v in self.variants:
      if v not in GNCONV_VARIANTS:
        raise ValueError(
            f"Unknown variants entry {v!r}. Allowed values: {', '.join(GNCONV_VARIANTS)}.")
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (B, H, W, C); got shape {images.shape}")
    stride = 4 * 2 ** (n - 1)
    if images.shape[1] % stride or images.shape[2] % stride:
      raise ValueError(
          f"data.image_size: image size {images.shape[1]}x{images.shape[2]} is not divisible "
          f"by the total stride {stride}; allowed values are multiples of {stride}")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check(images)
    conv = functools.partial(nn.Conv, padding="VALID", kernel_init=trunc_normal(0.02))
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6)
    total = sum(self.depths)
    x = conv(self.base_dim, (4, 4), strides=(4, 4), name="stem_conv")(images)
    x = norm(name="stem_norm")(x)                                       # (B, H/4, W/4, C0)
    k = 0
    for i, depth in enumerate(self.depths):
      dim = self.base_dim * 2 ** i
      if i > 0:
        x = norm(name=f"downsample_{i}_norm")(x)
        x = conv(dim, (2, 2), strides=(2, 2), name=f"downsample_{i}_conv")(x)
      b, h, w, _ = x.shape
      mixer_kwargs = dict(order=self.orders[i], variant=self.variants[i],
                          kernel_size=self.kernel_size, scale=self.scale,
                          filter_size=None if self.filter_sizes is None else self.filter_sizes[i])
      tokens = Tokens(x.reshape(b, h * w, dim), grid=(h, w), num_prefix=0)
      for j in range(depth):
        rate = self.drop_path * k / max(total - 1, 1)
        tokens = HorNetBlock(self.mlp_ratio * dim, mixer_kwargs=mixer_kwargs,
                             layer_scale_init=self.layer_scale_init, dropout=self.dropout,
                             drop_path=rate, name=f"stage_{i}_block_{j}")(tokens, train=train)
        k += 1
      x = tokens.x.reshape(b, h, w, dim)
    x = norm(name="norm")(x.mean(axis=(1, 2)))                          # (B, C3)
    scaled = lambda key, shape, dtype=jnp.float32: (  # noqa: E731
        trunc_normal(0.02)(key, shape, dtype) * self.head_init_scale)
    return nn.Dense(self.num_classes, kernel_init=scaled, name="head")(x)


# name: (base_dim, variants). All official ImageNet-1k HorNets: depths (2, 3, 18, 2), orders
# (2, 3, 4, 5), s = 1/3; GF in the last two stages.
_GF = ("dwconv", "dwconv", "gf", "gf")
VARIANTS = {
    "hornet_t": (64, ("dwconv",) * 4),
    "hornet_t_gf": (64, _GF),
    "hornet_s": (96, ("dwconv",) * 4),
    "hornet_s_gf": (96, _GF),
    "hornet_b": (128, ("dwconv",) * 4),
    "hornet_b_gf": (128, _GF),
}


def _factory(spec, **overrides):
  base_dim, variants = spec
  kwargs = dict(depths=(2, 3, 18, 2), base_dim=base_dim, orders=(2, 3, 4, 5), variants=variants)
  kwargs.update(overrides)
  layers.check_overrides(HorNet, kwargs, what="HorNet")
  return HorNet(**kwargs)


for _name, _spec in VARIANTS.items():
  register_model(_name)(functools.partial(_factory, _spec))
