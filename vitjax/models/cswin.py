"""CSWin Transformer (Dong et al., CVPR 2022, "CSWin Transformer: A General Vision Transformer
Backbone with Cross-Shaped Windows") on the multi-stage backbone.

Structure (microsoft/CSWin-Transformer, models/cswin.py), NHWC here:
  stem      7x7 stride-4 conv (padding 2) -> LayerNorm                       (B, H/4, W/4, C)
            (`patch_size` p is the stem's stride: a (2p-1)x(2p-1) conv with padding p // 2)
  stage i   (i > 0: 'conv_norm', a 3x3 stride-2 conv (padding 1) -> LayerNorm, doubling the
            width) then depths[i] blocks
  block     x + DropPath(CSWin-attn(LN(x))),  x + DropPath(MLP(LN(x)))   (LayerNorm eps 1e-5,
            MLP ratio 4, exact GELU)
  attn      'cswin': q, k, v = Linear(x) (with bias); the first half of the heads attends inside
            vertical stripes (H x sw tokens), the second half inside horizontal stripes (sw x W),
            the official branch order (`attns.0`, `attns.1`); the halves are concatenated and
            projected (`proj`). In the last stage a single branch of all heads attends over the
            whole map. Each branch adds LePE, a depthwise 3x3 conv (with bias) of its V applied
            inside each stripe (zero padding at the stripe borders, the official `get_lepe`):
              branch = softmax(q k^T / sqrt(d)) v + DWConv3x3(v)
  head      LayerNorm -> mean over the tokens -> Linear
Stripe widths `split_size` per stage: T/S/B [1, 2, 7, 7] (the last stage's is unused).

Maps and stripes: a stripe at least as wide as the map is clipped to the map (both branches then
attend over the whole map, which is the single-branch function with the heads split in two;
the official code builds its single-branch layer there instead, so such weights load only
into the last stage). A stripe width that does not divide the map is an error naming the stage
and the sizes: the official classification code has no padding (its segmentation backbone pads
with unmasked zeros, which vitjax does not reproduce).

The mixer 'cswin' (field `split_size`; 0 = one branch over the whole map) works in any block
that passes the grid, e.g. `create_model('vit_nano4', mixer='cswin',
mixer_kwargs=dict(split_size=2), pool='gap')`.

Parameter counts at 1000 classes equal the official models' (tests/test_cswin.py pins them):
cswin_tiny_224 22,320,552 (paper 23M, 4.3G FLOPs), cswin_small_224 34,643,304 (35M, 6.9G),
cswin_base_224 77,382,184 (78M, 15.0G). cswin_tiny_224 costs 4.36 GMACs at 224 px by XLA's cost
analysis (flops / 2; the paper's FLOPs are multiply-accumulates). `vitjax.convert.from_official`
loads the official weights (the logits agree to 1.1e-6 at full size; experiments/golden/cswin.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import MultiStageModel, StageSpec, Tokens, build_mixer, per_stage
from vitjax.models.mixers import out_projection, qkv_projections
from vitjax.models.registry import register_block, register_mixer, register_model
from vitjax.models.swin import check_positive, pre_norm_block
from vitjax.ops import conv, windows

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_stripes(split_size: int, grid, *, where: str = "cswin"):
  """One clear error when stripes of `split_size` cannot tile the grid (and are narrower)."""
  bad = [n for n in grid if split_size < n and n % split_size]
  if bad:
    raise ValueError(
        f"{where}: stripes of split_size={split_size} do not tile the {grid[0]}x{grid[1]} token "
        f"grid; allowed split sizes divide {' and '.join(str(n) for n in grid)} or are at least "
        f"{max(grid)} (the whole map)")


class LePE(nn.Module):
  """Locally-enhanced positional encoding: a depthwise k x k conv (kernel (k, k, 1, C), bias)
  of V applied inside each window (`windows.window_depthwise_conv`)."""
  kernel_size: int = 3
  impl: str = "auto"

  @nn.compact
  def __call__(self, v, window):
    c, k = v.shape[-1], self.kernel_size
    kernel = self.param("kernel", torch_conv_init, (k, k, 1, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return windows.window_depthwise_conv(v, kernel.astype(v.dtype), bias.astype(v.dtype),
                                         window=window, impl=self.impl)


@register_mixer("cswin")
class CrossShapedWindowAttention(nn.Module):
  """CSWin's cross-shaped window attention with LePE (module docstring); (B, N, D) -> (B, N, D).

  split_size: the stripe width sw; 0 = one branch of all heads over the whole map (the last
    stage). With sw > 0 the heads split in two: heads [0, H/2) attend in vertical stripes
    (H x sw), heads [H/2, H) in horizontal ones (sw x W).
  Parameters: `query`, `key`, `value`, `out` (as 'mhsa') and `lepe_0` (and `lepe_1`), the LePE
  convolution of each branch over its channels of V.
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  split_size: int = 7
  qkv_bias: bool = True
  lepe_kernel: int = 3
  dwconv_impl: str = "auto"     # LePE's depthwise conv: 'auto', 'shift' or 'xla' (ops.conv)
  dropout: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    if num_prefix:
      raise ValueError(f"cswin works on the patch map; the tokens carry {num_prefix} prefix "
                       "token(s) (use pool='gap' without a class token)")
    if self.split_size < 0:
      raise ValueError(f"cswin: split_size={self.split_size}; allowed values are 0 (the whole "
                       "map) or a positive stripe width")
    b, n, d = x.shape
    h, w = grid
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init)        # (B, N, heads, dh)
    dh = q.shape[-1]
    q, k, v = (t.reshape(b, h, w, self.num_heads, dh) for t in (q, k, v))
    if self.split_size == 0:
      branches = [(slice(None), (h, w))]
    else:
      if self.num_heads % 2:
        raise ValueError(f"cswin: num_heads={self.num_heads} must be even: half of the heads "
                         "attend in vertical stripes, half in horizontal ones")
      check_stripes(self.split_size, grid)
      half = self.num_heads // 2
      vertical, horizontal = windows.stripe_windows(grid, self.split_size)
      branches = [(slice(0, half), vertical), (slice(half, None), horizontal)]
    outs = []
    for i, (heads, window) in enumerate(branches):
      qb, kb, vb = q[:, :, :, heads], k[:, :, :, heads], v[:, :, :, heads]
      y = windows.window_attention(qb, kb, vb, window=window, scale=dh ** -0.5)
      lepe = LePE(self.lepe_kernel, self.dwconv_impl, name=f"lepe_{i}")(
          vb.reshape(b, h, w, -1), window)
      outs.append(y + lepe.reshape(y.shape))
    y = jnp.concatenate(outs, axis=3).reshape(b, n, self.num_heads, dh)
    return out_projection(y, d, kernel_init=self.kernel_init, dropout=self.dropout, train=train)


