"""CrossViT (Chen, Fan, Panda, ICCV 2021, "CrossViT: Cross-Attention Multi-Scale Vision Transformer
for Image Classification") on the common backbone.

Structure (timm's `crossvit.py`, equal to IBM/CrossViT's `models/crossvit.py`), NHWC here:
  branches   two ViTs side by side: branch 0 cuts the image into small patches (12 px, width C_s),
             branch 1 into large ones (16 px, width C_l) after a bicubic resize of the image
             (240 -> 224 px, PyTorch's convention: `vitjax.ops.crossvit.resize_bicubic`). Each
             prepends its class token and adds its learned positions. Patch embedding: one p x p
             stride-p conv, or in the dagger (†) models three convs with ReLUs between them
             (7x7/4, 3x3/3, 3x3/1 for p = 12; 7x7/4, 3x3/2, 3x3/2 for p = 16).
  K blocks   multi-scale block 'crossvit': each branch runs its own pre-norm ViT blocks (LayerNorm
             eps 1e-6, exact GELU, MLP ratio r_i), then cross-attention fusion: for branch i and
             the other branch j,
               x' = [f_i(x_cls^i); x_patch^j]        f_i = Linear(GELU(LN(.))) to width C_j
               y  = x'_cls + DropPath(CA(LN(x')))   CA: only the class token queries
                                                    (mixer 'cls_cross_attn', heads of branch j)
               x_cls^i <- g_i(y)                     g_i = Linear(GELU(LN(.))) back to C_i
             Both fusions read the branch outputs from before either fusion.
  head       per branch LayerNorm -> class token -> Linear; the logits are the mean of the heads.
             pre_logits (num_classes=0) are the class tokens of both branches, concatenated.

Input sizes: branch 0 runs on the image itself, so its sides must be multiples of its patch size
(else one ValueError naming the sizes). Branch i > 0 runs on the image resized to
p_i * round(side * img_scale[i] / p_i) per side: 240 -> 224 = 14 x 16 with timm's img_scale
224/240, as in timm; 48 -> 48, 72 -> 64 at other sizes. The position tables take the shape of
the token grids at the size the model is initialised with (as ViT's), so pretrained weights need
their size (240 px for every registered model).

Features (`apply(..., features=True)`): 'stem' is branch 0's patch embedding, 'stage1'..'stageK'
branch 0's patch tokens after each multi-scale block, all (B, H/p_0, W/p_0, C_s) at stride p_0
(12). Branch 1's maps are left out: their stride 16 / img_scale is not an integer (timm's
`feature_info` rounds it to 17).

Parameter counts at 240 px, 1000 classes, equal timm's (tests/test_crossvit.py pins all nine):
crossvit_tiny_240 7,014,800; crossvit_9_240 8,553,296. By XLA's cost analysis (flops / 2) at
240 px, crossvit_9_240 costs 1.86 GMACs (paper: 1.8G FLOPs, meaning multiply-accumulates),
crossvit_15_240 5.83 (5.8G), crossvit_18_240 9.09 (9.0G), crossvit_tiny_240 1.58
(`python -m experiments.gmacs --models=crossvit_9_240 --image_size=240`). `vitjax.convert.from_timm`
loads timm's weights (logits within 1.1e-6 of timm's at 240 px) and the official ones, whose
`pos_embed.i` / `cls_token.i` keys it also accepts.
"""
from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import (Classifier, FeatureInfo, StageNames, StageSpec, Tokens,
                                    drop_path_rates, run_stages)
from vitjax.models.mixers import MultiHeadSelfAttention
from vitjax.models.registry import register_block, register_mixer, register_model
from vitjax.models.swin import pre_norm_block
from vitjax.ops import crossvit as ops

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d init (timm leaves the patch convs at it): U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
POOLS = ("tok", "gap")
# The dagger models' patch embedding: (kernel, stride, padding) of its three convs per patch size.
MULTI_CONV = {12: ((7, 4, 3), (3, 3, 0), (3, 1, 1)), 16: ((7, 4, 3), (3, 2, 1), (3, 2, 1))}


