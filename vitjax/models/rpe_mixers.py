"""Relative-position token mixers: kernelized RPE via FFT, URPE and the Gaussian mixture mask.

  'krpe_fft' - Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative
               Positional Encoding" (NeurIPS 2021): Performer random features with the RPE
               multiplier exp(b_{j-i}) applied by FFT, O(N log N). Math: `vitjax.ops.krpe`.
  'urpe'     - Luo et al., "Your Transformer May Not be as Powerful as You Expect" (NeurIPS
               2022): (softmax(S + B) (.) C) V with a learnable Toeplitz C. Math:
               `vitjax.ops.urpe`.
  'gmm_mask' - Li & Zhang, "Toward a Deeper Understanding: RetNet Viewed through Convolution"
               (2023): logits multiplied by a learnable Gaussian mixture of patch distances.
               Math: `vitjax.ops.gmm`.

All three keep the q/k/v/out DenseGeneral layout (and scope name) of the 'mhsa' mixer, so
the projections of a pretrained ViT load into them by name; their positional tables are new
parameters. Relative tables are sized from the token grid at init (as Swin's bias table is),
so a model is tied to one input resolution.

Offsets: with rpe='2d' tables are indexed by the 2-D offset (dr, dc) of patch positions on the
h x w grid, shape (heads, 2h - 1, 2w - 1); with rpe='1d' the patch tokens are one row-major
sequence and tables have shape (heads, 2n - 1). Prefix tokens (CLS) sit on neither: every pair
that involves one gets a separate learned scalar per head (for GMM: the logits of such pairs
are left unscaled, as the mask only covers patch positions).
"""
from __future__ import annotations

from typing import ClassVar
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import mixers
from vitjax.models.registry import register_mixer
from vitjax.ops import gmm as ops_gmm
from vitjax.ops import krpe as ops_krpe
from vitjax.ops import toeplitz
from vitjax.ops import urpe as ops_urpe

RPE_MODES = ("1d", "2d")
_SCOPE = "MultiHeadDotProductAttention_0"   # same as 'mhsa': checkpoints map by name


def _check_rpe(rpe: str):
  choices.check("rpe", rpe, RPE_MODES)


def _patch_layout(num_tokens: int, grid, num_prefix: int, rpe: str, mixer: str):
  """Checks the token layout; returns the (h, w) grid of the tables, or None for rpe='1d'."""
  n = num_tokens - num_prefix
  if n < 1:
    raise ValueError(f"mixer {mixer!r}: num_prefix={num_prefix} leaves no patch tokens")
  if rpe == "1d":
    return None
  if grid is None:
    raise ValueError(f"mixer {mixer!r} with rpe='2d' needs grid=(h, w); use rpe='1d' without one")
  if grid[0] * grid[1] != n:
    raise ValueError(f"mixer {mixer!r}: grid {tuple(grid)} holds {grid[0] * grid[1]} tokens, "
                     f"but there are {n} patch tokens ({num_tokens} minus {num_prefix} prefix)")
  return tuple(grid)


def _table_shape(num_heads: int, n: int, grid):
  return (num_heads, 2 * n - 1) if grid is None else (num_heads, 2 * grid[0] - 1,
                                                      2 * grid[1] - 1)


def _dense_from_table(table, grid):
  """(H, 2n - 1) or (H, 2h - 1, 2w - 1) offset table -> (H, n, n) pairwise matrix."""
  return toeplitz.toeplitz_matrix(table) if grid is None else toeplitz.bttb_matrix(table)


class _Attention(nn.Module):
  """Shared q/k/v/out projections ('mhsa' names); subclasses compute the core in between."""
  scope_name: ClassVar[str] = _SCOPE
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  qkv_bias: bool = True
  dropout: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  def project_in(self, x):
    return mixers.qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                                  kernel_init=self.kernel_init)  # (B, N, H, d) each

  def project_out(self, y, d_model: int, train: bool):
    return mixers.out_projection(y, d_model, kernel_init=self.kernel_init, dropout=self.dropout,
                                 train=train)


