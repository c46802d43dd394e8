"""Vision Transformer (Dosovitskiy et al., 2021) on the common backbone.

Parameter names follow vit_jax (`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head`), so vit_jax and
big_vision checkpoints map onto it by name. Swap the token mixer with
`create_model('vit_s16', mixer='urpe')`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers
from vitjax.models.backbone import Encoder, Tokens
from vitjax.models.registry import register_model

POOLS = ("tok", "gap")


def check_images(images, patch_size: int, *, field: str = "data.image_size"):
  """Clear errors for the two input mistakes that would otherwise fail deep inside XLA."""
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (B, H, W, C); got shape {images.shape}")
  h, w = images.shape[1:3]
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"{field}: image size {h}x{w} is not divisible by patch_size={patch_size}; allowed "
        f"values are multiples of {patch_size}")


def patch_conv(width: int, patch_size: int) -> nn.Conv:
  """Non-overlapping patch embedding: a stride-P convolution named `embedding` (vit_jax)."""
  p = patch_size
  return nn.Conv(width, (p, p), strides=(p, p), padding="VALID", name="embedding")


class VisionTransformer(nn.Module):
  """ViT classifier: patches (+CLS) -> learned positions -> blocks -> pool -> linear head."""
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = "tok"                 # 'tok' (CLS token) or 'gap' (mean of patch tokens)
  block: str = "vit"
  mixer: str = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zero_init: bool = True

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"Unknown pool={self.pool!r}. Allowed values: {', '.join(POOLS)}.")
    check_images(images, self.patch_size)
    x = patch_conv(self.width, self.patch_size)(images)  # (B, h, w, D)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    num_prefix = 0
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
      num_prefix = 1
    block_kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, mixer=self.mixer,
                        mixer_kwargs=self.mixer_kwargs, attn_impl=self.attn_impl,
                        dropout=self.dropout)
    tokens = Encoder(self.depth, block=self.block, block_kwargs=block_kwargs,
                     drop_path=self.drop_path, name="Transformer")(
                         Tokens(x, grid=(h, w), num_prefix=num_prefix), train=train)
    x = tokens.x[:, 0] if self.pool == "tok" else tokens.x[:, num_prefix:].mean(axis=1)
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    return nn.Dense(self.num_classes, kernel_init=init, name="head")(x)


# name: (patch_size, width, depth, mlp_dim, num_heads). The patch-4 variants are for 28-32 px
# inputs (Fashion-MNIST, CIFAR); `nano` is small enough to train in minutes on a laptop CPU.
VARIANTS = {
    "vit_ti16": (16, 192, 12, 768, 3),
    "vit_s16": (16, 384, 12, 1536, 6),
    "vit_b16": (16, 768, 12, 3072, 12),
    "vit_l16": (16, 1024, 24, 4096, 16),
    "vit_b32": (32, 768, 12, 3072, 12),
    "vit_nano4": (4, 128, 6, 512, 4),
    "vit_ti4": (4, 192, 12, 768, 3),
    "vit_s4": (4, 384, 12, 1536, 6),
}


def _factory(**kwargs):
  layers.check_overrides(VisionTransformer, kwargs, what="VisionTransformer")
  return VisionTransformer(**kwargs)


for _name, _spec in VARIANTS.items():
  register_model(_name)(functools.partial(
      _factory, **dict(zip(("patch_size", "width", "depth", "mlp_dim", "num_heads"), _spec))))
