"""Swin Transformer (Liu et al., ICCV 2021, "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows") on the multi-stage backbone.

Structure (timm's `swin_transformer.py`, timm >= 0.9 layout), NHWC here:
  stem      p x p stride-p conv (patch embedding) -> LayerNorm                  (B, H/p, W/p, C)
  stage i   (i > 0: 'patch_merge', each 2x2 cell concatenated -> LayerNorm(4C) -> Linear(4C -> 2C)
            without bias) then depths[i] blocks of width C * 2^i
  block     x + DropPath(W-MSA(LN(x))),  x + DropPath(MLP(LN(x)))        (LayerNorm eps 1e-5,
            MLP ratio 4, exact GELU); blocks alternate plain windows (shift 0, W-MSA) and
            windows shifted by window // 2 (SW-MSA), starting with plain ones in every stage
  attn      'window_attn': multi-head attention inside M x M windows with a learned relative
            position bias B (a (2M-1)^2 x heads table, `vitjax.ops.windows`); shifted windows roll
            the map by -M/2 first and mask pairs from different regions of the rolled map
  head      LayerNorm -> mean over the tokens -> Linear
A window at least as large as a stage's map is clipped to the map and not shifted (timm's rule,
e.g. the 7x7 last stage at 224 px). A map that windows do not tile is zero-padded at the bottom
and right, the padded positions masked (`vitjax.ops.windows.window_attention`).

The mixer 'window_attn' (fields `window`, `shift`) works in any block that passes the grid, e.g.
`create_model('vit_nano4', mixer='window_attn', mixer_kwargs=dict(window=4), pool='gap')`; the
block 'swin' takes its `shift`; `Swin` alternates it over each stage's blocks (`StageSpec.block_cycle`).

Parameter counts at 224 px, 1000 classes, equal to timm's (tests/test_swin.py pins them):
swin_tiny_patch4_window7_224 28,288,354 (paper 29M), swin_small_patch4_window7_224 49,606,258
(50M), swin_base_patch4_window7_224 87,768,224 (88M). swin_tiny costs 4.53 GMACs at 224 px by
XLA's cost analysis (flops / 2; the paper states 4.5G FLOPs, meaning multiply-accumulates).
`vitjax.convert.from_timm` loads timm's weights.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers
from vitjax.models.backbone import (MultiStageModel, StageSpec, Tokens, build_mixer, call_mixer,
                                    per_stage)
from vitjax.models.mixers import out_projection, qkv_projections
from vitjax.models.registry import register_block, register_mixer, register_model
from vitjax.ops import windows

trunc_normal = nn.initializers.truncated_normal


def check_positive(what: str, **fields):
  for field, value in fields.items():
    values = value if isinstance(value, tuple) else (value,)
    if any(not isinstance(v, int) or v < 1 for v in values):
      raise ValueError(f"{what}: {field}={value}; allowed values are positive integers")


@register_mixer("window_attn")
class WindowAttention(nn.Module):
  """Swin's (shifted) window attention with relative position bias; (B, N, D) -> (B, N, D).

  Parameters: `query`, `key`, `value`, `out` (as 'mhsa') and `relative_position_bias_table`
  ((2wh-1)(2ww-1), heads), the window clipped to the grid by `windows.fit_window`.
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  window: int = 7
  shift: int = 0
  qkv_bias: bool = True
  dropout: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    check_positive("window_attn", window=self.window)
    if not 0 <= self.shift < self.window:
      raise ValueError(f"window_attn: shift={self.shift}; allowed values are 0 <= shift < "
                       f"window={self.window}")
    if num_prefix:
      raise ValueError(f"window_attn works on the patch map; the tokens carry {num_prefix} "
                       "prefix token(s) (use pool='gap' without a class token)")
    b, n, d = x.shape
    window, shift = windows.fit_window(grid, self.window, self.shift)
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init)          # (B, N, heads, dh)
    table = self.param("relative_position_bias_table", trunc_normal(0.02),
                       ((2 * window[0] - 1) * (2 * window[1] - 1), self.num_heads), jnp.float32)
    bias = windows.relative_position_bias(table, window)             # (heads, T, T)
    to_map = lambda t: t.reshape(b, *grid, *t.shape[2:])            # noqa: E731
    y = windows.window_attention(to_map(q), to_map(k), to_map(v), window=window, shift=shift,
                                 scale=q.shape[-1] ** -0.5, bias=bias.astype(q.dtype))
    return out_projection(y.reshape(b, n, *y.shape[3:]), d, kernel_init=self.kernel_init,
                          dropout=self.dropout, train=train)