@register_mixer("cls_cross_attn")
class ClassCrossAttention(nn.Module):
  """Cross-attention in which only the class token(s) query (`ops.cls_cross_attention`).

  (B, N, D) -> (B, N, D): the rows of the `num_prefix` leading tokens are the attention output,
  the patch rows are zero, so in a residual block only the class token changes (CaiT's class
  attention). `prefix_only=True` returns just the (B, P, D) prefix rows (CrossViT's fusion).
  It declares `needs_grid` to be told `num_prefix`; the grid itself is not used.
  Parameters: `query`, `key`, `value`, `out` (as 'mhsa'; timm's wq, wk, wv, proj).
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  qkv_bias: bool = True
  prefix_only: bool = False
  dropout: float = 0.0
  kernel_init: Any = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 1, train: bool = False):
    if num_prefix < 1:
      raise ValueError("cls_cross_attn: the class token queries, but the tokens carry no prefix "
                       "token (use pool='tok')")
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"cls_cross_attn: width {d} is not divisible by num_heads={self.num_heads}")
    dh = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, dh), use_bias=self.qkv_bias, kernel_init=self.kernel_init, name=name)
    q = proj("query")(x[:, :num_prefix])                              # (B, P, H, d)
    y = ops.cls_cross_attention(q, proj("key")(x), proj("value")(x), scale=dh ** -0.5)
    y = nn.DenseGeneral(d, axis=(-2, -1), kernel_init=self.kernel_init, name="out")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)          # (B, P, D)
    if self.prefix_only:
      return y
    return jnp.concatenate([y, jnp.zeros((b, n - num_prefix, d), y.dtype)], axis=1)


class BranchBlock(nn.Module):
  """A branch's ViT block (timm's `Block`): `norm1`, `attn` ('mhsa'), `norm2`, `mlp`."""
  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    attn = MultiHeadSelfAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                                  attn_impl=self.attn_impl, dropout=self.dropout,
                                  kernel_init=trunc_normal(0.02), name="attn")
    return pre_norm_block(Tokens(x), attn, mlp_dim=self.mlp_dim, dropout=self.dropout,
                          drop_path=self.drop_path, eps=1e-6, train=train).x


class NormGeluLinear(nn.Module):
  """f_i and g_i of the fusion: LayerNorm (`norm`) -> GELU -> Linear (`dense`)."""
  features: int

  @nn.compact
  def __call__(self, x):
    x = layers.gelu(nn.LayerNorm(epsilon=1e-6, name="norm")(x))
    return nn.Dense(self.features, kernel_init=trunc_normal(0.02), name="dense")(x)


class ClassFusion(nn.Module):
  """x'_cls + DropPath(CA(LN(x'))) (timm's `CrossAttentionBlock`): `norm`, `attn`."""
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    y = ClassCrossAttention(self.num_heads, self.qkv_bias, prefix_only=True,
                            dropout=self.dropout, name="attn")(
                                nn.LayerNorm(epsilon=1e-6, name="norm")(x), train=train)
    return x[:, :1] + layers.DropPath(self.drop_path)(y, train=train)


def branch_key(i: int) -> str:
  """Where branch i > 0 travels in the carry: `tokens.extra[branch_key(i)]`."""
  return f"branch_{i}"


@register_block("crossvit")
class MultiScaleBlock(nn.Module):
  """One multi-scale block (module docstring): per-branch ViT blocks, then the fusions.

  Branch 0 is `tokens.x`, branch i > 0 is `tokens.extra['branch_i']`; every branch carries its
  class token first. depth / num_heads / mlp_ratio: one entry per branch. Branch j's blocks use
  drop-path rates drop_rates[j'] for block j' and the fusions drop_rates[-1] (timm's schedule);
  without drop_rates every layer uses `drop_path`.
  Parameters: `branch{i}_{j}` (BranchBlock), `proj_{i}` (f_i), `fusion_{i}`, `revert_{i}` (g_i).
  """
  depth: tuple[int, ...]
  num_heads: tuple[int, ...]
  mlp_ratio: tuple[float, ...]
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  drop_rates: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    n = len(self.depth)
    missing = [branch_key(i) for i in range(1, n) if branch_key(i) not in tokens.extra]
    if missing:
      raise ValueError(f"block 'crossvit' has {n} branches; tokens.extra lacks {missing}")
    rates = self.drop_rates or (self.drop_path,) * max(self.depth)
    xs = [tokens.x] + [tokens.extra[branch_key(i)] for i in range(1, n)]
    for i in range(n):
      width = xs[i].shape[-1]
      for j in range(self.depth[i]):
        xs[i] = BranchBlock(int(width * self.mlp_ratio[i]), self.num_heads[i],
                            qkv_bias=self.qkv_bias, attn_impl=self.attn_impl,
                            dropout=self.dropout, drop_path=rates[j], name=f"branch{i}_{j}")(
                                xs[i], train=train)
    fused = []
    for i in range(n):
      j = (i + 1) % n
      width_i, width_j = xs[i].shape[-1], xs[j].shape[-1]
      cls = NormGeluLinear(width_j, name=f"proj_{i}")(xs[i][:, :1])             # f_i
      fusion = ClassFusion(self.num_heads[j], qkv_bias=self.qkv_bias, dropout=self.dropout,
                           drop_path=rates[-1], name=f"fusion_{i}")
      y = fusion(jnp.concatenate([cls, xs[j][:, 1:]], axis=1), train=train)     # (B, 1, C_j)
      cls = NormGeluLinear(width_i, name=f"revert_{i}")(y)                      # g_i
      fused.append(jnp.concatenate([cls, xs[i][:, 1:]], axis=1))
    extra = {**tokens.extra, **{branch_key(i): fused[i] for i in range(1, n)}}
    return tokens.replace(x=fused[0], extra=extra)


class PatchEmbed(nn.Module):
  """p x p stride-p conv (`proj`), or the dagger models' three convs (`proj_0..2`, ReLUs between).
  (B, H, W, C) -> (B, H/p, W/p, width)."""
  width: int
  patch_size: int
  multi_conv: bool = False

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    if not self.multi_conv:
      return nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                     kernel_init=torch_conv_init, name="proj")(x)
    widths = (self.width // 4, self.width // 2, self.width)
    for i, (width, (k, s, pad)) in enumerate(zip(widths, MULTI_CONV[p])):
      x = x if i == 0 else nn.relu(x)
      x = nn.Conv(width, (k, k), strides=(s, s), padding=((pad, pad), (pad, pad)),
                  kernel_init=torch_conv_init, name=f"proj_{i}")(x)
    return x


class CrossViT(Classifier):
  """Two-branch CrossViT classifier (module docstring).

  patch_size, img_scale, embed_dim, num_heads, mlp_ratio: one entry per branch (branch 0 must
  have img_scale 1.0: it runs on the image itself). depth: one (d_0, d_1, fusion) triple per
  multi-scale block, timm's layout; the fusion entry must be 0 (one cross-attention per branch,
  every released model). multi_conv: the dagger (†) patch embedding (patch sizes 12 and 16).
  Parameter tree: `patch_embed_{i}`, `cls_token_{i}`, `pos_embed_{i}`, `blocks_{k}`,
  `norm_{i}`, `head_{i}`.
  """
  num_classes: int = 1000
  patch_size: tuple[int, ...] = (12, 16)
  img_scale: tuple[float, ...] = (1.0, 224 / 240)
  embed_dim: tuple[int, ...] = (96, 192)
  depth: tuple[tuple[int, ...], ...] = ((1, 4, 0),) * 3
  num_heads: tuple[int, ...] = (3, 3)
  mlp_ratio: tuple[float, ...] = (4.0, 4.0)
  multi_conv: bool = False
  qkv_bias: bool = True
  pool: str = "tok"                 # 'tok' (class tokens) or 'gap' (mean of patch tokens)
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    choices.check("pool", self.pool, POOLS)
    n = len(self.patch_size)
    if n < 2:
      raise ValueError(f"patch_size={self.patch_size!r}: CrossViT needs one entry per branch "
                       "(at least 2)")
    for field in ("img_scale", "embed_dim", "num_heads", "mlp_ratio"):
      value = getattr(self, field)
      if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{field}={value!r} needs one entry per branch ({n}, from "
                         f"patch_size={tuple(self.patch_size)})")
    if not self.depth or any(len(d) != n + 1 or d[-1] != 0 or min(d[:-1]) < 1
                             for d in self.depth):
      raise ValueError(f"depth={self.depth!r}: allowed values are one (d_0, ..., d_{n - 1}, 0) per "
                       "multi-scale block: positive block counts per branch, fusion depth 0")
    if self.img_scale[0] != 1.0 or min(self.img_scale) <= 0:
      raise ValueError(f"img_scale={self.img_scale!r}: branch 0 runs on the image itself "
                       "(img_scale[0] = 1.0); the others need a positive scale")
    for i, (width, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
      if width % heads:
        raise ValueError(f"CrossViT branch {i}: embed_dim {width} is not divisible by "
                         f"num_heads={heads}")
    if self.multi_conv and any(p not in MULTI_CONV for p in self.patch_size):
      raise ValueError(f"multi_conv=True: patch_size={tuple(self.patch_size)}; the dagger patch "
                       f"embedding exists for patch sizes {sorted(MULTI_CONV)}")

  def branch_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
    """The (H_i, W_i) image size each branch runs at for an h x w input (module docstring)."""
    p0 = self.patch_size[0]
    sizes = [(h, w)] + [tuple(p * math.floor(side * s / p + 0.5) for side in (h, w))
                        for p, s in zip(self.patch_size[1:], self.img_scale[1:])]
    if h % p0 or w % p0 or min(min(s) for s in sizes) < 1:
      detail = ", ".join(f"branch {i} (patch {p}) at {hw[0]}x{hw[1]}"
                         for i, (p, hw) in enumerate(zip(self.patch_size, sizes)))
      raise ValueError(
          f"data.image_size: image size {h}x{w} does not suit the CrossViT branches' patch sizes "
          f"{tuple(self.patch_size)} ({detail}): branch 0 runs on the image itself, so allowed "
          f"sizes are multiples of {p0} large enough to give every branch a patch (e.g. 240: "
          "the branches then run at 240 and 224 with timm's scales)")
    return sizes

  def feature_info(self) -> list[FeatureInfo]:
    p0, c0 = self.patch_size[0], self.embed_dim[0]
    return [FeatureInfo(name, c0, p0)
            for name in ["stem"] + [f"stage{k + 1}" for k in range(len(self.depth))]]

  def stage_spec(self) -> StageSpec:
    """The K multi-scale blocks as one stage; each gets its depths and timm's drop-path rates
    (linear over max(d_i) layers per block, the fusions at the block's last rate)."""
    inner = [max(d[:-1]) for d in self.depth]
    rates = drop_path_rates(inner, self.drop_path)
    cycle = tuple(dict(depth=tuple(d[:-1]), drop_rates=tuple(r)) for d, r in zip(self.depth, rates))
    return StageSpec(len(self.depth), self.embed_dim[0], block=MultiScaleBlock,
                     block_kwargs=dict(num_heads=tuple(self.num_heads),
                                       mlp_ratio=tuple(self.mlp_ratio), qkv_bias=self.qkv_bias,
                                       attn_impl=self.attn_impl, dropout=self.dropout),
                     block_cycle=cycle)

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    self.check()
    layers.check_images(images, 1)
    sizes = self.branch_sizes(*images.shape[1:3])
    b = images.shape[0]
    streams, grid0 = [], None
    out = {}
    for i, (size, p, width) in enumerate(zip(sizes, self.patch_size, self.embed_dim)):
      x = PatchEmbed(width, p, self.multi_conv, name=f"patch_embed_{i}")(
          ops.resize_bicubic(images, size))                           # (B, H_i/p, W_i/p, C_i)
      if i == 0:
        out["stem"], grid0 = x, x.shape[1:3]
      x = x.reshape(b, -1, width)
      cls = self.param(f"cls_token_{i}", trunc_normal(0.02), (1, 1, width), x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)
      pos = self.param(f"pos_embed_{i}", trunc_normal(0.02), (1, *x.shape[1:]), x.dtype)
      streams.append(x + pos)
    tokens = Tokens(streams[0], extra={branch_key(i): s for i, s in enumerate(streams) if i},
                    grid=grid0, num_prefix=1)
    k_blocks = len(self.depth)
    tokens, taps = run_stages(self, tokens, (self.stage_spec(),), names=StageNames(
        stage=None, block="blocks_{k}"), train=train, collect=range(k_blocks) if features else ())
    if features:
      out.update({f"stage{k + 1}": taps[k].patch_map() for k in range(k_blocks)})
    finals = [tokens.x] + [tokens.extra[branch_key(i)] for i in range(1, len(sizes))]
    pooled = []
    for i, x in enumerate(finals):
      x = nn.LayerNorm(epsilon=1e-6, name=f"norm_{i}")(x)
      pooled.append(x[:, 0] if self.pool == "tok" else x[:, 1:].mean(axis=1))
    out["pre_logits"] = jnp.concatenate(pooled, axis=-1)             # (B, sum C_i)
    logits = out["pre_logits"]
    if self.num_classes:
      logits = sum(nn.Dense(self.num_classes, kernel_init=trunc_normal(0.02), name=f"head_{i}")(x)
                   for i, x in enumerate(pooled)) / len(pooled)
    return (logits, out) if features else logits


_240 = dict(patch_size=(12, 16), img_scale=(1.0, 224 / 240))
# timm's ImageNet-1k models at 240 px (the official *_224 names; 240 is their input size).
VARIANTS = {
    "crossvit_tiny_240": dict(embed_dim=(96, 192), depth=((1, 4, 0),) * 3, num_heads=(3, 3),
                              mlp_ratio=(4.0, 4.0)),
    "crossvit_small_240": dict(embed_dim=(192, 384), depth=((1, 4, 0),) * 3, num_heads=(6, 6),
                               mlp_ratio=(4.0, 4.0)),
    "crossvit_base_240": dict(embed_dim=(384, 768), depth=((1, 4, 0),) * 3, num_heads=(12, 12),
                              mlp_ratio=(4.0, 4.0)),
    "crossvit_9_240": dict(embed_dim=(128, 256), depth=((1, 3, 0),) * 3, num_heads=(4, 4),
                           mlp_ratio=(3.0, 3.0)),
    "crossvit_15_240": dict(embed_dim=(192, 384), depth=((1, 5, 0),) * 3, num_heads=(6, 6),
                            mlp_ratio=(3.0, 3.0)),
    "crossvit_18_240": dict(embed_dim=(224, 448), depth=((1, 6, 0),) * 3, num_heads=(7, 7),
                            mlp_ratio=(3.0, 3.0)),
}
for _n in ("9", "15", "18"):
  VARIANTS[f"crossvit_{_n}_dagger_240"] = dict(VARIANTS[f"crossvit_{_n}_240"], multi_conv=True)


def _tuples(value):
  """Lists (JSON, the command line) -> tuples, nested ones too (module fields must hash)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _factory(variant, **overrides):
  kwargs = {**_240, **VARIANTS[variant], **overrides}
  layers.check_overrides(CrossViT, kwargs, what="CrossViT")
  return CrossViT(**{k: _tuples(v) for k, v in kwargs.items()})


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
