"""LookupViT (Koner et al., "LookupViT: Compressing visual information to a limited number of
tokens", ECCV 2024, arXiv:2407.12753) on the common backbone.

Two token streams share the carry (`backbone.Tokens`):
  * lookup tokens F_l, tokens.extra['lookup'] (B, N, D): the patch grid plus a 2-D position
    table. Many and cheap: they never self-attend, they only exchange information with the
    compressed tokens through MHBC and pass through a narrow MLP (hidden r_l * D);
  * compressed tokens F_p, tokens.x (B, M, D) with tokens.grid = (h_p, w_p): a
    parameter-free bilinear resize of the position-augmented patch map. Few and expensive:
    a full ViT block (the registered 'vit' block) runs on them.
No parameter depends on M, so one set of weights runs at any compressed grid from (1, 1) up to
the lookup grid: `model.apply(variables, images, grid=(5, 5))` (static under jit).

Block 'lookupvit' (pre-norm, residual everywhere):
  1. gather     F_p += W_op softmax_N(S) V_l,  S = Q_p K_l^T / sqrt(d) from LN(F_p), LN(F_l);
  2. refine     F_p  = vit_block(F_p)          (MHSA + 4x MLP on the M compressed tokens);
  3. propagate  F_l += W_ol softmax_M(S)^T V_p, V_p from LN(F_p), the same pre-softmax S;
  4. lookup MLP F_l += MLP_{r_l}(LN(F_l))      (after an optional LayerNorm of F_l).
The math of steps 1 and 3 is `vitjax.ops.mhbc`; the resize is `vitjax.ops.resize`.
Choices the public material leaves open are fields (see reference notes): lookup_mlp_ratio,
head_source, lookup_postnorm, compress_resize, posemb, mhbc_heads.
`mhbc_impl` only picks how steps 1 and 3 are evaluated: 'project' forms K_l, V_l on the N lookup
tokens as written above; 'absorb' moves W_k, W_vl and W_ol onto the M compressed tokens (the same
function and parameters, fewer multiply-adds when M is small); 'auto' (default) absorbs where that
needs at most ABSORB_RATIO of the projected form's multiply-adds, decided per grid at trace time.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import (Classifier, Encoder, FeatureInfo, Tokens,
                                    check_feature_blocks)
from vitjax.models.layers import DenseParams
from vitjax.models.registry import get_block, register_block, register_model
from vitjax.ops import mhbc as mhbc_ops
from vitjax.ops import resize as resize_ops

HEAD_SOURCES = ("compressed", "lookup", "both_sum")
POSEMBS = ("learned", "sincos2d")


def _pair(value, field: str) -> tuple[int, int]:
  """An int n -> (n, n); a length-2 sequence of ints -> tuple; else a ValueError naming `field`."""
  try:
    if isinstance(value, bool):
      raise TypeError
    if isinstance(value, (int, np.integer)):
      pair = (operator.index(value),) * 2
    else:
      pair = tuple(operator.index(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
    raise ValueError(f"{field} must be an int or a pair of ints (h, w); got {value!r}")
  return pair


def check_grid(grid, lookup_grid: tuple[int, int]) -> tuple[int, int]:
  """Validates a compressed grid against the lookup grid; returns it as (h_p, w_p)."""
  h, w = _pair(grid, "grid")
  if not (1 <= h <= lookup_grid[0] and 1 <= w <= lookup_grid[1]):
    raise ValueError(
        f"grid={grid!r} is not allowed for a {lookup_grid[0]}x{lookup_grid[1]} lookup grid: "
        f"allowed values are (h, w) with 1 <= h <= {lookup_grid[0]} and 1 <= w <= {lookup_grid[1]}")
  return h, w


def _heads(x, num_heads: int, field: str) -> int:
  if x.shape[-1] % num_heads:
    raise ValueError(f"{field}={num_heads} must divide the width {x.shape[-1]}")
  return x.shape[-1] // num_heads


def _project(x, kernel, bias, num_in: int):
  """DenseGeneral's product: contracts the last `num_in` axes of x with the first of kernel."""
  y = jnp.tensordot(x, kernel, axes=num_in)
  return y if bias is None else y + bias


def mhbc_macs(m: int, n: int, d: int, heads: int, absorb: bool) -> int:
  """The multiply-adds per block in which MHBC's two forms differ: W_k, W_vl, W_ol and the three
  N x M products (see `vitjax.ops.mhbc`). The rest of the block is the same in both. In either
  form a third of it is the propagate step (W_ol and one N x M product), two thirds gather."""
  return 3 * m * d * d + 3 * heads * n * m * d if absorb else 3 * n * d * d + 3 * n * m * d


