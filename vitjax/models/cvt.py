"""CvT (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to Vision Transformers").

Official structure (microsoft/CvT, lib/models/cls_cvt.py; sizes from
experiments/imagenet/cvt/*.yaml), NHWC here:
  stage i   convolutional token embedding: k x k conv, stride s, padding p (7/4/2, then 3/2/1 and
            3/2/1), then LayerNorm; no position embedding. The last stage then prepends a class
            token. Stage 1's embedding is the model's `stem` (the stride-4 map of feature_info).
  block     x + DropPath(attn(LN(x))),  x + DropPath(MLP(LN(x)))   (LayerNorm eps 1e-5; MLP ratio
            4 with QuickGELU x * sigmoid(1.702 x); `act='gelu'` gives transformers' exact GELU)
  attn      convolutional projection ('conv_proj_attn'): for each of Q, K, V a depthwise 3x3 conv
            (no bias) + BatchNorm on the token map (Q at stride 1, K and V at stride 2), the class
            token skipping the conv and rejoining in front, then a Linear (qkv bias); multi-head
            softmax attention with logits scaled by width ** -0.5 (the official `dim_out ** -0.5`,
            not the head width); output Linear.
  head      LayerNorm on the final tokens -> class token -> Linear.
Linear weights, the class token and the head start from a truncated normal(0.02), biases zero; the
convolutions start from PyTorch's default (uniform with bound 1/sqrt(fan_in)).

The BatchNorm running statistics live in the `batch_stats` collection (momentum 0.9 in Flax's
convention = PyTorch's 0.1, eps 1e-5); `apply(..., train=True, mutable=['batch_stats'])` updates
them.

Parameter counts (`params` only, 1000 classes) equal the official models' `sum(p.numel() for p
in model.parameters())`, which leaves out the BatchNorm buffers as `params` does:
cvt_13 19,997,480; cvt_21 31,622,696; cvt_w24 277,196,392 (README: 20M, 32M, 277M; the
transformers models of the same configs count the same).

Drop-path: the official code draws linspace(0, r_i, depth_i) per stage (r = 0, 0, 0.1 for CvT-13);
here `drop_path` is the backbone's one schedule rising over all blocks (training only).

The mixer is registered as 'conv_proj_attn' and works in any block that passes the grid, e.g.
an isotropic ViT: `create_model('vit_nano4', mixer='conv_proj_attn', pool='gap')`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices, kernels
from vitjax.models import layers
from vitjax.models.backbone import (MultiStageModel, StageSpec, Tokens, build_mixer,
                                    call_mixer, check_per_stage)
from vitjax.models.registry import register_block, register_mixer, register_model
from vitjax.ops import conv_attention as ops

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ACTS: dict[str, Callable] = {"quick_gelu": ops.quick_gelu, "gelu": layers.gelu}


def check_act(act: str):
  choices.check("act", act, ACTS)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution without bias (`vitjax.ops.conv.depthwise_conv2d`)."""
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  kernel_init: Callable = torch_conv_init

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
    return ops.depthwise_conv2d(x, kernel, stride=self.stride, padding=self.padding)


class ConvProjection(nn.Module):
  """Official `conv_proj_q/k/v`: depthwise conv ('conv') then BatchNorm ('bn') on the map."""
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x_map, *, train: bool = False):
    y = DepthwiseConv(self.kernel_size, self.stride, self.padding, name="conv")(x_map)
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_eps, name="bn")(y)


@register_mixer("conv_proj_attn")
class ConvProjectionAttention(nn.Module):
  """CvT's convolutional projection attention (module docstring); (B, N, D) -> (B, N, D).

  Prefix tokens (`num_prefix`, CvT's class token) skip the convolutions and are concatenated in
  front of the flattened maps before the linear projections proj_q/k/v, as in the official code.
  `scale=None` is the official width ** -0.5.
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 1
  qkv_bias: bool = True
  kernel_size: int = 3
  stride_q: int = 1
  stride_kv: int = 2
  padding_q: int = 1
  padding_kv: int = 1
  scale: float | None = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  kernel_init: Callable = trunc_normal(0.02)

  def _check(self, grid):
    for field in ("kernel_size", "stride_q", "stride_kv"):
      if getattr(self, field) < 1:
        raise ValueError(f"conv_proj_attn: {field}={getattr(self, field)}; allowed values are >= 1")
    for field, stride in (("padding_q", self.stride_q), ("padding_kv", self.stride_kv)):
      pad = getattr(self, field)
      sides = [ops.conv_output_size(n, self.kernel_size, stride, pad) for n in grid]
      if pad < 0 or min(sides) < 1:
        raise ValueError(f"conv_proj_attn: {field}={pad} with kernel_size={self.kernel_size} and "
                         f"stride {stride} leaves no tokens of the {grid} grid; allowed values are "
                         f"paddings >= 0 that keep the map non-empty")

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    self._check(grid)
    d = x.shape[-1]
    prefix, x_map = layers.tokens_to_grid(x, grid, num_prefix)          # (B, P, D), (B, h, w, D)
    proj = functools.partial(ConvProjection, self.kernel_size, bn_momentum=self.bn_momentum,
                             bn_eps=self.bn_eps)
    q = proj(self.stride_q, self.padding_q, name="conv_proj_q")(x_map, train=train)
    k = proj(self.stride_kv, self.padding_kv, name="conv_proj_k")(x_map, train=train)
    v = proj(self.stride_kv, self.padding_kv, name="conv_proj_v")(x_map, train=train)
    dense = functools.partial(nn.Dense, d, use_bias=self.qkv_bias, kernel_init=self.kernel_init,
                              bias_init=nn.initializers.zeros)
    q = dense(name="proj_q")(ops.prefix_concat(prefix, q))              # (B, T, D)
    k = dense(name="proj_k")(ops.prefix_concat(prefix, k))              # (B, S, D), S ~ T/4
    v = dense(name="proj_v")(ops.prefix_concat(prefix, v))
    scale = d ** -0.5 if self.scale is None else self.scale
    y = kernels.attention(ops.split_heads(q, self.num_heads), ops.split_heads(k, self.num_heads),
                          ops.split_heads(v, self.num_heads), scale=scale, impl=self.attn_impl)
    y = nn.Dense(d, kernel_init=self.kernel_init, bias_init=nn.initializers.zeros,
                 name="proj")(ops.merge_heads(y))
    return nn.Dropout(self.dropout, deterministic=not train)(y)


@register_block("cvt")
class CvtBlock(nn.Module):
  """CvT's pre-norm block (official `Block`): norm1 -> attn, norm2 -> mlp, each with DropPath."""
  mlp_dim: int
  num_heads: int = 1
  mixer: Any = "conv_proj_attn"
  mixer_kwargs: Any = None
  act: str = "quick_gelu"
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    check_act(self.act)
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    x = tokens.x
    y = nn.LayerNorm(epsilon=self.eps, name="norm1")(x)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = nn.LayerNorm(epsilon=self.eps, name="norm2")(x)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, act=ACTS[self.act],
                        kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros,
                        name="mlp")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return tokens.replace(x=x)


