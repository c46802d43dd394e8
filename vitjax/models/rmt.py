"""RMT (Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision Transformers").

Official structure (qhfan/RMT: classfication_release/RMT.py for RMT-T, `RMT_T3`, and
classification_token_label_release/RMT.py for RMT-S/B/L, `RMT_S`, `RMT_M2`, `RMT_L6`), NHWC here:
  stem      conv 3x3/2 (C/2) -> BN -> GELU -> conv 3x3 (C/2) -> BN -> GELU -> conv 3x3/2 (C)
            -> BN -> GELU -> conv 3x3 (C) -> BN            (stride 4; official `PatchEmbed`)
  stage i   (i > 0: conv 3x3/2 -> BN, official `PatchMerging` at the end of stage i-1) then
            depths[i] blocks
  block     x + DWConv3x3(x)                               (CPE, official `pos`)
            x + DropPath(gamma_1 * MaSA(LN(x)))
            x + DropPath(gamma_2 * FFN(LN(x)))              (LN eps 1e-6; gammas only where the
                                                             stage has layer scale, init 1e-6)
  MaSA      q, k, v = Linear(x); theta-shifted q, k; softmax(q k^T d^-1/2 + log(gamma_h) D) v
            (full, or decomposed along rows then columns: `vitjax.ops.manhattan`), + LCE =
            DWConv5x5(v), then Linear. gamma_h = 1 - 2^(-a - r h / H) per stage (a = init_values,
            r = heads_ranges)
  FFN       fc1 -> GELU -> h + DWConv3x3(h) -> fc2
  head      Linear(C_last -> projection=1024) -> BN -> Swish -> mean over the grid -> Linear.
            Token-labelling models (S/B/L) add `aux_head` (Linear on every last-stage token) and
            at inference return logits + 0.5 * max over tokens of the aux logits, as the official
            eval forward. (Token labelling's dense loss and MixToken are training recipes, not
            part of vitjax; the aux branch is kept so their checkpoints load and evaluate.)
BatchNorm statistics live in `batch_stats` (momentum 0.9 = PyTorch's 0.1, eps 1e-5).

Parameter counts (`params` only, 1000 classes, 224 px) equal the official models'
`sum(p.numel() for p in model.parameters())`, which like `params` leaves out the buffers (BatchNorm
statistics; the per-stage `Relpos.angle/decay` tables, which vitjax computes and does not store):
rmt_t 14,334,216 (README 14M), rmt_s 27,480,240 (27M), rmt_b 54,667,896 (55M), rmt_l 96,105,864
(96M); tests/test_rmt.py pins them. The official models also hold buffers: rmt_t 4,376 values =
4,224 BatchNorm statistics (vitjax's `batch_stats`) + 8 `num_batches_tracked` + 144 decay / angle
values of the `Relpos` tables. The non-token-labelling RMT-S (classfication_release `RMT_S`,
26,967,240) is `create_model('rmt_s', token_label=False)`.

The mixer is registered as 'manhattan_attn' and the block as 'rmt', so e.g. an isotropic ViT can
use MaSA: `create_model('vit_s16', mixer='manhattan_attn', pool='gap')`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import kernels
from vitjax.models import layers
from vitjax.models.backbone import (MultiStageModel, StageSpec, Tokens, build_mixer, call_mixer,
                                    check_per_stage)
from vitjax.models.registry import (register_block, register_downsample, register_mixer,
                                    register_model)
from vitjax.models.spectral_mixers import DepthwiseConv
from vitjax.ops import manhattan as ops

trunc_normal = nn.initializers.truncated_normal
# PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def batch_norm(name: str, train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


@register_downsample("conv_bn")
class ConvBN(nn.Module):
  """k x k stride-s convolution (padding p) then BatchNorm: RMT's patch merging."""
  width: int
  stride: int = 2
  kernel_size: int = 3
  padding: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    k, p = self.kernel_size, self.padding
    x = nn.Conv(self.width, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                kernel_init=torch_conv_init, name="conv")(x)
    return batch_norm("bn", train)(x)


class RMTStem(nn.Module):
  """Official `PatchEmbed`: four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm, GELU between."""
  width: int

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for i, (width, stride) in enumerate(((self.width // 2, 2), (self.width // 2, 1),
                                         (self.width, 2), (self.width, 1))):
      if i:
        x = layers.gelu(x)
      x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  kernel_init=torch_conv_init, name=f"conv_{i}")(x)
      x = batch_norm(f"bn_{i}", train)(x)
    return x