def absorb_ratio(m: int, n: int, d: int, heads: int) -> float:
  """Multiply-adds of MHBC's absorbed form over the projected form's, per block."""
  return mhbc_macs(m, n, d, heads, True) / mhbc_macs(m, n, d, heads, False)


# mhbc_impl='auto' absorbs when that needs at most this fraction of the multiply-adds. The
# absorbed form's per-head products over the full width run less efficiently than the projections
# on XLA:CPU, so a smaller count alone is not enough. LookupViT-B/16 at 5x5 (ratio 0.50) ran 8%
# faster at batch 8 and level at batch 32 (experiments/lookupvit/flops.py). The main job's model
# (experiments/lookupvit/step_time.py --mhbc_impl) ran 6% faster absorbed at 3x3 (0.43) and 10% and
# 28% slower at 4x4 (0.71) and 5x5 (0.97).
ABSORB_RATIO = 0.55
MHBC_IMPLS = ("auto", "project", "absorb")


def check_mhbc_impl(impl: str):
  if impl not in MHBC_IMPLS:
    raise choices.unknown("mhbc_impl", impl, MHBC_IMPLS)


def use_absorbed(impl: str, m: int, n: int, d: int, heads: int) -> bool:
  check_mhbc_impl(impl)
  return impl == "absorb" or (impl == "auto" and absorb_ratio(m, n, d, heads) <= ABSORB_RATIO)


class MHBCGather(nn.Module):
  """Gather half of MHBC: queries from compressed tokens, keys and values from lookup tokens.

  Owns W_q, W_k, W_vl, W_op. Returns the compressed-token update and the shared pre-softmax
  logits S (B, H, M, N), which the propagate half reuses. absorb=True evaluates the same math
  with the lookup-side weights moved onto the compressed tokens (`vitjax.ops.mhbc`).
  """
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  kernel_init: Any = nn.initializers.xavier_uniform()
  absorb: bool = False

  @nn.compact
  def __call__(self, x_p, x_l, *, train: bool = False):
    head_dim = _heads(x_p, self.num_heads, "mhbc_heads")
    width, heads = x_p.shape[-1], (self.num_heads, head_dim)
    weights = lambda name: DenseParams((width,), heads, self.qkv_bias, self.kernel_init,  # noqa: E731
                                     name=name)()
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = weights("query"), weights("key"), weights("value")
    q_p = _project(x_p, w_q, b_q, 1)                                  # (B, M, H, d)
    if self.absorb:
      logits = mhbc_ops.absorbed_logits(q_p, x_l, w_k, b_k, scale=head_dim ** -0.5)
      y = mhbc_ops.gather_absorbed(logits, x_l, w_v, b_v)             # (B, M, H, d)
    else:
      k_l, v_l = _project(x_l, w_k, b_k, 1), _project(x_l, w_v, b_v, 1)  # (B, N, H, d)
      logits = mhbc_ops.mhbc_logits(q_p, k_l, scale=head_dim ** -0.5)  # (B, H, M, N)
      y = mhbc_ops.gather(logits, v_l)                                # (B, M, H, d)
    w_o, b_o = DenseParams(heads, (width,), True, self.kernel_init, name="out")()
    y = _project(y, w_o, b_o, 2)                                      # (B, M, D)
    return nn.Dropout(self.dropout, deterministic=not train)(y), logits


class MHBCPropagate(nn.Module):
  """Propagate half of MHBC: owns only W_vp and W_ol; its attention weights are the gather
  logits re-normalised over the compressed axis (no query or key projection of its own).
  absorb=True applies W_ol on the compressed tokens before mixing them onto the lookup tokens."""
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  kernel_init: Any = nn.initializers.xavier_uniform()
  absorb: bool = False

  @nn.compact
  def __call__(self, logits, x_p, *, train: bool = False):
    head_dim = _heads(x_p, self.num_heads, "mhbc_heads")
    width, heads = x_p.shape[-1], (self.num_heads, head_dim)
    w_v, b_v = DenseParams((width,), heads, self.qkv_bias, self.kernel_init, name="value")()
    w_o, b_o = DenseParams(heads, (width,), True, self.kernel_init, name="out")()
    v_p = _project(x_p, w_v, b_v, 1)                                  # (B, M, H, d)
    if self.absorb:
      y = mhbc_ops.propagate_absorbed(logits, v_p, w_o) + b_o         # (B, N, D)
    else:
      y = _project(mhbc_ops.propagate(logits, v_p), w_o, b_o, 2)      # (B, N, D)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