@register_block("cswin")
class CSWinBlock(nn.Module):
  """CSWin's block: pre-norm 'cswin' attention and MLP with residuals (`norm1`, `attn`, `norm2`,
  `mlp`)."""
  mlp_dim: int
  num_heads: int
  split_size: int = 7
  qkv_bias: bool = True
  dwconv_impl: str = "auto"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    mixer = build_mixer(CrossShapedWindowAttention,
                        dict(num_heads=self.num_heads, dropout=self.dropout),
                        dict(split_size=self.split_size, qkv_bias=self.qkv_bias,
                             dwconv_impl=self.dwconv_impl))
    return pre_norm_block(tokens, mixer, mlp_dim=self.mlp_dim, dropout=self.dropout,
                          drop_path=self.drop_path, eps=self.eps, train=train)


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
  return (n + 2 * pad - kernel) // stride + 1


class CSWin(MultiStageModel):
  """Hierarchical CSWin classifier (module docstring).

  num_heads: one entry per stage, or an int (the first stage's, doubled each stage).
  split_size: the stripe width of each stage (the last stage attends over its whole map).
  Parameter tree: `stem/{conv,norm}`, `stages_{i}/downsample/{conv,norm}` (i > 0),
  `stages_{i}/blocks_{j}/{norm1,attn,norm2,mlp}`, `norm`, `head`.
  """
  num_classes: int = 1000
  embed_dim: int = 64
  depths: tuple[int, ...] = (1, 2, 21, 1)
  num_heads: Any = (2, 4, 8, 16)
  split_size: tuple[int, ...] = (1, 2, 7, 7)
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dwconv_impl: str = "auto"     # LePE's depthwise conv: 'auto', 'shift' or 'xla' (ops.conv)
  dropout: float = 0.0
  drop_path: float = 0.0

  def widths(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  def heads(self) -> tuple[int, ...]:
    return per_stage("num_heads", self.num_heads, len(self.depths), doubling=True)

  def stripes(self) -> tuple[int, ...]:
    """Stripe width per stage; 0 (the whole map) in the last stage."""
    sizes = per_stage("split_size", self.split_size, len(self.depths))
    return sizes[:-1] + (0,)

  def check(self):
    if not self.depths:
      raise ValueError("depths=(): allowed values are one positive block count per stage")
    check_positive("CSWin", depths=tuple(self.depths), embed_dim=self.embed_dim,
                   patch_size=self.patch_size)
    heads = self.heads()
    check_positive("CSWin", num_heads=heads, split_size=self.stripes()[:-1])
    choices.check("dwconv_impl", self.dwconv_impl, conv.DWCONV_IMPLS)
    for i, (width, h, sw) in enumerate(zip(self.widths(), heads, self.stripes())):
      if width % h:
        raise ValueError(f"CSWin stage {i + 1}: width {width} is not divisible by num_heads={h}")
      if sw and h % 2:
        raise ValueError(f"CSWin stage {i + 1}: num_heads={h} must be even (half of the heads "
                         "attend in vertical stripes, half in horizontal ones)")

  def stage_grids(self, image_hw) -> list[tuple[int, int]]:
    """The token grid of each stage for an (H, W) image."""
    p = self.patch_size
    grid = tuple(_conv_out(n, 2 * p - 1, p, p // 2) for n in image_hw)
    grids = [grid]
    for _ in self.depths[1:]:
      grid = tuple(_conv_out(n, 3, 2, 1) for n in grid)
      grids.append(grid)
    return grids

  def stem_stride(self) -> int:
    return self.patch_size

  def stem(self, images, *, train: bool):
    for i, (grid, sw) in enumerate(zip(self.stage_grids(images.shape[1:3]), self.stripes())):
      if sw:
        check_stripes(sw, grid, where=f"CSWin stage {i + 1} (split_size[{i}]) at "
                                      f"{images.shape[1]}x{images.shape[2]} px")
    p = self.patch_size
    return layers.ConvNorm(self.embed_dim, stride=p, kernel_size=2 * p - 1, padding=p // 2,
                           kernel_init=torch_conv_init, name="stem")(images)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(depth, width, block=CSWinBlock,
                  block_kwargs=dict(mlp_dim=int(width * self.mlp_ratio), num_heads=heads,
                                    split_size=sw, qkv_bias=self.qkv_bias,
                                    dwconv_impl=self.dwconv_impl, dropout=self.dropout),
                  downsample=None if i == 0 else "conv_norm",
                  downsample_kwargs=None if i == 0 else dict(kernel_init=torch_conv_init))
        for i, (depth, width, heads, sw) in enumerate(
            zip(self.depths, self.widths(), self.heads(), self.stripes())))

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x).mean(axis=1)    # (B, C_last)

  def head_init(self):
    return trunc_normal(0.02)


# The official ImageNet-1k models at 224 px (CSWin_64_12211_tiny_224, CSWin_64_24322_small_224,
# CSWin_96_24322_base_224).
VARIANTS = {
    "cswin_tiny_224": dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16)),
    "cswin_small_224": dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16)),
    "cswin_base_224": dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32)),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(CSWin, kwargs, what="CSWin")
  for field in ("depths", "num_heads", "split_size"):   # lists from JSON / the command line
    if isinstance(kwargs.get(field), list):
      kwargs[field] = tuple(kwargs[field])
  return CSWin(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