_PER_STAGE = ("dims", "num_heads", "patch_sizes", "patch_strides", "patch_paddings")


class CvT(MultiStageModel):
  """Convolutional vision Transformer classifier (module docstring). Per-stage fields are tuples
  with one entry per stage; parameters are nested `stem`, `stages_{i}/{downsample,blocks_{j},
  cls_token}`, `norm`, `head`."""
  num_classes: int = 1000
  depths: tuple[int, ...] = (1, 2, 10)
  dims: tuple[int, ...] = (64, 192, 384)
  num_heads: tuple[int, ...] = (1, 3, 6)
  patch_sizes: tuple[int, ...] = (7, 3, 3)
  patch_strides: tuple[int, ...] = (4, 2, 2)
  patch_paddings: tuple[int, ...] = (2, 1, 1)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  kernel_size: int = 3
  stride_q: int = 1
  stride_kv: int = 2
  padding_q: int = 1
  padding_kv: int = 1
  cls_token: bool = True            # class token in the last stage (else: mean of the tokens)
  act: str = "quick_gelu"           # 'quick_gelu' (official) or 'gelu' (transformers)
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    check_per_stage(self, _PER_STAGE)
    check_act(self.act)

  def stem_stride(self) -> int:
    return self.patch_strides[0]

  def stem(self, images, *, train: bool):
    return layers.ConvNorm(self.dims[0], stride=self.patch_strides[0],
                           kernel_size=self.patch_sizes[0], padding=self.patch_paddings[0],
                           eps=1e-5, kernel_init=torch_conv_init, name="stem")(images)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    self.check()
    mixer_kwargs = dict(qkv_bias=self.qkv_bias, kernel_size=self.kernel_size,
                        stride_q=self.stride_q, stride_kv=self.stride_kv,
                        padding_q=self.padding_q, padding_kv=self.padding_kv)
    specs, last = [], len(self.depths) - 1
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      down = None if i == 0 else dict(stride=self.patch_strides[i],
                                      kernel_size=self.patch_sizes[i],
                                      padding=self.patch_paddings[i], eps=1e-5,
                                      kernel_init=torch_conv_init)
      specs.append(StageSpec(
          depth, dim, block=CvtBlock,
          block_kwargs=dict(mlp_dim=int(dim * self.mlp_ratio), num_heads=self.num_heads[i],
                            mixer_kwargs=mixer_kwargs, act=self.act),
          shared=dict(attn_impl=self.attn_impl, dropout=self.dropout),
          downsample=None if i == 0 else "conv_norm", downsample_kwargs=down,
          cls_token=self.cls_token and i == last))
    return tuple(specs)

  def pool(self, tokens: Tokens, *, train: bool):
    x = nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x)
    return x[:, 0] if self.cls_token else x.mean(axis=1)              # (B, D_last)

  def head_init(self):
    return trunc_normal(0.02)


# The official ImageNet models (experiments/imagenet/cvt/*.yaml): patch sizes 7/3/3, strides
# 4/2/2, paddings 2/1/1, MLP ratio 4, qkv bias, 3x3 projections with K/V stride 2, class token in
# the last stage.
VARIANTS = {
    "cvt_13": dict(depths=(1, 2, 10), dims=(64, 192, 384), num_heads=(1, 3, 6)),
    "cvt_21": dict(depths=(1, 4, 16), dims=(64, 192, 384), num_heads=(1, 3, 6)),
    "cvt_w24": dict(depths=(2, 2, 20), dims=(192, 768, 1024), num_heads=(3, 12, 16)),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(CvT, kwargs, what="CvT")
  return CvT(**{k: tuple(v) if k in _PER_STAGE + ("depths",) else v for k, v in kwargs.items()})


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