@register_block("lookupvit")
class LookupViTBlock(nn.Module):
  """Gather -> ViT block on compressed tokens -> propagate -> narrow lookup MLP (see module doc).

  Reads the compressed tokens from tokens.x and the lookup tokens from tokens.extra['lookup'].
  The MHBC logits are sown as intermediates/'mhbc_logits' for inspection.
  """
  mlp_dim: int
  num_heads: int
  lookup_mlp_ratio: float = 0.5
  mhbc_heads: int | None = None
  lookup_postnorm: bool = False
  mhbc_impl: str = "auto"
  mixer: str = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if "lookup" not in tokens.extra:
      raise ValueError("block 'lookupvit' needs the lookup tokens in tokens.extra['lookup']")
    x_p, x_l = tokens.x, tokens.extra["lookup"]                      # (B, M, D), (B, N, D)
    heads = self.mhbc_heads or self.num_heads
    hidden = max(1, round(self.lookup_mlp_ratio * x_l.shape[-1]))
    drop = lambda y: layers.DropPath(self.drop_path)(y, train=train)  # noqa: E731
    absorb = use_absorbed(self.mhbc_impl, x_p.shape[1], x_l.shape[1], x_p.shape[-1], heads)

    # 1. Information gathering: both cross-attention inputs are normalised.
    y_p, logits = MHBCGather(heads, dropout=self.dropout, absorb=absorb, name="gather")(
        nn.LayerNorm(name="gather_norm_compressed")(x_p),
        nn.LayerNorm(name="gather_norm_lookup")(x_l), train=train)
    self.sow("intermediates", "mhbc_logits", logits)
    x_p = x_p + drop(y_p)

    # 2. Representation refinement: the registered pre-norm ViT block, built, not copied.
    vit_block = get_block("vit")(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, mixer=self.mixer,
        mixer_kwargs=self.mixer_kwargs, attn_impl=self.attn_impl, dropout=self.dropout,
        drop_path=self.drop_path, name="compressed_block")
    x_p = vit_block(tokens.replace(x=x_p), train=train).x

    # 3. Global context infusion: values from the refined compressed tokens, weights from the
    #    step-1 logits. F_l needs no norm here because none of its projections is used.
    y_l = MHBCPropagate(heads, dropout=self.dropout, absorb=absorb, name="propagate")(
        logits, nn.LayerNorm(name="propagate_norm")(x_p), train=train)
    x_l = x_l + drop(y_l)
    if self.lookup_postnorm:
      x_l = nn.LayerNorm(name="lookup_postnorm")(x_l)

    # 4. Narrow MLP on the many lookup tokens (no self-attention among them).
    y_l = layers.MlpBlock(hidden, dropout=self.dropout, name="lookup_mlp")(
        nn.LayerNorm(name="lookup_mlp_norm")(x_l), train=train)
    x_l = x_l + drop(y_l)
    return tokens.replace(x=x_p, extra={**tokens.extra, "lookup": x_l})