def pre_norm_block(tokens: Tokens, mixer: nn.Module, *, mlp_dim: int, dropout: float,
                   drop_path: float, eps: float, train: bool) -> Tokens:
  """x + DropPath(mixer(norm1(x))), x + DropPath(mlp(norm2(x))), from inside a block's compact
  method (timm's Swin and the official CSWin blocks; LayerNorm eps `eps`, exact GELU)."""
  x = tokens.x
  y = nn.LayerNorm(epsilon=eps, name="norm1")(x)
  y = call_mixer(mixer, y, tokens, train=train)
  x = x + layers.DropPath(drop_path)(y, train=train)
  y = nn.LayerNorm(epsilon=eps, name="norm2")(x)
  y = layers.MlpBlock(mlp_dim, dropout=dropout, kernel_init=trunc_normal(0.02),
                      bias_init=nn.initializers.zeros, name="mlp")(y, train=train)
  x = x + layers.DropPath(drop_path)(y, train=train)
  return tokens.replace(x=x)


@register_block("swin")
class SwinBlock(nn.Module):
  """Swin's block: pre-norm window attention ('window_attn') and MLP with residuals.

  Parameters: `norm1`, `attn`, `norm2`, `mlp`. `Swin` alternates shift 0 and window // 2 over
  the blocks of a stage (timm: `shift_size=0 if i % 2 == 0 else window // 2`) with the stage's
  `block_cycle`.
  """
  mlp_dim: int
  num_heads: int
  window: int = 7
  shift: int = 0
  qkv_bias: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    mixer = build_mixer(WindowAttention, dict(num_heads=self.num_heads, dropout=self.dropout),
                        dict(window=self.window, shift=self.shift, qkv_bias=self.qkv_bias))
    return pre_norm_block(tokens, mixer, mlp_dim=self.mlp_dim, dropout=self.dropout,
                          drop_path=self.drop_path, eps=self.eps, train=train)


class Swin(MultiStageModel):
  """Hierarchical Swin classifier (module docstring).

  num_heads: one entry per stage, or an int (the first stage's, doubled each stage).
  Parameter tree: `stem_conv`, `stem_norm`, `stages_{i}/downsample/{norm,reduction}` (i > 0),
  `stages_{i}/blocks_{j}/{norm1,attn,norm2,mlp}`, `norm`, `head`.
  """
  num_classes: int = 1000
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: Any = (3, 6, 12, 24)
  window: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0

  def widths(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  def heads(self) -> tuple[int, ...]:
    return per_stage("num_heads", self.num_heads, len(self.depths), doubling=True)

  def check(self):
    if not self.depths:
      raise ValueError("depths=(): allowed values are one positive block count per stage")
    check_positive("Swin", depths=tuple(self.depths), embed_dim=self.embed_dim,
                   window=self.window, patch_size=self.patch_size)
    heads = self.heads()
    check_positive("Swin", num_heads=heads)
    for i, (width, h) in enumerate(zip(self.widths(), heads)):
      if width % h:
        raise ValueError(f"Swin stage {i + 1}: width {width} is not divisible by num_heads={h}")

  def stem_stride(self) -> int:
    return self.patch_size

  def stem(self, images, *, train: bool):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="stem_conv")(images)
    return nn.LayerNorm(epsilon=1e-5, name="stem_norm")(x)             # (B, H/p, W/p, C)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(depth, width, block=SwinBlock,
                  block_kwargs=dict(mlp_dim=int(width * self.mlp_ratio), num_heads=heads,
                                    window=self.window, qkv_bias=self.qkv_bias,
                                    dropout=self.dropout),
                  block_cycle=(dict(shift=0), dict(shift=self.window // 2)),
                  downsample=None if i == 0 else "patch_merge")
        for i, (depth, width, heads) in enumerate(zip(self.depths, self.widths(), self.heads())))

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x).mean(axis=1)    # (B, C_last)

  def head_init(self):
    return trunc_normal(0.02)


# timm's ImageNet-1k Swins at 224 px (patch 4, window 7).
VARIANTS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2),
                                         num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2),
                                          num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2),
                                         num_heads=(4, 8, 16, 32)),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(Swin, kwargs, what="Swin")
  for field in ("depths", "num_heads"):   # lists from JSON / the command line
    if isinstance(kwargs[field], list):
      kwargs[field] = tuple(kwargs[field])
  return Swin(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
