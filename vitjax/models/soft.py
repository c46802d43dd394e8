"""SOFT (Lu et al., NeurIPS 2021, "SOFT: Softmax-free Transformer with Linear Complexity") on the
multi-stage backbone.

Official structure (fudan-zvg/SOFT, models/softmax_free_vision_transformer.py and
models/softmax_free_transformer.py, the `kernel_method='torch'` path), NHWC here:
  stem      conv 3x3/2 (32) -> BN -> ReLU -> conv 3x3 (32) -> BN -> ReLU -> conv 3x3/2 (C) -> BN
            -> ReLU                                            (stride 4; official `patch_embed1`)
  stage i   (i > 0: conv 3x3/2 -> BN -> ReLU, official `patch_embed{i+1}`), then depths[i] blocks;
            the stage's first block adds its learned position table (`pos_embed{i+1}`, made for
            a 224 px input: 56x56, 28x28, 14x14, 7x7 + the class token), bilinearly resized
            (align_corners=False) to the stage's grid
  stages 1..K-1, block 'soft' (post-norm, official `SoftmaxFreeTransformer`):
            x = LN(x + Drop(SOFT-attn(x)));  x = LN(x + Drop(FFN(x)))   (LN eps 1e-5; FFN
            Linear(4C) -> tanh-GELU -> Linear; the official drop-path rate drives an element-wise
            dropout on both branches, as there)
  SOFT-attn 'soft_attn': q = Linear(x) d^(-1/4) per head, Q = K; landmarks Q~ = GELU(LN_d(
            Conv_{s x s, stride s}(q))) (one d -> d conv shared by the heads, no bias; m =
            hw / s^2 landmarks); out = G(Q, Q~) . NS(G(Q~, Q~)) . G(Q~, Q) . V + DWConv_k(V)
            (`vitjax.ops.soft`; the k x k depthwise conv has one kernel per head, shared by the
            head's channels, no bias), then Linear. s = sr_ratios (8, 4, 2), k = conv_sizes
            (9, 5, 3).
  stage K   a class token, then pre-norm ViT blocks (softmax attention 'mhsa', MLP with exact
            GELU, LN eps 1e-6, drop path)
  head      LN (eps 1e-6) -> the class token -> Linear
BatchNorm statistics live in `batch_stats` (momentum 0.9 = PyTorch's 0.1, eps 1e-5).

Parameter counts (1000 classes, `params` only) equal the official models' `sum(p.numel() for p
in model.parameters())`: soft_tiny 13,069,056 (README 13M, 1.9G FLOPs), soft_small 38,858,462
(the README says 24M; its code builds 38.9M), soft_medium 45,812,707, soft_large 64,700,646,
soft_huge 87,108,273; tests/test_soft.py pins them. The official SOFT blocks build their FFN with
4C hidden units whatever `mlp_ratios` says (8 for stages 1-2); vitjax's `mlp_ratio` is that 4.
At 224 px XLA's cost analysis (flops / 2) counts 2.22 / 7.72 / 9.08 / 13.75 / 19.42 GMACs for
tiny ... huge (`python -m experiments.gmacs`; the README states 1.9 / 3.3 / 7.2 / 11.0 / 16.3G,
counted without the kernels' exponentials, norms and activations). `vitjax.convert.from_official`
loads the official weights: soft_tiny's logits agree to 1.7e-6 at full size (max |logit| 2.7;
8.8e-9 in float64), its input gradients, through the official backward of the Newton-Schulz
inverse, to 1.1e-7 (max 0.015) (experiments/golden/soft.py).

Grids: each stage's landmark stride must divide its grid (at 224 px: 56/8, 28/4, 14/2, 7
landmarks a side); anything else is one error naming `sr_ratios` (the official conv would drop
the remainder silently). The normalised variant of the journal version (`soft_norm_*`) is not
built: its official class does not construct.

The mixer works on its own on (B, N, C) tokens with a grid (see `SoftAttention`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import (MultiStageModel, StageSpec, Tokens, build_mixer, call_mixer,
                                    check_per_stage)
from vitjax.models.registry import register_block, register_mixer, register_model
from vitjax.models.swin import check_positive, pre_norm_block
from vitjax.ops import conv, resize
from vitjax.ops import soft as ops

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
tanh_gelu = functools.partial(jax.nn.gelu, approximate=True)   # the official `Approx_GeLU`


def check_landmark_stride(sr_ratio: int, grid, *, where: str = "soft_attn",
                          field: str = "sr_ratio"):
  """One clear error when the landmark stride s does not divide the (h, w) token grid."""
  h, w = grid
  if h % sr_ratio or w % sr_ratio:
    allowed = [s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]
    raise ValueError(
        f"{where}: {field}={sr_ratio} (the landmark stride) does not divide the {h}x{w} token "
        f"grid; allowed values divide both {h} and {w}: {', '.join(map(str, allowed))}")


@register_mixer("soft_attn")
class SoftAttention(nn.Module):
  """SOFT's softmax-free attention (module docstring); (B, N, C) -> (B, N, C) on an (h, w) grid.

  Standalone, e.g. the 64k-token case of a scaling run (N = h * w, width 384, 6 heads):

      mixer = SoftAttention(num_heads=6, sr_ratio=32, conv_size=3)
      variables = mixer.init(jax.random.key(0), x, grid=(256, 256))      # x: (B, 65536, 384)
      y = jax.jit(functools.partial(mixer.apply, grid=(256, 256)))(variables, x)

  Cost is O(N m d) with m = N / sr_ratio^2 landmarks: keep m fixed (sr_ratio = side / sqrt(m),
  here 8x8 = 64 landmarks) for the linear scaling the paper claims; a fixed sr_ratio grows m with
  N (the models use 8, 4, 2 on 56, 28, 14 grids: m = 49). sr_ratio must divide h and w.

  Parameters: `query`, `value`, `out` (Dense C -> C, bias), `landmark` (conv (s, s, d, d), no
  bias), `landmark_norm` (LayerNorm over d, eps 1e-5), `dwconv` ((k, k, 1, heads), no bias; absent
  with conv_size=0). No prefix tokens: every token needs a grid position.
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  sr_ratio: int = 8             # landmark stride s: an s x s stride-s conv samples the landmarks
  conv_size: int = 3            # k of the depthwise conv on V (0: none)
  num_iters: int = ops.NEWTON_ITERS
  dwconv_impl: str = "auto"     # 'auto', 'shift' or 'xla' (vitjax.ops.conv)
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    del train
    check_positive("soft_attn", num_heads=self.num_heads, sr_ratio=self.sr_ratio,
                   num_iters=self.num_iters)
    if self.conv_size < 0 or (self.conv_size and self.conv_size % 2 == 0):
      raise ValueError(f"soft_attn: conv_size={self.conv_size}; allowed values are 0 (no conv) "
                       "or an odd kernel size")
    choices.check("dwconv_impl", self.dwconv_impl, conv.DWCONV_IMPLS)
    if num_prefix:
      raise ValueError(f"soft_attn: every token needs a grid position, but the tokens carry "
                       f"{num_prefix} prefix token(s); use pool='gap' (no class token)")
    b, n, c = x.shape
    h, w = grid
    if h * w != n:
      raise ValueError(f"soft_attn: {n} tokens do not fit grid={grid}")
    if c % self.num_heads:
      raise ValueError(f"soft_attn: width {c} is not divisible by num_heads={self.num_heads}")
    check_landmark_stride(self.sr_ratio, grid)
    heads, d, s = self.num_heads, c // self.num_heads, self.sr_ratio
    dense = functools.partial(nn.Dense, c, kernel_init=self.kernel_init,
                              bias_init=nn.initializers.zeros)
    q = dense(name="query")(x).reshape(b, n, heads, d) * d ** -0.25     # Q = K, scaled
    v = dense(name="value")(x).reshape(b, n, heads, d)
    # Landmarks: one s x s stride-s conv over each head's (h, w, d) map.
    maps = jnp.moveaxis(q.reshape(b, h, w, heads, d), 3, 1).reshape(b * heads, h, w, d)
    lm = nn.Conv(d, (s, s), strides=(s, s), padding="VALID", use_bias=False,
                 kernel_init=torch_conv_init, name="landmark")(maps)   # (B*heads, h/s, w/s, d)
    lm = layers.gelu(nn.LayerNorm(epsilon=1e-5, name="landmark_norm")(lm))
    lm = jnp.moveaxis(lm.reshape(b, heads, -1, d), 1, 2)                # (B, m, heads, d)
    y = ops.soft_attention(q, lm, v, num_iters=self.num_iters)          # (B, N, heads, d)
    y = y.reshape(b, n, c)
    if self.conv_size:
      k = self.conv_size
      kernel = self.param("dwconv", torch_conv_init, (k, k, 1, heads), jnp.float32)
      kernel = jnp.repeat(kernel, d, axis=-1).astype(x.dtype)           # channel h*d + i: head h
      y = y + conv.depthwise_conv_same(v.reshape(b, h, w, c), kernel,
                                       impl=self.dwconv_impl).reshape(b, n, c)
    return dense(name="out")(y)