class LookupViT(Classifier):
  """LookupViT classifier. `__call__(images, *, grid=None, train=False)`; grid defaults to `grid`.

  `image_size` fixes only the learned position table (image_size / patch_size per side); other
  input sizes resize the table with the `compress_resize` convention. `grid=None` means half the
  lookup side, rounded up. The sown intermediates 'compressed_tokens' and 'lookup_tokens' hold
  the two streams as they enter the first block.

  Features: 'stem' is the patch embedding, 'stage1'..'stageK' the lookup tokens (the full patch
  grid) after the blocks in `feature_blocks`, all at stride `patch_size`.
  """
  num_classes: int = 1000
  image_size: Any = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  grid: Any = None
  lookup_mlp_ratio: float = 0.5
  mhbc_heads: int | None = None
  head_source: str = "compressed"
  lookup_postnorm: bool = False
  mhbc_impl: str = "auto"
  # 'bilinear' (no anti-aliasing) is the default: it is the convention of PyTorch's and TF's
  # resize defaults (and of the one public 2-D reimplementation), so ported weights see the same
  # compressed tokens; the first gather step reads every lookup token anyway, so the wider
  # anti-aliased kernel is not needed to keep information. Both make an equal-size resize the
  # exact identity.
  compress_resize: str = "bilinear"
  posemb: str = "learned"
  mixer: str = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  head_zero_init: bool = True
  feature_blocks: tuple[int, ...] | None = None

  def __post_init__(self):
    choices.check("head_source", self.head_source, HEAD_SOURCES)
    choices.check("posemb", self.posemb, POSEMBS)
    resize_ops.check_method(self.compress_resize, field="compress_resize")
    ratio = self.lookup_mlp_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
      raise ValueError(f"lookup_mlp_ratio must be > 0, got {self.lookup_mlp_ratio!r}")
    heads = self.mhbc_heads if self.mhbc_heads is not None else self.num_heads
    if not (isinstance(heads, int) and heads > 0 and self.width % heads == 0):
      raise ValueError(f"mhbc_heads={self.mhbc_heads!r} must be a positive divisor of "
                       f"width={self.width} (or None: num_heads)")
    check_mhbc_impl(self.mhbc_impl)
    if not isinstance(self.lookup_postnorm, bool):
      raise ValueError(f"lookup_postnorm must be True or False, got {self.lookup_postnorm!r}")
    if self.grid is not None and min(_pair(self.grid, "grid")) < 1:
      raise ValueError(f"grid={self.grid!r}: allowed values are pairs of positive ints")
    size = _pair(self.image_size, "image_size")
    if size[0] % self.patch_size or size[1] % self.patch_size:
      raise ValueError(f"image_size={self.image_size!r} must be divisible by "
                       f"patch_size={self.patch_size}")
    super().__post_init__()

  @property
  def table_grid(self) -> tuple[int, int]:
    """The lookup grid of the position table (at `image_size`)."""
    h, w = _pair(self.image_size, "image_size")
    return h // self.patch_size, w // self.patch_size

  def default_grid(self, lookup_grid: tuple[int, int]) -> tuple[int, int]:
    if self.grid is not None:
      return _pair(self.grid, "grid")
    return tuple(math.ceil(s / 2) for s in lookup_grid)

  def apply_schedule(self, config):
    """The runner's per-step `grid`: drawn from config.grids, evaluated at config.eval_grids."""
    from vitjax.models import schedules  # pylint: disable=g-import-not-at-top
    return schedules.GridSchedule.from_config(config)

  def _positions(self, lookup_grid, dim, dtype):
    """(1, h_l, w_l, D) position table at the current lookup grid."""
    if self.posemb == "sincos2d":
      return jnp.asarray(layers.posemb_sincos_2d(*lookup_grid, dim), dtype)
    table = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                       (1, *self.table_grid, dim), dtype)
    return resize_ops.resize_2d(table, lookup_grid, self.compress_resize)

  def feature_info(self) -> list[FeatureInfo]:
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    return [FeatureInfo(name, self.width, self.patch_size)
            for name in ["stem"] + [f"stage{i + 1}" for i in range(len(blocks))]]

  @nn.compact
  def __call__(self, images, *, grid=None, train: bool = False, features: bool = False):
    blocks = check_feature_blocks(self.feature_blocks, self.depth)
    layers.check_images(images, self.patch_size)
    h_l, w_l = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
    grid = check_grid(self.default_grid((h_l, w_l)) if grid is None else grid, (h_l, w_l))
    x = layers.patch_conv(self.width, self.patch_size)(images)         # (B, h_l, w_l, D)
    out = {"stem": x}
    b, _, _, d = x.shape
    x = x + self._positions((h_l, w_l), d, x.dtype)                    # (B, h_l, w_l, D)
    # Compressed tokens: resize AFTER adding positions (the same as resizing each, by linearity).
    x_p = resize_ops.resize_2d(x, grid, self.compress_resize)          # (B, h_p, w_p, D)
    x_p = x_p.reshape(b, grid[0] * grid[1], d)                         # (B, M, D)
    x_l = x.reshape(b, h_l * w_l, d)                                   # (B, N, D)
    self.sow("intermediates", "compressed_tokens", x_p)
    self.sow("intermediates", "lookup_tokens", x_l)

    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, lookup_mlp_ratio=self.lookup_mlp_ratio,
        mhbc_heads=self.mhbc_heads, lookup_postnorm=self.lookup_postnorm,
        mhbc_impl=self.mhbc_impl, mixer=self.mixer,
        mixer_kwargs=self.mixer_kwargs, attn_impl=self.attn_impl, dropout=self.dropout)
    tokens, taps = Encoder(self.depth, block="lookupvit", block_kwargs=block_kwargs,
                           drop_path=self.drop_path, posemb=False,
                           final_norm=self.head_source != "lookup",
                           collect=blocks if features else (), name="Transformer")(
                               Tokens(x_p, extra={"lookup": x_l}, grid=grid), train=train)
    if features:
      lookup_grid = (h_l, w_l)
      out.update({f"stage{i + 1}": layers.patches_to_grid(taps[k].extra["lookup"], lookup_grid)
                  for i, k in enumerate(blocks)})

    pooled = 0.0
    if self.head_source in ("compressed", "both_sum"):
      pooled = pooled + tokens.x.mean(axis=1)                          # (B, D)
    if self.head_source in ("lookup", "both_sum"):
      x_l = nn.LayerNorm(name="lookup_norm")(tokens.extra["lookup"])
      pooled = pooled + x_l.mean(axis=1)                               # (B, D)
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    return self.classify(pooled, out, features, kernel_init=init)


