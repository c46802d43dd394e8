"""T2T-ViT (Yuan et al., ICCV 2021, "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet").

Structure (yitu-opensource/T2T-ViT, models/t2t_vit.py, token_performer.py, token_transformer.py),
NHWC here:
  T2T module  T_0 = SoftSplit_{7, s4, p2}(I)                                  (B, H/4, W/4, 49 C)
              then twice:  T_i = T2T-layer(T_{i-1}) (width token_dim = 64), re-structurized into
              its map and soft-split again, SoftSplit_{3, s2, p1}           (B, H/8 .. H/16, 576)
              and a Linear `project` to embed_dim: (B, H/16, W/16, D), the model's 'stem'.
              The soft split is `vitjax.ops.soft_split` (PyTorch's Unfold, overlapping patches).
  T2T layer   tokens_type='performer' (official default; `TokenPerformer`):
                x = LN(x);  k, q, v = Linear(x)  (width token_dim each, in that order)
                x = v + Drop(Linear(Performer(q, k, v)))  (`vitjax.ops.performer`, m = token_dim / 2
                    frozen random features)
                x = x + Drop(MLP(LN(x)))                  (MLP ratio 1; Drop: fixed p = 0.1)
              tokens_type='transformer' (the official t2t_vit_t_*; `TokenTransformer`): the same
              with single-head softmax attention (q, k, v from one Linear without bias; logits
              scaled by the layer's *input* width^-1/2, i.e. 147^-1/2 and 576^-1/2, the official
              `dim // num_heads`), no dropout. Both use v (not x) as the attention's skip: the
              width changes from the input's to token_dim there.
  backbone    class token, fixed 1-D sinusoid position table (Vaswani et al.) over the N + 1
              tokens, then `depth` pre-norm blocks (the 'cvt' block with the SelfAttention mixer:
              LayerNorm eps 1e-5, q/k/v without bias, MLP ratio `mlp_ratio`, exact GELU), a final
              LayerNorm and the head on the class token.
Linear weights, the class token and the head start from a truncated normal(0.02), biases zero.

Frozen tensors. The official code keeps two non-trained tensors as parameters: the sinusoid table
`pos_embed` ((N + 1) x D) and each Performer layer's random features `w` (m x token_dim). Here the
table is a constant computed from the token count (so any input size that is a multiple of the
total stride works), and the random features are variables of the `batch_stats` collection (the
non-trainable collection the runner, checkpoints, converters, evaluate and predict carry; the
model never updates them): drawn at init as the official code draws them (orthogonal rows times
sqrt(m)), carried over by `vitjax.convert.from_official`. So `params` counts the official
trainable parameters, and params + batch_stats + the table equal the official parameter count:
t2t_vit_7 4,255,694 + 4,096 + 50,432 = 4,310,222; t2t_vit_14 21,465,806 + 4,096 + 75,648 =
21,545,550 (tests/test_t2t.py computes the relation).

qk_scale. The official constructors set `qk_scale = embed_dim ** -0.5` only with pretrained=True,
a path whose download URL is empty (it leaves a random model); the released checkpoints are
evaluated with main.py, i.e. pretrained=False and the default head_dim ** -0.5. vitjax's default
is that one; `qk_scale` sets another logit scale for the backbone's attention.

Sizes: t2t_vit_7/10/12 embed 256, 4 heads, MLP ratio 2, depth 7/10/12; t2t_vit_14 (384, 6 heads),
_19 (448, 7), _24 (512, 8), MLP ratio 3; t2t_vit_t_14/19/24 as those with transformer T2T layers.
At 224 px XLA's cost analysis (`python -m experiments.gmacs`, flops / 2) gives 1.16, 1.53, 1.78,
4.82, 8.53 and 13.72 GMACs for t2t_vit_7 .. _24 and 6.13, 9.84, 15.04 for t2t_vit_t_14 .. _24 (the
official README: 1.1, 1.5, 1.8, 4.8, 8.5, 13.8 and 6.1, 9.8, 15.0 G MACs). `vitjax.convert.
from_official` loads the official weights: logits agree to 1.0e-6 (t2t_vit_7), 1.6e-6 (t2t_vit_14)
and 1.3e-6 (t2t_vit_t_14) at full size (experiments/golden/t2t.py).
"""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import choices, kernels
from vitjax.models import layers
from vitjax.models.backbone import Classifier, Encoder, FeatureInfo, Tokens, check_feature_blocks
from vitjax.models.cvt import CvtBlock
from vitjax.models.mixers import MultiHeadSelfAttention, out_projection, qkv_projections
from vitjax.models.registry import register_model
from vitjax.ops import performer, soft_split

TOKENS_TYPES = ("performer", "transformer")
trunc_normal = nn.initializers.truncated_normal


def sinusoid_table(n: int, dim: int) -> np.ndarray:
  """(n, dim) table: angle(p, j) = p / 10000^(2 floor(j/2) / dim); sin on even j, cos on odd j."""
  angle = np.arange(n)[:, None] / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
  table = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle))
  return table.astype(np.float32)


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=trunc_normal(0.02),
                  bias_init=nn.initializers.zeros, name=name)