@register_mixer("krpe_fft")
class KernelizedRPEAttention(_Attention):
  """Performer (PRF) attention times exp(relative bias), Toeplitz/BTTB products by FFT.

  Params: q/k/v/out, `rel_bias` (H, 2n - 1) or (H, 2h - 1, 2w - 1) and, with prefix tokens,
  `prefix_bias` (H,); all biases start at 0 (c = 1: plain Performer attention).

  The random features are fixed per layer and are not parameters: W is drawn from
  `feature_seed` folded with a hash of the layer's module path, so every layer has its own
  draw, and init, training, evaluation and a restored checkpoint all see the same W without
  an rng stream or optimizer state. Change `feature_seed` to redraw.

  Cost: O(N m d log N) with m = `num_features`, so the FFT pays off on long sequences / large
  grids. At ViT resolutions (N ~ 200) softmax attention is far cheaper, and
  `toeplitz_impl='dense'` (same function, explicit Toeplitz matrix) beats the FFT on CPU;
  experiments/attention_scaling/README.md has the measurements.
  """
  rpe: str = "2d"
  num_features: int = 64
  feature_seed: int = 0
  orthogonal_features: bool = True
  toeplitz_impl: str = "fft"

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 0, train: bool = False):
    _check_rpe(self.rpe)
    table_grid = _patch_layout(x.shape[1], grid, num_prefix, self.rpe, "krpe_fft")
    q, k, v = self.project_in(x)
    n = x.shape[1] - num_prefix
    rel_bias = self.param("rel_bias", nn.initializers.zeros,
                          _table_shape(self.num_heads, n, table_grid), jnp.float32)
    prefix_bias = (self.param("prefix_bias", nn.initializers.zeros, (self.num_heads,),
                              jnp.float32) if num_prefix else None)
    projection = self.feature_projection(q.shape[-1])
    y = ops_krpe.krpe_attention(q, k, v, rel_bias, projection, grid=table_grid,
                                num_prefix=num_prefix, prefix_bias=prefix_bias,
                                toeplitz_impl=self.toeplitz_impl)
    return self.project_out(y, x.shape[-1], train)

  def feature_projection(self, head_dim: int):
    """This layer's fixed (num_features, head_dim) random feature matrix W."""
    path_hash = zlib.crc32("/".join(self.scope.path).encode()) & 0x7FFFFFFF
    key = jax.random.fold_in(jax.random.PRNGKey(self.feature_seed), path_hash)
    return ops_krpe.draw_projection(key, self.num_features, head_dim,
                                    orthogonal=self.orthogonal_features)


@register_mixer("urpe")
class URPEAttention(_Attention):
  """(softmax(QK^T / sqrt(d) + B) (.) C) V with Toeplitz/BTTB B and C per head.

  Params: q/k/v/out, `rel_bias` (B, init 0) and `rel_mult` (C, init 1) tables of shape
  (H, 2n - 1) or (H, 2h - 1, 2w - 1), and with prefix tokens `prefix_bias` / `prefix_mult`
  (H,): the value of B and C on every pair that involves a prefix token.
  """
  rpe: str = "2d"

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 0, train: bool = False):
    _check_rpe(self.rpe)
    table_grid = _patch_layout(x.shape[1], grid, num_prefix, self.rpe, "urpe")
    q, k, v = self.project_in(x)
    n = x.shape[1] - num_prefix
    shape = _table_shape(self.num_heads, n, table_grid)
    bias = _dense_from_table(
        self.param("rel_bias", nn.initializers.zeros, shape, jnp.float32), table_grid)
    mult = _dense_from_table(
        self.param("rel_mult", nn.initializers.ones, shape, jnp.float32), table_grid)
    if num_prefix:
      heads = (self.num_heads,)
      bias = toeplitz.with_prefix(
          bias, self.param("prefix_bias", nn.initializers.zeros, heads, jnp.float32), num_prefix)
      mult = toeplitz.with_prefix(
          mult, self.param("prefix_mult", nn.initializers.ones, heads, jnp.float32), num_prefix)
    y = ops_urpe.urpe_attention(q, k, v, bias, mult, scale=q.shape[-1] ** -0.5)
    return self.project_out(y, x.shape[-1], train)


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


@register_mixer("gmm_mask")
class GMMMaskAttention(_Attention):
  """softmax((QK^T / sqrt(d)) (.) M) V, M a per-head Gaussian mixture of 2-D patch distance.

  Params: q/k/v/out, `alpha` and `sigma` (num_kernels, H), initialised as the official code
  does (alpha ~ N(0, 2^2), sigma ~ N(10, 10^2)). Prefix rows and columns keep their logits
  (multiplier 1).
  """
  num_kernels: int = 5

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 0, train: bool = False):
    if self.num_kernels < 1:
      raise ValueError(f"num_kernels must be >= 1, got {self.num_kernels}")
    grid = _patch_layout(x.shape[1], grid, num_prefix, "2d", "gmm_mask")
    q, k, v = self.project_in(x)
    shape = (self.num_kernels, self.num_heads)
    alpha = self.param("alpha", _normal(0.0, 2.0), shape, jnp.float32)
    sigma = self.param("sigma", _normal(10.0, 10.0), shape, jnp.float32)
    table = ops_gmm.gaussian_mixture_table(ops_gmm.offset_sq_distances(*grid), alpha, sigma)
    mask = toeplitz.with_prefix(toeplitz.bttb_matrix(table), 1.0, num_prefix)   # (H, N, N)
    y = ops_gmm.gmm_mask_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)
    return self.project_out(y, x.shape[-1], train)