def analytic_macs(model: LookupViT, image_size=None, grid=None, *,
                  include_dead: bool = True, mhbc_impl: str | None = None) -> int:
  """Multiply-accumulates of one image's forward pass (the reference notes' formula).

  Per block, with N lookup tokens, M compressed tokens, width D, MLP hidden widths r_p D and
  r_l D:  (3 + 2 r_l) N D^2 + (7 + 2 r_p) M D^2 + 3 N M D + 2 M^2 D, plus the patch embedding
  N (3 P^2) D, the compressed-token resize and the head D * classes. LayerNorm, softmax, GELU
  and additions are not counted. With head_source='compressed' the last block's propagate step
  and lookup MLP feed nothing; `include_dead=False` leaves them out, as XLA does under jit.
  That formula is MHBC's projected form. Where `mhbc_impl` (default: the model's) absorbs, its
  3 N D^2 + 3 N M D become 3 M D^2 + 3 H N M D (H = MHBC heads; `vitjax.ops.mhbc`).
  """
  size = _pair(model.image_size if image_size is None else image_size, "image_size")
  lookup = (size[0] // model.patch_size, size[1] // model.patch_size)
  h_p, w_p = check_grid(model.default_grid(lookup) if grid is None else grid, lookup)
  n, m, d = lookup[0] * lookup[1], h_p * w_p, model.width
  heads = model.mhbc_heads or model.num_heads
  absorb = use_absorbed(mhbc_impl or model.mhbc_impl, m, n, d, heads)
  r_hidden = model.mlp_dim                                  # r_p D
  l_hidden = max(1, round(model.lookup_mlp_ratio * d))      # r_l D
  mhbc = mhbc_macs(m, n, d, heads, absorb)
  block = mhbc + 2 * n * d * l_hidden + 7 * m * d * d + 2 * m * d * r_hidden + 2 * m * m * d
  total = model.depth * block
  total += n * 3 * model.patch_size ** 2 * d                # patch embedding (RGB)
  total += (h_p * lookup[0] * lookup[1] + m * lookup[1]) * d  # separable resize
  total += d * model.num_classes
  if not include_dead and model.head_source == "compressed":
    # Last block: V_p (M D^2), the propagate step (a third of `mhbc`), the lookup MLP.
    total -= m * d * d + mhbc // 3 + 2 * n * d * l_hidden
  return total


# Sizes of the registered variants. Widths follow the ViT family; the patch-4/2 variants are for
# 28-32 px inputs (Fashion-MNIST, CIFAR). Default grids are half the lookup side, rounded up:
# 14x14 -> 7x7, 7x7 -> 4x4.
_B16 = dict(patch_size=16, image_size=224, grid=(7, 7))
_P28 = dict(image_size=28, grid=(4, 4))
VARIANTS = {
    "lookupvit_ti16": dict(_B16, width=192, depth=12, mlp_dim=768, num_heads=3),
    "lookupvit_s16": dict(_B16, width=384, depth=12, mlp_dim=1536, num_heads=6),
    "lookupvit_b16": dict(_B16, width=768, depth=12, mlp_dim=3072, num_heads=12),
    "lookupvit_l16": dict(_B16, width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "lookupvit_nano4": dict(_P28, patch_size=4, width=128, depth=6, mlp_dim=512, num_heads=4),
    "lookupvit_nano2": dict(_P28, patch_size=2, width=128, depth=6, mlp_dim=512, num_heads=4,
                            grid=(7, 7)),
    "lookupvit_ti4": dict(_P28, patch_size=4, width=192, depth=12, mlp_dim=768, num_heads=3),
    "lookupvit_s4": dict(_P28, patch_size=4, width=384, depth=12, mlp_dim=1536, num_heads=6),
}


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(LookupViT, kwargs, what="LookupViT")
  for key in ("grid", "image_size"):  # configs may give lists; module fields must hash
    if isinstance(kwargs[key], list):
      kwargs[key] = tuple(kwargs[key])
  return LookupViT(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
