"""SReT (Shen, Liu & Xing, ECCV 2022, "Sliced Recursive Transformer") on the multi-stage backbone.

Structure (szq0214/SReT, SReT.py), NHWC here:
  stem      three 3x3 stride-2 convs (C/2, C, C; bias), each -> BatchNorm -> ReLU (stride 8),
            + a learned position table `pos_embed` of the stem map's size (H/8 x W/8 x C)
  stage i   (i > 0: 'conv_head_pool', PiT's pooling: a 3x3 stride-2 conv, padding 1, one group
            per input channel, C_i -> C_{i+1}) then depths[i] / 2 recursive units
  unit      one shared block F applied twice, each use followed by its own NLL block:
              x = NLL_1(F(NLL_0(F(x; G1)); G2, permuted))
            (the official list `blocks` = [F_r, NLL_2r, F_r, NLL_2r+1] per unit r)
  F         x = a1 x + a2 DropPath(SGA(LN(x)))      (SGA: sliced group self-attention, G groups)
            x = a3 x + a4 DropPath(MLP(LN(x)))      (LN eps 1e-6, exact GELU,
                                                     MLP hidden int(C * mlp_ratio))
  NLL       x = b1 x + b2 MLP(LN(x))                (hidden int(C * np_mlp_ratio); no drop path)
  a1..a4, b1, b2: learnable scalars, init 1 (official `coefficientN`)
  head      mean over the tokens -> LayerNorm (eps 1e-6) -> Linear (the norm after the pooling)

Sliced group self-attention ('sliced_group_attn', `vitjax.ops.sliced`): the tokens are cut into
G contiguous groups that attend within themselves; F's first use has G1 groups per stage, its
recursive use G2, and when G2 > 1 the tokens are permuted before the grouping (and restored
after), so the recursive pass mixes tokens across the first pass's groups.

Where the permutation comes from. The official code draws `torch.randperm(N)` from torch's global
generator on every recursive pass with G2 > 1, one permutation for the whole batch, in training
AND at eval (it does not look at `self.training`), so its eval logits are random. vitjax makes
the source explicit:
  * an rng stream 'permute', when the caller passes one, always wins (train or eval:
    `apply(..., rngs={'permute': key})` reproduces the official stochastic eval);
  * otherwise in training (train=True) the permutations come from the 'dropout' stream, the
    one the runner (vitjax.train) already passes, so training needs nothing new;
  * otherwise (train=False, no 'permute' rng) one fixed permutation per token count
    (`ops.sliced.fixed_permutation`): eval is deterministic, and every call sees one fixed
    sample of the official eval's random grouping.

Differences from the official code: drop-path rates rise linearly over the recursive units with
the backbone's one rule (`drop_path_rates`; the official rate of unit r of a stage starting at
block b is rate * (b + r) / sum(depths)); the default initialisers are the backbone's
(truncated-normal 0.02 Linear kernels, zero biases), not PyTorch's defaults; `pos_embed` is
sized from the input at init, so a model runs at the resolution it was initialised with.
Additions: `stem_strides` (official (2, 2, 2); small images use e.g. (2, 1, 1)) and
`dwconv_impl`, how the pooling's grouped conv is computed (`ChannelMultiplierConv`).

Parameter counts at 224 px and 1000 classes equal the official `sum(p.numel() for p in
model.parameters())` (tests/test_sret.py pins them): sret_t 4,755,979 (SReT_T, paper 4.8M,
1.1G FLOPs), sret_lt 4,988,024 (SReT_LT, 5.0M, 1.2G), sret_s 20,899,692 (SReT_S, 20.9M, 4.2G).
XLA's cost analysis at 224 px (`python -m experiments.gmacs --models=sret_t,sret_lt,sret_s`,
multiply-accumulates): 1.13, 1.19 and 4.21 GMACs; without slicing (groups1 = groups2 = 1)
sret_t 1.39 and sret_s 4.72, the official README's 1.4G and 4.7G for the unsliced models.
The official `*_distill` models are the same networks (their forward returns the one head's
logits), so their weights load into the same names. The official code defines no SReT-B.
`vitjax.convert.from_official` loads the official weights (experiments/golden/sret.py).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices, kernels
from vitjax.models import layers
from vitjax.models.backbone import MultiStageModel, StageSpec, Tokens, check_per_stage
from vitjax.models.mixers import out_projection, qkv_projections
from vitjax.models.registry import (register_block, register_downsample, register_mixer,
                                    register_model)
from vitjax.models.rmt import batch_norm
from vitjax.models.swin import check_positive
from vitjax.ops import conv, sliced

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@register_mixer("sliced_group_attn")
class SlicedGroupAttention(nn.Module):
  """Multi-head self-attention within `num_groups` contiguous token groups, optionally after a
  token permutation (module docstring; `vitjax.ops.sliced`); (B, N, D) -> (B, N, D).

  The call may override `num_groups` and `permute` (SReT's shared block calls the same
  parameters with G1 and then with G2, permuted). A permutation is drawn only when permute is
  set and G > 1: from the 'permute' rng stream if given, else from 'dropout' when train=True,
  else the fixed `sliced.fixed_permutation(N)`.
  Parameters: `query`, `key`, `value`, `out` (as 'mhsa'; the official fused `qkv` and `proj`).
  """
  scope_name: ClassVar[str] = "attn"
  num_heads: int = 8
  num_groups: int = 1
  permute: bool = False
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  def permutation(self, n: int, train: bool):
    if self.has_rng("permute"):
      return sliced.random_permutation(self.make_rng("permute"), n)
    if train:
      return sliced.random_permutation(self.make_rng("dropout"), n)
    return jnp.asarray(sliced.fixed_permutation(n))

  @nn.compact
  def __call__(self, x, *, train: bool = False, num_groups: int | None = None,
               permute: bool | None = None):
    groups = self.num_groups if num_groups is None else num_groups
    permute = self.permute if permute is None else permute
    b, n, d = x.shape
    sliced.check_groups(n, groups)
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init)          # (B, N, H, d)
    perm = self.permutation(n, train) if permute and groups > 1 else None
    y = sliced.sliced_group_attention(q, k, v, num_groups=groups, scale=q.shape[-1] ** -0.5,
                                      perm=perm, impl=self.attn_impl)
    return out_projection(y, d, kernel_init=self.kernel_init, dropout=self.dropout, train=train)


def _coefficient(module: nn.Module, name: str):
  """A learnable residual scalar, init 1 (official `LearnableCoefficient`)."""
  return module.param(name, nn.initializers.ones, (), jnp.float32)


def _mlp(hidden: int, dropout: float, name: str) -> layers.MlpBlock:
  return layers.MlpBlock(hidden, dropout=dropout, kernel_init=trunc_normal(0.02),
                         bias_init=nn.initializers.zeros, name=name)


class SharedBlock(nn.Module):
  """F, the block a recursive unit applies twice (`norm1`, `attn`, `norm2`, `mlp`,
  `coefficient1..4`): x = a1 x + a2 DropPath(SGA(LN x)); x = a3 x + a4 DropPath(MLP(LN x))."""
  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, *, num_groups: int, permute: bool, train: bool = False):
    a = [_coefficient(self, f"coefficient{i}") for i in range(1, 5)]
    attn = SlicedGroupAttention(self.num_heads, qkv_bias=self.qkv_bias, attn_impl=self.attn_impl,
                                dropout=self.dropout, name="attn")
    y = attn(nn.LayerNorm(epsilon=self.eps, name="norm1")(x), train=train,
             num_groups=num_groups, permute=permute)
    x = a[0] * x + a[1] * layers.DropPath(self.drop_path)(y, train=train)
    y = _mlp(self.mlp_dim, self.dropout, "mlp")(nn.LayerNorm(epsilon=self.eps, name="norm2")(x),
                                                train=train)
    return a[2] * x + a[3] * layers.DropPath(self.drop_path)(y, train=train)


class NonLinearProjection(nn.Module):
  """NLL, the non-shared block after each use of F (`norm1`, `mlp`, `coefficient1..2`):
  x = b1 x + b2 MLP(LN x)."""
  mlp_dim: int
  dropout: float = 0.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    b1, b2 = _coefficient(self, "coefficient1"), _coefficient(self, "coefficient2")
    y = _mlp(self.mlp_dim, self.dropout, "mlp")(nn.LayerNorm(epsilon=self.eps, name="norm1")(x),
                                                train=train)
    return b1 * x + b2 * y


@register_block("sret")
class RecursiveUnit(nn.Module):
  """One recursive unit: F (`block`, shared) with G1 groups -> `nll_0` -> F again with G2 groups
  (permuted when G2 > 1) -> `nll_1`. A stage of official depth D holds D / 2 units."""
  mlp_dim: int
  nll_mlp_dim: int
  num_heads: int
  groups1: int = 1
  groups2: int = 1
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    block = SharedBlock(self.mlp_dim, self.num_heads, self.qkv_bias, self.attn_impl, self.dropout,
                        self.drop_path, self.eps, name="block")
    x = tokens.x
    for i, (groups, permute) in enumerate(((self.groups1, False), (self.groups2, True))):
      x = block(x, num_groups=groups, permute=permute, train=train)       # same parameters
      x = NonLinearProjection(self.nll_mlp_dim, self.dropout, self.eps, name=f"nll_{i}")(
          x, train=train)
    return tokens.replace(x=x)


class ChannelMultiplierConv(nn.Module):
  """A k x k stride-s conv (padding p, bias) with one group per input channel, each feeding
  `features / C_in` outputs (output channel c * m + j reads input channel c): `nn.Conv` with
  feature_group_count=C_in, same parameters (`kernel` (k, k, 1, features), `bias`).

  impl 'shift' repeats each input channel m times and runs `ops.conv.depthwise_conv2d` (k*k
  strided slices); 'xla' is the grouped `lax.conv_general_dilated`, whose kernel gradient took
  about 100x its forward time on XLA:CPU (SReT's 14x14x32 -> 7x7x64 pooling at batch 128);
  'auto' is 'shift' on CPU, 'xla' elsewhere.
  """
  features: int
  kernel_size: int = 3
  stride: int = 2
  padding: int = 1
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c, k, s, p = x.shape[-1], self.kernel_size, self.stride, self.padding
    if self.features % c:
      raise ValueError(f"conv_head_pool: width {self.features} is not a multiple of the {c} "
                       "input channels (one group per input channel)")
    kernel = self.param("kernel", torch_conv_init, (k, k, 1, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    impl = choices.check("dwconv_impl", self.impl, conv.DWCONV_IMPLS)
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "xla"
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c)
    else:
      y = conv.depthwise_conv2d(jnp.repeat(x, self.features // c, axis=-1), kernel, stride=s,
                                padding=p)
    return y + bias


@register_downsample("conv_head_pool")
class ConvHeadPooling(nn.Module):
  """PiT's pooling between stages (SReT's `conv_head_pooling`): an (s+1) x (s+1) stride-s conv
  with padding s // 2, bias, and one group per input channel (width must be a multiple of the
  input channels); `conv` is a `ChannelMultiplierConv`."""
  width: int
  stride: int = 2
  dwconv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    s = self.stride
    return ChannelMultiplierConv(self.width, s + 1, s, s // 2, self.dwconv_impl, name="conv")(x)


class SReTStem(nn.Module):
  """Official `conv_embedding` (conv{1,2,3} 3x3, padding 1, with BatchNorm bn{1,2,3} and ReLU;
  official strides 2, 2, 2) plus the learned `pos_embed` and its dropout."""
  width: int
  strides: tuple[int, ...] = (2, 2, 2)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    widths = (int(self.width / 2), self.width, self.width)
    for i, (width, s) in enumerate(zip(widths, self.strides), start=1):
      x = nn.Conv(width, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)),
                  kernel_init=torch_conv_init, name=f"conv{i}")(x)
      x = nn.relu(batch_norm(f"bn{i}", train)(x))
    pos = self.param("pos_embed", trunc_normal(0.02), (1, *x.shape[1:]), jnp.float32)
    return nn.Dropout(self.dropout, deterministic=not train)(x + pos)


def _conv_out(n: int, stride: int = 2) -> int:
  return (n - 1) // stride + 1          # a 3x3 conv with padding 1


class SReT(MultiStageModel):
  """Hierarchical SReT classifier (module docstring).

  dims: width per stage (official base_dims[i] * heads[i]); num_heads: heads per stage;
  depths: the official per-stage depth, uses of shared blocks (each of the depth / 2 shared
  blocks runs twice); groups1 / groups2: SGA groups on the first / recursive use per stage;
  mlp_ratio / np_mlp_ratio: hidden widths of F's and the NLL blocks' MLPs.
  stem_strides: the strides of the stem's three convs (official (2, 2, 2); small images may
    use e.g. (2, 1, 1), configs/sret.py).
  Parameter tree: `stem/{conv1..3,bn1..3,pos_embed}`, `stages_{i}/downsample/conv` (i > 0),
  `stages_{i}/blocks_{r}/{block,nll_0,nll_1}`, `norm`, `head`; BatchNorm statistics in
  `batch_stats/stem`.
  """
  num_classes: int = 1000
  dims: tuple[int, ...] = (64, 128, 256)
  depths: tuple[int, ...] = (4, 10, 6)
  num_heads: tuple[int, ...] = (2, 4, 8)
  groups1: tuple[int, ...] = (8, 4, 1)
  groups2: tuple[int, ...] = (2, 1, 1)
  mlp_ratio: float = 3.6
  np_mlp_ratio: float = 1.0
  stem_strides: tuple[int, ...] = (2, 2, 2)
  dwconv_impl: str = "auto"     # the pooling conv: 'auto', 'shift' or 'xla' (ChannelMultiplierConv)
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    if not self.depths:
      raise ValueError("depths=(): allowed values are one even block count per stage")
    check_per_stage(self, ("dims", "num_heads", "groups1", "groups2"))
    check_positive("SReT", depths=tuple(self.depths), dims=tuple(self.dims),
                   num_heads=tuple(self.num_heads), groups1=tuple(self.groups1),
                   groups2=tuple(self.groups2), stem_strides=tuple(self.stem_strides))
    if len(self.stem_strides) != 3:
      raise ValueError(f"SReT: stem_strides={tuple(self.stem_strides)} needs one stride per stem "
                       "conv (3)")
    choices.check("attn_impl", self.attn_impl, kernels.IMPLS)
    choices.check("dwconv_impl", self.dwconv_impl, conv.DWCONV_IMPLS)
    for i, (depth, dim, heads) in enumerate(zip(self.depths, self.dims, self.num_heads)):
      if depth % 2:
        raise ValueError(f"SReT stage {i + 1}: depths[{i}]={depth}; allowed values are even "
                         "(each shared block is used twice)")
      if dim % heads:
        raise ValueError(f"SReT stage {i + 1}: dims[{i}]={dim} is not divisible by "
                         f"num_heads[{i}]={heads}")
      if i and dim % self.dims[i - 1]:
        raise ValueError(f"SReT stage {i + 1}: dims[{i}]={dim} is not a multiple of "
                         f"dims[{i - 1}]={self.dims[i - 1]} (the pooling conv has one group per "
                         "input channel)")

  def stage_grids(self, image_hw) -> list[tuple[int, int]]:
    """The token grid of each stage for an (H, W) image."""
    grid = tuple(image_hw)
    for s in self.stem_strides:
      grid = tuple(_conv_out(n, s) for n in grid)
    grids = [grid]
    for _ in self.depths[1:]:
      grid = tuple(_conv_out(n) for n in grid)
      grids.append(grid)
    return grids

  def check_groups(self, image_hw):
    """One clear error for a group count that does not divide its stage's token count."""
    for i, (h, w) in enumerate(self.stage_grids(image_hw)):
      for field in ("groups1", "groups2"):
        g = getattr(self, field)[i]
        sliced.check_groups(h * w, g, where=f"SReT stage {i + 1} ({field}[{i}]={g}, a {h}x{w} "
                                            f"map at {image_hw[0]}x{image_hw[1]} px)")

  def stem_stride(self) -> int:
    return math.prod(self.stem_strides)

  def stem(self, images, *, train: bool):
    self.check_groups(images.shape[1:3])
    return SReTStem(self.dims[0], tuple(self.stem_strides), self.dropout, name="stem")(
        images, train=train)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(depth // 2, dim, block=RecursiveUnit,
                  block_kwargs=dict(mlp_dim=int(dim * self.mlp_ratio),
                                    nll_mlp_dim=int(dim * self.np_mlp_ratio), num_heads=heads,
                                    groups1=g1, groups2=g2, qkv_bias=self.qkv_bias,
                                    attn_impl=self.attn_impl, dropout=self.dropout),
                  downsample=None if i == 0 else ConvHeadPooling,
                  downsample_kwargs=None if i == 0 else dict(dwconv_impl=self.dwconv_impl))
        for i, (depth, dim, heads, g1, g2) in enumerate(
            zip(self.depths, self.dims, self.num_heads, self.groups1, self.groups2)))

  def pool(self, tokens: Tokens, *, train: bool):
    return nn.LayerNorm(epsilon=1e-6, name="norm")(tokens.x.mean(axis=1))   # (B, C_last)

  def head_init(self):
    return trunc_normal(0.02)


# The official models (SReT.py: SReT_T, SReT_LT, SReT_S; base_dims x heads = dims).
VARIANTS: dict[str, dict[str, Any]] = {
    "sret_t": dict(dims=(64, 128, 256), num_heads=(2, 4, 8), mlp_ratio=3.6, np_mlp_ratio=1.0),
    "sret_lt": dict(dims=(64, 128, 256), num_heads=(2, 4, 8), mlp_ratio=4.0, np_mlp_ratio=1.0),
    "sret_s": dict(dims=(126, 252, 504), num_heads=(3, 6, 12), mlp_ratio=3.0, np_mlp_ratio=2.0),
}
_TUPLES = ("dims", "depths", "num_heads", "groups1", "groups2", "stem_strides")


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(SReT, kwargs, what="SReT")
  for field in _TUPLES:            # lists from JSON / the command line
    if isinstance(kwargs.get(field), list):
      kwargs[field] = tuple(kwargs[field])
  return SReT(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