def add_positions(module: nn.Module, tokens: Tokens, size: int) -> Tokens:
  """Adds the learned table `pos_embed` (1, P + size^2, C) of `module` to the tokens: its first
  P rows to the prefix tokens, the rest, a size x size map, bilinearly resized
  (align_corners=False, no antialiasing, as PyTorch's `F.interpolate`) to the tokens' grid."""
  p, c = tokens.num_prefix, tokens.x.shape[-1]
  table = module.param("pos_embed", trunc_normal(0.02), (1, p + size * size, c), jnp.float32)
  grid = resize.resize_2d(table[:, p:].reshape(1, size, size, c), tokens.grid, "bilinear")
  table = jnp.concatenate([table[:, :p], grid.reshape(1, -1, c)], axis=1)
  return tokens.replace(x=tokens.x + table.astype(tokens.x.dtype))


@register_block("soft")
class SoftBlock(nn.Module):
  """SOFT's post-norm block (official `SoftmaxFreeTransformer`): `norm1`, `attn` ('soft_attn'),
  `mlp` (Dense_0, tanh-GELU, Dense_1), `norm2`; `pos_embed` when `pos_grid` > 0 (the first block
  of a stage). `drop_path` is the rate of the element-wise dropout on both residual branches
  (official `dropout1/2`, built from the drop-path rate)."""
  mlp_dim: int
  num_heads: int
  sr_ratio: int = 8
  conv_size: int = 3
  num_iters: int = ops.NEWTON_ITERS
  dwconv_impl: str = "auto"
  pos_grid: int = 0             # > 0: first add the stage's pos_grid x pos_grid position table
  dropout: float = 0.0          # after the position table (official `pos_drop`)
  drop_path: float = 0.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if self.pos_grid:
      tokens = add_positions(self, tokens, self.pos_grid)
      tokens = tokens.replace(x=nn.Dropout(self.dropout, deterministic=not train)(tokens.x))
    mixer = build_mixer(SoftAttention, dict(num_heads=self.num_heads),
                        dict(sr_ratio=self.sr_ratio, conv_size=self.conv_size,
                             num_iters=self.num_iters, dwconv_impl=self.dwconv_impl))
    drop = nn.Dropout(self.drop_path, deterministic=not train)
    x = tokens.x
    x = nn.LayerNorm(epsilon=self.eps, name="norm1")(
        x + drop(call_mixer(mixer, x, tokens, train=train)))
    y = layers.MlpBlock(self.mlp_dim, act=tanh_gelu, kernel_init=trunc_normal(0.02),
                        bias_init=nn.initializers.zeros, name="mlp")(x, train=train)
    x = nn.LayerNorm(epsilon=self.eps, name="norm2")(x + drop(y))
    return tokens.replace(x=x)


