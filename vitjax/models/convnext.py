"""ConvNeXt (Liu et al., CVPR 2022, "A ConvNet for the 2020s"): a ResNet modernised step by step
towards a Swin-like design, on the multi-stage backbone.

Structure (facebookresearch/ConvNeXt and timm's `convnext.py`), NHWC here:
  stem      4x4 stride-4 conv -> LayerNorm                               (B, H/4, W/4, C0)
  stage i   (i > 0: the 'norm_conv' downsample, LayerNorm -> 2x2 stride-2 conv to C_i)
            then depths[i] blocks of width C_i
  block     y = dwconv7x7(x)           depthwise, with bias
            y = W2 GELU(W1 LN(y))      inverted bottleneck, hidden 4 C (exact GELU)
            x = x + DropPath(gamma * y) layer scale gamma initialised to 1e-6
  head      mean over the grid -> LayerNorm -> Linear (timm's `head.norm`, `head.fc`)
All LayerNorms use eps 1e-6. Features (`apply(..., features=True)`) are the stem output, the
output of each stage (stage4 is timm's `forward_features`, before the head norm) and the normed
pooled vector (`pre_logits`).

timm builds atto/femto/pico/nano with `conv_mlp=True`: 1x1 convolutions and a channels-first
LayerNorm in place of the Linear layers and the channels-last one. On an NHWC map that is the same
function, so vitjax has one form; the converter reshapes timm's (out, in, 1, 1) weights.

The depthwise convolution is `vitjax.ops.conv.depthwise_conv_same` (dwconv_impl 'auto' /
'shift' / 'xla', same parameters and numbers): XLA's grouped convolution on GPU/TPU, a fused sum
of shifted slices on CPU,
where XLA:CPU's grouped convolution is the slowest op of the model. XLA's cost analysis counts the
'xla' form without the taps that fall on the zero padding and the 'shift' form with them, so the
GMACs the runner reports on CPU are a little higher (convnext_tiny at 224 px: 4.48 vs 4.60).

The block is registered as 'convnext' and works on the token carry, so it can be stacked by any
model that keeps a 2-D grid (it has no place for prefix tokens).

Parameter counts at 1000 classes, equal to timm's (tests/test_convnext.py pins them):
convnext_atto 3,695,520, convnext_femto 5,217,784, convnext_pico 9,045,672, convnext_nano
15,593,560, convnext_tiny 28,589,128 (paper 28M, 4.5 GMACs at 224 px), convnext_small 50,223,688
(50M), convnext_base 88,591,464 (89M), convnext_large 197,767,336 (198M).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import MultiStageModel, StageSpec, Tokens
from vitjax.models.registry import register_block, register_model
from vitjax.ops import conv as conv_ops
from vitjax.ops.conv import DWCONV_IMPLS

trunc_normal = nn.initializers.truncated_normal

class DepthwiseConv(nn.Module):
  """k x k depthwise convolution with bias; an `nn.Conv(C, (k, k), feature_group_count=C)`'s
  parameters (`kernel` (k, k, 1, C), `bias` (C,)), computed by `ops.conv.depthwise_conv_same`."""
  kernel_size: int = 7
  impl: str = "auto"
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return conv_ops.depthwise_conv_same(x, kernel, bias, impl=self.impl)


@register_block("convnext")
class ConvNeXtBlock(nn.Module):
  """x + DropPath(gamma * MLP(LN(dwconv(x)))) on the patch map of the token carry.

  Parameters: `conv_dw` (`kernel` (k, k, 1, C), `bias`), `norm`, `mlp` (`Dense_0` C -> mlp_dim,
  `Dense_1` back), `gamma` (C,) unless layer_scale_init <= 0.
  """
  mlp_dim: int
  kernel_size: int = 7
  layer_scale_init: float = 1e-6   # <= 0 turns layer scale off (timm: ls_init_value=None)
  dwconv_impl: str = "auto"        # see `ops.conv.depthwise_conv_same`
  drop_path: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if tokens.num_prefix:
      raise ValueError(f"block 'convnext' works on a patch map; the tokens carry "
                       f"{tokens.num_prefix} prefix token(s)")
    x = tokens.patch_map()                                              # (B, h, w, C)
    c = x.shape[-1]
    y = DepthwiseConv(self.kernel_size, self.dwconv_impl, self.kernel_init, name="conv_dw")(x)
    y = nn.LayerNorm(epsilon=1e-6, name="norm")(y)
    y = layers.MlpBlock(self.mlp_dim, kernel_init=self.kernel_init,
                        bias_init=nn.initializers.zeros, name="mlp")(y, train=train)
    if self.layer_scale_init > 0:
      gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (c,),
                         jnp.float32)
      y = gamma * y
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return tokens.replace(x=x.reshape(tokens.x.shape))


class ConvNeXt(MultiStageModel):
  """Hierarchical ConvNeXt classifier: stem, len(depths) stages of widths `dims`, norm-pool head.

  Parameter tree: `stem_conv`, `stem_norm`, `stages_{i}/downsample/{norm,conv}` (i > 0),
  `stages_{i}/blocks_{j}/{conv_dw,norm,mlp,gamma}`, `head_norm`, `head`.
  """
  num_classes: int = 1000
  depths: tuple[int, ...] = (3, 3, 9, 3)
  dims: tuple[int, ...] = (96, 192, 384, 768)
  patch_size: int = 4            # the stem's stride (and kernel)
  kernel_size: int = 7           # of the depthwise convolution
  mlp_ratio: int = 4
  layer_scale_init: float = 1e-6
  dwconv_impl: str = "auto"      # 'auto', 'shift' or 'xla' (see `depthwise_conv`)
  drop_path: float = 0.0
  head_init_scale: float = 1.0

  def check(self):
    depths, dims = tuple(self.depths), tuple(self.dims)
    if not depths or len(depths) != len(dims):
      raise ValueError(f"depths={depths} and dims={dims} need one entry per stage each (allowed: "
                       "two non-empty tuples of the same length)")
    for field, values in (("depths", depths), ("dims", dims)):
      if any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{field}={values}: allowed values are positive integers")
    for field in ("patch_size", "mlp_ratio"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)}: allowed values are integers >= 1")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size={self.kernel_size}: allowed values are odd integers >= 1")
    choices.check("dwconv_impl", self.dwconv_impl, DWCONV_IMPLS)

  def stem_stride(self) -> int:
    return self.patch_size

  def stem(self, images, *, train: bool):
    p = self.patch_size
    x = nn.Conv(self.dims[0], (p, p), strides=(p, p), padding="VALID",
                kernel_init=trunc_normal(0.02), name="stem_conv")(images)
    return nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)             # (B, H/p, W/p, C0)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(depth, dim, block=ConvNeXtBlock,
                  block_kwargs=dict(mlp_dim=self.mlp_ratio * dim, kernel_size=self.kernel_size,
                                    layer_scale_init=self.layer_scale_init,
                                    dwconv_impl=self.dwconv_impl),
                  downsample=None if i == 0 else "norm_conv")
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)))

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-6, name="head_norm")(tokens.x.mean(axis=1))  # (B, C_last)

  def head_init(self):
    return lambda key, shape, dtype=jnp.float32: (
        trunc_normal(0.02)(key, shape, dtype) * self.head_init_scale)


# timm's variants (convnext.py): atto..nano are timm's own small models, tiny..large the paper's.
VARIANTS = {
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(ConvNeXt, kwargs, what="ConvNeXt")
  for field in ("depths", "dims"):   # lists from JSON / the command line
    kwargs[field] = tuple(kwargs[field])
  return ConvNeXt(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