def _mlp(x, ratio: float, dropout: float, train: bool):
  """LN -> Linear -> GELU -> Linear -> Drop, out width = in width (`norm2`, `mlp`)."""
  d = x.shape[-1]
  y = nn.LayerNorm(epsilon=1e-5, name="norm2")(x)
  y = layers.MlpBlock(int(d * ratio), kernel_init=trunc_normal(0.02),
                      bias_init=nn.initializers.zeros, name="mlp")(y, train=train)
  return nn.Dropout(dropout, deterministic=not train)(y)


class TokenPerformer(nn.Module):
  """T2T layer with Performer attention (module docstring): (B, N, C) -> (B, N, dim).

  Parameters `norm1`, `kqv`, `proj`, `norm2`, `mlp`; the random features omega (m, dim),
  m = int(dim * kernel_ratio), are `batch_stats/.../random_features`.
  """
  dim: int
  kernel_ratio: float = 0.5
  dropout: float = 0.1
  eps: float = 1e-8

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    m = int(self.dim * self.kernel_ratio)
    if m < 1:
      raise ValueError(f"kernel_ratio={self.kernel_ratio} gives {m} random features for "
                       f"token_dim={self.dim}; allowed values give at least one")
    if not self.is_initializing() and not self.has_variable("batch_stats", "random_features"):
      raise ValueError("the Performer T2T layers keep their random features in the 'batch_stats' "
                       "collection; apply the model with variables={'params': ..., "
                       "'batch_stats': ...} as init returned them")
    init = nn.initializers.orthogonal(scale=math.sqrt(m))
    omega = self.variable("batch_stats", "random_features",
                          lambda: init(self.make_rng("params"), (m, self.dim), jnp.float32)).value
    y = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
    k, q, v = jnp.split(_dense(3 * self.dim, "kqv")(y), 3, axis=-1)     # (B, N, dim) each
    y = performer.performer_attention(q, k, v, omega.astype(q.dtype), eps=self.eps)
    x = v + nn.Dropout(self.dropout, deterministic=not train)(_dense(self.dim, "proj")(y))
    return x + _mlp(x, 1.0, self.dropout, train)


class TokenTransformer(nn.Module):
  """T2T layer with single-head softmax attention (module docstring): (B, N, C) -> (B, N, dim).

  Parameters `norm1`, `qkv` (no bias), `proj`, `norm2`, `mlp`. Logits are scaled by C^-1/2.
  """
  dim: int
  mlp_ratio: float = 1.0
  attn_impl: str = "xla"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    y = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
    q, k, v = jnp.split(_dense(3 * self.dim, "qkv", use_bias=False)(y), 3, axis=-1)
    y = kernels.attention(q[:, :, None], k[:, :, None], v[:, :, None],
                          scale=x.shape[-1] ** -0.5, impl=self.attn_impl)[:, :, 0]
    x = v + nn.Dropout(self.dropout, deterministic=not train)(_dense(self.dim, "proj")(y))
    return x + _mlp(x, self.mlp_ratio, self.dropout, train)


class TokensToToken(nn.Module):
  """The T2T module: soft split, then (T2T layer, re-structurization, soft split) per further
  split, then `project`: (B, H, W, C) -> (B, H/s, W/s, embed_dim), s = prod(strides).

  Layers are named `attention1`, `attention2`, ... as in the official code.
  """
  embed_dim: int
  tokens_type: str = "performer"
  token_dim: int = 64
  kernel_sizes: tuple[int, ...] = (7, 3, 3)
  strides: tuple[int, ...] = (4, 2, 2)
  paddings: tuple[int, ...] = (2, 1, 1)
  kernel_ratio: float = 0.5
  dropout: float | None = None        # None: 0.1 in Performer layers, 0 in transformer ones
  attn_impl: str = "xla"

  def layer(self, name: str) -> nn.Module:
    if self.tokens_type == "performer":
      drop = 0.1 if self.dropout is None else self.dropout
      return TokenPerformer(self.token_dim, self.kernel_ratio, drop, name=name)
    return TokenTransformer(self.token_dim, attn_impl=self.attn_impl,
                            dropout=self.dropout or 0.0, name=name)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    splits = list(zip(self.kernel_sizes, self.strides, self.paddings))
    x = soft_split.soft_split(images, *splits[0])                      # T_0 as a map
    for i, split in enumerate(splits[1:]):
      b, h, w, c = x.shape
      t = self.layer(f"attention{i + 1}")(x.reshape(b, h * w, c), train=train)
      x = soft_split.soft_split(t.reshape(b, h, w, -1), *split)        # re-structurize, split
    return _dense(self.embed_dim, "project")(x)


class SelfAttention(MultiHeadSelfAttention):
  """'mhsa' (parameters `query`, `key`, `value`, `out`) with a given logit scale; scale=None is
  head_dim ** -0.5. Scope `attn`."""
  scope_name: ClassVar[str] = "attn"
  scale: float | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init)     # (B, N, H, d)
    scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
    y = kernels.attention(q, k, v, scale=scale, impl=self.attn_impl)
    return out_projection(y, x.shape[-1], kernel_init=self.kernel_init, dropout=self.dropout,
                          train=train)