class SoftClassBlock(nn.Module):
  """The last stage's block (official `Block`, sr_ratio 1): pre-norm softmax attention ('mhsa':
  query/key/value/out) and MLP, LN eps 1e-6, drop path; the first block of the stage adds the
  position table of the class token and the grid (`pos_embed`)."""
  mlp_dim: int
  num_heads: int
  pos_grid: int = 0
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if self.pos_grid:
      tokens = add_positions(self, tokens, self.pos_grid)
    mixer = build_mixer("mhsa", dict(num_heads=self.num_heads, attn_impl=self.attn_impl,
                                     dropout=self.dropout), dict(kernel_init=trunc_normal(0.02)))
    return pre_norm_block(tokens, mixer, mlp_dim=self.mlp_dim, dropout=self.dropout,
                          drop_path=self.drop_path, eps=self.eps, train=train)


def _batch_norm(name: str, train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv_bn_relu(x, width: int, stride: int, index: str, train: bool):
  x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
              kernel_init=torch_conv_init, name=f"conv{index}")(x)
  return nn.relu(_batch_norm(f"bn{index}", train)(x))


class SoftStem(nn.Module):
  """Official `patch_embed1`: conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU -> conv 3x3/2
  -> BN -> ReLU (`conv_{i}`, `bn_{i}`), stride 4."""
  width: int
  channels: int = 32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for i, (width, stride) in enumerate(((self.channels, 2), (self.channels, 1), (self.width, 2))):
      x = _conv_bn_relu(x, width, stride, f"_{i}", train)
    return x


class SoftPatchEmbed(nn.Module):
  """Official `PatchEmbed` of stages 2..K: conv 3x3/2 (padding 1) -> BN -> ReLU."""
  width: int
  stride: ClassVar[int] = 2

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    return _conv_bn_relu(x, self.width, 2, "", train)