def _depthwise(kernel_size: int, name: str) -> DepthwiseConv:
  return DepthwiseConv(kernel_size, use_bias=True, kernel_init=torch_conv_init, name=name)


@register_mixer("manhattan_attn")
class ManhattanSelfAttention(nn.Module):
  """MaSA with LCE (module docstring, `vitjax.ops.manhattan`); (B, N, D) -> (B, N, D).

  `decomposed` picks the axis-decomposed form (rows, then columns). The decay gamma_h is fixed,
  computed from `init_value` and `heads_range`, not learned. No prefix tokens: every token needs
  a grid position.
  """
  scope_name: ClassVar[str] = "attn"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 1
  init_value: float = 2.0
  heads_range: float = 4.0
  decomposed: bool = False
  lce_kernel: int = 5
  attn_impl: str = "xla"
  dropout: float = 0.0
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    if num_prefix:
      raise ValueError(f"manhattan_attn: every token needs a grid position, but the tokens carry "
                       f"{num_prefix} prefix token(s); use pool='gap' (no class token)")
    b, n, d = x.shape
    h, w = grid
    if d % self.num_heads:
      raise ValueError(f"manhattan_attn: width {d} is not divisible by num_heads={self.num_heads}")
    dense = functools.partial(nn.Dense, d, kernel_init=self.kernel_init,
                              bias_init=nn.initializers.zeros)
    heads = lambda t: t.reshape(b, h, w, self.num_heads, d // self.num_heads)  # noqa: E731
    q, k, v = (dense(name=f"{s}_proj")(x).reshape(b, h, w, d) for s in "qkv")
    lce = _depthwise(self.lce_kernel, "lepe")(v)                        # (B, h, w, D)
    sin, cos = ops.theta_shift_tables(d // self.num_heads, h, w)
    q, k = ops.theta_shift(heads(q), sin, cos), ops.theta_shift(heads(k), sin, cos)
    log_gamma = ops.decay_rates(self.num_heads, self.init_value, self.heads_range)
    form = ops.decomposed_manhattan_attention if self.decomposed else ops.manhattan_attention
    attend = functools.partial(kernels.attention, impl=self.attn_impl)
    y = form(q, k, heads(v), log_gamma, scale=(d // self.num_heads) ** -0.5, attend=attend)
    y = y.reshape(b, h, w, d) + lce
    y = dense(name="out_proj")(y.reshape(b, n, d))
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class RetFFN(nn.Module):
  """Official `FeedForwardNetwork`: fc1 -> GELU -> h + DWConv3x3(h) -> fc2, on the map."""
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):                      # (B, h, w, C)
    dense = functools.partial(nn.Dense, kernel_init=trunc_normal(0.02),
                              bias_init=nn.initializers.zeros)
    h = layers.gelu(dense(self.mlp_dim, name="fc1")(x))
    h = h + _depthwise(3, "dwconv")(h)
    y = dense(x.shape[-1], name="fc2")(h)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


@register_block("rmt")
class RMTBlock(nn.Module):
  """RMT's block (official `RetBlock`): CPE, then pre-norm MaSA and FFN residuals with optional
  layer scale (`layer_scale_init` <= 0: none)."""
  mlp_dim: int
  num_heads: int = 1
  mixer: Any = "manhattan_attn"
  mixer_kwargs: Any = None
  layer_scale_init: float = 0.0
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def _scaled(self, name, y):
    if self.layer_scale_init <= 0:
      return y
    return self.param(name, nn.initializers.constant(self.layer_scale_init), (y.shape[-1],),
                      jnp.float32) * y

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    x_map = tokens.patch_map()                                          # (B, h, w, C)
    b, h, w, c = x_map.shape
    x = (x_map + _depthwise(3, "cpe")(x_map)).reshape(b, h * w, c)
    tokens = tokens.replace(x=x)
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(self._scaled("gamma1", y), train=train)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x).reshape(b, h, w, c)
    y = RetFFN(self.mlp_dim, dropout=self.dropout, name="ffn")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(self._scaled("gamma2", y.reshape(b, h * w, c)),
                                            train=train)
    return tokens.replace(x=x)


_PER_STAGE = ("dims", "num_heads", "init_values", "heads_ranges", "mlp_ratios", "decomposed",
              "layer_scales")


class RMT(MultiStageModel):
  """RMT classifier (module docstring). Per-stage fields hold one entry per stage; parameters are
  `stem`, `stages_{i}/{downsample,blocks_{j}}`, `proj`, `norm` (BatchNorm), `head`, `aux_head`."""
  num_classes: int = 1000
  depths: tuple[int, ...] = (2, 2, 8, 2)
  dims: tuple[int, ...] = (64, 128, 256, 512)
  num_heads: tuple[int, ...] = (4, 4, 8, 16)
  init_values: tuple[float, ...] = (2, 2, 2, 2)
  heads_ranges: tuple[float, ...] = (4, 4, 6, 6)
  mlp_ratios: tuple[float, ...] = (3, 3, 3, 3)
  decomposed: tuple[bool, ...] = (True, True, False, False)   # official `chunkwise_recurrents`
  layer_scales: tuple[bool, ...] = (False, False, False, False)
  layer_scale_init: float = 1e-6
  projection: int = 1024
  token_label: bool = False         # the aux head of the token-labelling models (S/B/L)
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    check_per_stage(self, _PER_STAGE)
    for dim, heads in zip(self.dims, self.num_heads):
      if dim % heads or (dim // heads) % 2:
        raise ValueError(f"dims={self.dims}, num_heads={self.num_heads}: each stage's head width "
                         "dim / heads must be an even integer (the theta shift rotates pairs)")

  def stem_stride(self) -> int:
    return 4

  def stem(self, images, *, train: bool):
    return RMTStem(self.dims[0], name="stem")(images, train=train)

  def stage_specs(self) -> tuple[StageSpec, ...]:
    self.check()
    specs = []
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      specs.append(StageSpec(
          depth, dim, block=RMTBlock,
          block_kwargs=dict(
              mlp_dim=int(self.mlp_ratios[i] * dim), num_heads=self.num_heads[i],
              mixer_kwargs=dict(init_value=self.init_values[i],
                                heads_range=self.heads_ranges[i],
                                decomposed=bool(self.decomposed[i])),
              layer_scale_init=self.layer_scale_init if self.layer_scales[i] else 0.0),
          shared=dict(attn_impl=self.attn_impl, dropout=self.dropout),
          downsample=None if i == 0 else ConvBN))
    return tuple(specs)

  def pool(self, tokens: Tokens, *, train: bool):
    x = nn.Dense(self.projection, kernel_init=trunc_normal(0.02),
                 bias_init=nn.initializers.zeros, name="proj")(tokens.x)
    x = batch_norm("norm", train)(x)
    return jax.nn.silu(x).mean(axis=1)                                  # (B, projection)

  def head_init(self):
    return trunc_normal(0.02)

  def classify(self, pre_logits, out: dict, features: bool, *, kernel_init=None):
    result = super().classify(pre_logits, out, features, kernel_init=kernel_init)
    if not (self.token_label and self.num_classes):
      return result
    logits = result[0] if features else result
    last = out[f"stage{len(self.depths)}"]                              # (B, h, w, C)
    aux = nn.Dense(self.num_classes, kernel_init=trunc_normal(0.02),
                   bias_init=nn.initializers.zeros, name="aux_head")(
                       last.reshape(last.shape[0], -1, last.shape[-1]))
    logits = logits + 0.5 * aux.max(axis=1)
    return (logits, out) if features else logits


# The official ImageNet-1k models: T = `RMT_T3` (classfication_release), S / B / L = `RMT_S`,
# `RMT_M2`, `RMT_L6` (classification_token_label_release, with the token-labelling aux head).
VARIANTS = {
    "rmt_t": dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512), num_heads=(4, 4, 8, 16),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                  decomposed=(True, True, False, False)),
    "rmt_s": dict(depths=(3, 4, 18, 4), dims=(64, 128, 256, 512), num_heads=(4, 4, 8, 16),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
                  decomposed=(True, True, True, False), token_label=True),
    "rmt_b": dict(depths=(4, 8, 25, 8), dims=(80, 160, 320, 512), num_heads=(5, 5, 10, 16),
                  heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
                  decomposed=(True, True, True, False), layer_scales=(False, False, True, True),
                  token_label=True),
    "rmt_l": dict(depths=(4, 8, 25, 8), dims=(112, 224, 448, 640), num_heads=(7, 7, 14, 20),
                  heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
                  decomposed=(True, True, True, False), layer_scales=(False, False, True, True),
                  token_label=True),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(RMT, kwargs, what="RMT")
  return RMT(**{k: tuple(v) if k in _PER_STAGE + ("depths",) else v for k, v in kwargs.items()})


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