class T2TViT(Classifier):
  """T2T-ViT classifier (module docstring).

  kernel_sizes / strides / paddings: the soft splits, one entry each (the first splits the image;
  each further one follows a T2T layer). Each needs 2 padding < kernel <= 2 padding + stride, so a
  map side n * stride gives n tokens; images are multiples of the total stride prod(strides).
  t2t_dropout: dropout in the T2T layers; None is the official 0.1 (Performer) / 0 (transformer).
  Parameters: `tokens_to_token/{attention1, attention2, project}`, `cls_token`,
  `Transformer/encoderblock_{k}/{norm1, attn, norm2, mlp}`, `norm`, `head`; the Performer layers'
  random features in `batch_stats/tokens_to_token/attention{i}/random_features`.
  Features: 'stem' is the T2T module's output map, 'stage1'.. the patch tokens after the blocks
  in `feature_blocks` (default up to four spread evenly, ending at the last), all at the total
  stride.
  """
  num_classes: int = 1000
  embed_dim: int = 384
  depth: int = 14
  num_heads: int = 6
  mlp_ratio: float = 3.0
  tokens_type: str = "performer"
  token_dim: int = 64
  kernel_sizes: tuple[int, ...] = (7, 3, 3)
  strides: tuple[int, ...] = (4, 2, 2)
  paddings: tuple[int, ...] = (2, 1, 1)
  kernel_ratio: float = 0.5
  qkv_bias: bool = False
  qk_scale: float | None = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  t2t_dropout: float | None = None
  drop_path: float = 0.0
  feature_blocks: tuple[int, ...] | None = None

  def total_stride(self) -> int:
    return math.prod(self.strides)

  def check(self):
    choices.check("tokens_type", self.tokens_type, TOKENS_TYPES)
    splits = (tuple(self.kernel_sizes), tuple(self.strides), tuple(self.paddings))
    if not splits[0] or len(set(map(len, splits))) != 1:
      raise ValueError(f"kernel_sizes={splits[0]}, strides={splits[1]}, paddings={splits[2]}: "
                       "allowed values are tuples of one and the same length >= 1")
    for i, (k, s, p) in enumerate(zip(*splits)):
      if not (min(k, s) >= 1 and p >= 0 and 2 * p < k <= 2 * p + s):
        raise ValueError(f"soft split {i}: kernel_sizes[{i}]={k}, strides[{i}]={s}, "
                         f"paddings[{i}]={p}; allowed values have 2 * padding < kernel <= "
                         "2 * padding + stride (a side n * stride then gives n tokens)")

  def feature_info(self) -> list[FeatureInfo]:
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    return [FeatureInfo(name, self.embed_dim, self.total_stride())
            for name in ["stem"] + [f"stage{i + 1}" for i in range(len(blocks))]]

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    self.check()
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    layers.check_images(images, self.total_stride(), what="the total stride prod(strides)")
    x = TokensToToken(self.embed_dim, self.tokens_type, self.token_dim, tuple(self.kernel_sizes),
                      tuple(self.strides), tuple(self.paddings), self.kernel_ratio,
                      self.t2t_dropout, self.attn_impl, name="tokens_to_token")(images, train=train)
    out = {"stem": x}
    tokens = Tokens.from_map(x)
    b, n, d = tokens.x.shape
    cls = self.param("cls_token", trunc_normal(0.02), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), tokens.x], axis=1)
    x = x + jnp.asarray(sinusoid_table(n + 1, d), x.dtype)
    block_kwargs = dict(
        mlp_dim=int(d * self.mlp_ratio), act="gelu", eps=1e-5, mixer=SelfAttention,
        mixer_kwargs=dict(qkv_bias=self.qkv_bias, scale=self.qk_scale,
                          kernel_init=trunc_normal(0.02)))
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    tokens, taps = Encoder(self.depth, block=CvtBlock, block_kwargs=block_kwargs, shared=shared,
                           drop_path=self.drop_path, posemb=False, posemb_dropout=self.dropout,
                           final_norm=False, collect=blocks if features else (),
                           name="Transformer")(tokens.replace(x=x, num_prefix=1), train=train)
    if features:
      out.update({f"stage{i + 1}": taps[k].patch_map() for i, k in enumerate(blocks)})
    x = nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x)
    return self.classify(x[:, 0], out, features, kernel_init=trunc_normal(0.02))


# The official constructors (models/t2t_vit.py).
VARIANTS = {
    "t2t_vit_7": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_t_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0,
                         tokens_type="transformer"),
    "t2t_vit_t_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0,
                         tokens_type="transformer"),
    "t2t_vit_t_24": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0,
                         tokens_type="transformer"),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(T2TViT, kwargs, what="T2TViT")
  for field in ("kernel_sizes", "strides", "paddings", "feature_blocks"):  # lists from JSON
    if isinstance(kwargs.get(field), list):
      kwargs[field] = tuple(kwargs[field])
  return T2TViT(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