class Soft(MultiStageModel):
  """Hierarchical SOFT classifier (module docstring).

  embed_dims, depths, num_heads: one entry per stage (the last stage is the class-token ViT
    stage); sr_ratios, conv_sizes: one entry per SOFT stage (all but the last).
  pos_size: the image side the position tables are made for (tables of pos_size / 4, / 8, ...
    a side, resized to the actual grids).
  Parameter tree: `stem/{conv_0..2,bn_0..2}`, `stages_{i}/downsample/{conv,bn}` (i > 0),
  `stages_{i}/blocks_{j}/...` (`pos_embed` in blocks_0), `stages_{K-1}/cls_token`, `norm`, `head`.
  """
  num_classes: int = 1000
  embed_dims: tuple[int, ...] = (64, 128, 320, 512)
  depths: tuple[int, ...] = (1, 2, 3, 2)
  num_heads: tuple[int, ...] = (2, 4, 10, 16)
  sr_ratios: tuple[int, ...] = (8, 4, 2)
  conv_sizes: tuple[int, ...] = (9, 5, 3)
  mlp_ratio: float = 4.0
  stem_channels: int = 32       # width of the first two stem convs (official: 32)
  pos_size: int = 224
  newton_iters: int = ops.NEWTON_ITERS
  dwconv_impl: str = "auto"
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    check_per_stage(self, ("embed_dims", "num_heads"))
    if len(self.depths) < 2:
      raise ValueError(f"depths={tuple(self.depths)}: SOFT needs at least two stages (SOFT "
                       "stages, then the class-token stage)")
    n = len(self.depths) - 1
    for field in ("sr_ratios", "conv_sizes"):
      value = getattr(self, field)
      if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{field}={value!r} needs one entry per SOFT stage ({n}: all but the "
                         f"last of depths={tuple(self.depths)})")
    check_positive("SOFT", depths=tuple(self.depths), embed_dims=tuple(self.embed_dims),
                   num_heads=tuple(self.num_heads), sr_ratios=tuple(self.sr_ratios),
                   stem_channels=self.stem_channels, newton_iters=self.newton_iters)
    for i, (width, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"SOFT stage {i + 1}: width {width} is not divisible by "
                         f"num_heads={heads}")
    stride = 4 * 2 ** n
    if self.pos_size % stride:
      raise ValueError(f"pos_size={self.pos_size}: allowed values are multiples of the total "
                       f"stride {stride}")
    choices.check("dwconv_impl", self.dwconv_impl, conv.DWCONV_IMPLS)

  def stem_stride(self) -> int:
    return 4

  def stem(self, images, *, train: bool):
    h, w = images.shape[1:3]
    for i, s in enumerate(self.sr_ratios):
      grid = (h // (4 * 2 ** i), w // (4 * 2 ** i))
      check_landmark_stride(s, grid, where=f"SOFT stage {i + 1} at {h}x{w} px",
                            field=f"sr_ratios[{i}]")
    return SoftStem(self.embed_dims[0], self.stem_channels, name="stem")(images, train=train)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    specs, last = [], len(self.depths) - 1
    for i, (depth, width, heads) in enumerate(zip(self.depths, self.embed_dims, self.num_heads)):
      first = (dict(pos_grid=self.pos_size // (4 * 2 ** i)),) + (dict(pos_grid=0),) * (depth - 1)
      kwargs = dict(mlp_dim=int(width * self.mlp_ratio), num_heads=heads, dropout=self.dropout)
      if i < last:
        block = SoftBlock
        kwargs.update(sr_ratio=self.sr_ratios[i], conv_size=self.conv_sizes[i],
                      num_iters=self.newton_iters, dwconv_impl=self.dwconv_impl)
      else:
        block = SoftClassBlock
        kwargs.update(attn_impl=self.attn_impl)
      specs.append(StageSpec(depth, width, block=block, block_kwargs=kwargs,
                             downsample=None if i == 0 else SoftPatchEmbed,
                             cls_token=i == last, block_cycle=first))
    return tuple(specs)

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-6, name="norm")(tokens.x)[:, 0]     # the class token

  def head_init(self):
    return trunc_normal(0.02)


# The official models (models/softmax_free_vision_transformer.py); sr_ratios (8, 4, 2) and
# conv_sizes (9, 5, 3) are the class defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "soft_tiny": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                      depths=(1, 2, 3, 2)),
    "soft_small": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                       depths=(1, 3, 20, 4)),
    "soft_medium": dict(embed_dims=(64, 128, 288, 512), num_heads=(2, 4, 9, 16),
                        depths=(1, 3, 29, 5)),
    "soft_large": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                       depths=(1, 3, 40, 5)),
    "soft_huge": dict(embed_dims=(64, 128, 352, 512), num_heads=(2, 4, 11, 16),
                      depths=(1, 5, 49, 5)),
}

TUPLE_FIELDS = ("embed_dims", "depths", "num_heads", "sr_ratios", "conv_sizes")


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(Soft, kwargs, what="SOFT")
  for field in TUPLE_FIELDS:                     # lists from JSON / the command line
    if isinstance(kwargs.get(field), list):
      kwargs[field] = tuple(kwargs[field])
  return Soft(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
