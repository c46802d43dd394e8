"""Small building blocks shared by every family.

  token layout   - `check_images`, `split_prefix`, `patches_to_grid`, `tokens_to_grid`,
                   `grid_to_tokens`: between (B, N, D) token streams and (B, h, w, D) maps;
  embeddings     - `patch_conv`, `posemb_sincos_2d` (position tables: `vitjax.models.plugins`);
  dense weights  - `DenseParams` (a Dense layer's kernel and bias, returned rather than applied);
  MLP and depth  - `MlpBlock`, `DropPath`, `gelu`;
  downsampling   - 'norm_conv', 'conv_norm' and 'patch_merge', registered by name for the
                   stages of the multi-stage backbone (`vitjax.models.backbone.StageSpec`);
  fields         - `module_fields`, `check_overrides`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.registry import register_downsample

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu(x):
  """The exact GELU x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel, 2016), as timm's.

  `jax.nn.gelu(approximate=False)` evaluates Phi through erfc, which XLA expands into both of its
  branches (a polynomial and an exp-based tail); erf alone is one rational polynomial and runs
  about twice as fast on CPU. Where 1 + erf loses relative precision (x << 0) both forms are
  within 1e-6 absolute of the float64 value (tests/test_convert.py checks 1e-5, with gradients).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


class DenseParams(nn.Module):
  """The kernel (in_shape + features) and bias (features) that `nn.DenseGeneral` would create to
  map the trailing `in_shape` axes to `features`, returned rather than applied.

  With in_shape=(D_in,) and features=(D_out,) these are an `nn.Dense`'s `kernel` and `bias`
  (same names, shapes and initialisers). Used where the weights themselves are needed: the
  transposed MLP products, and MHBC's absorbed form (`vitjax.ops.mhbc`).
  """
  in_shape: tuple[int, ...]
  features: tuple[int, ...]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self):
    def kernel_init(key, shape, dtype=jnp.float32):   # DenseGeneral's: a 2-D init, reshaped
      flat = (math.prod(self.in_shape), math.prod(self.features))
      return jnp.reshape(self.kernel_init(key, flat, dtype), shape)
    kernel = self.param("kernel", kernel_init, (*self.in_shape, *self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, tuple(self.features), jnp.float32)
            if self.use_bias else None)
    return kernel, bias


# dot_general dimension numbers: contract lhs axis i with rhs axis j, no batch axes.
def _contract(i: int, j: int):
  return (((i,), (j,)), ((), ()))


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout (vit_jax's `MlpBlock`, same param names).

  The hidden activation is computed transposed, h^T = W1^T x^T of shape (mlp_dim, tokens), and
  the second product contracts h^T's leading axis. Same math as x W1 -> W2, but XLA:CPU runs
  these two column-major-operand products through its Eigen GEMM, faster than its default
  YNNPACK GEMM on ViT MLP shapes (`python -m experiments.bench_parts`); on GPU/TPU the transposed
  operands are free (folded into the GEMM call / layout).
  """
  mlp_dim: int
  out_dim: int | None = None
  dropout: float = 0.0
  act: Callable = gelu
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    d_in = x.shape[-1]
    out_dim = d_in if self.out_dim is None else self.out_dim
    w1, b1 = DenseParams((d_in,), (self.mlp_dim,), True, self.kernel_init, self.bias_init,
                         name="Dense_0")()
    w2, b2 = DenseParams((self.mlp_dim,), (out_dim,), True, self.kernel_init, self.bias_init,
                         name="Dense_1")()
    x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, d_in)                                          # (M, D)
    h_t = jax.lax.dot_general(w1, tokens, _contract(0, 1)) + b1[:, None]  # (F, M)
    h_t = self.act(h_t)
    # Dropout draws its mask in the usual (M, F) orientation; at eval time it is the identity
    # and the two transposes cancel.
    h_t = nn.Dropout(self.dropout, deterministic=not train)(h_t.T).T
    y = jax.lax.dot_general(h_t, w2, _contract(0, 0)) + b2                # (M, D_out)
    y = y.reshape(*lead, out_dim)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a whole residual branch per example with probability `rate`."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0)


def module_fields(cls) -> set[str]:
  """Names a Linen module class (or a functools.partial of one) accepts as constructor fields."""
  cls = getattr(cls, "func", cls)
  return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def check_overrides(cls, overrides: dict[str, Any], *, what: str):
  """Raises one clear error when `overrides` names a field `cls` does not have."""
  allowed = module_fields(cls)
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(
        f"Unknown {what} field(s) {unknown}. Allowed fields: {', '.join(sorted(allowed))}.")


# ---------------------------------------------------------------------------------------------
# Token layout: (B, N, D) streams <-> (B, h, w, D) maps.

def check_images(images, stride: int, *, field: str = "data.image_size",
                 what: str = "patch_size"):
  """Clear errors for the two input mistakes that would otherwise fail deep inside XLA.

  `stride` is what the input sides must be multiples of: the patch size of an isotropic model,
  the total stride (`what='total stride'`) of a multi-stage one.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (B, H, W, C); got shape {images.shape}")
  h, w = images.shape[1:3]
  if h % stride or w % stride:
    raise ValueError(
        f"{field}: image size {h}x{w} is not divisible by {what}={stride}; allowed values are "
        f"multiples of {stride}")


def split_prefix(x, num_prefix: int):
  """(B, N, D) -> (prefix (B, P, D), patches (B, N - P, D))."""
  return x[:, :num_prefix], x[:, num_prefix:]


def patches_to_grid(x, grid):
  """(B, h*w, D) -> (B, h, w, D)."""
  return x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])


def tokens_to_grid(x, grid, num_prefix: int):
  """(B, P + h*w, D) -> prefix (B, P, D), patches (B, h, w, D); checks the token count."""
  h, w = grid
  if x.shape[1] - num_prefix != h * w:
    raise ValueError(
        f"tokens: {x.shape[1]} tokens with num_prefix={num_prefix} do not fit grid={grid} "
        f"(expected {num_prefix + h * w})")
  prefix, patches = split_prefix(x, num_prefix)
  return prefix, patches_to_grid(patches, grid)


def grid_to_tokens(prefix, y):
  """prefix (B, P, D), y (B, h, w, D) -> (B, P + h*w, D), prefix first and unchanged."""
  b, h, w, d = y.shape
  return jnp.concatenate([prefix, y.reshape(b, h * w, d)], axis=1)


# ---------------------------------------------------------------------------------------------
# Embeddings.

def patch_conv(width: int, patch_size: int, name: str = "embedding") -> nn.Conv:
  """Non-overlapping patch embedding: a stride-P convolution named `embedding` (vit_jax)."""
  p = patch_size
  return nn.Conv(width, (p, p), strides=(p, p), padding="VALID", name=name)


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos table (1, h, w, dim): a quarter of the channels each for sin/cos of x, y."""
  if dim % 4:
    raise ValueError(f"posemb='sincos2d' needs width divisible by 4, got width={dim}")
  omega = temperature ** -(np.arange(dim // 4) / (dim // 4))      # (dim/4,) frequencies
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ang_x = xs.reshape(-1, 1) * omega                                 # (h*w, dim/4)
  ang_y = ys.reshape(-1, 1) * omega
  pe = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return pe.reshape(1, h, w, dim).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Downsampling between stages: (B, H, W, C) -> (B, H/s, W/s, width). Each class declares
# `stride` (how much it shrinks the map; `feature_info` reads it) and takes the output `width`
# as its first field, so a StageSpec can name it and give only the extra fields.

_trunc_normal = nn.initializers.truncated_normal


@register_downsample("norm_conv")
class NormConv(nn.Module):
  """LayerNorm, then a k x k stride-s convolution (ConvNeXt's and HorNet's downsampling layer).

  `norm_name` / `conv_name` name the two layers (a model that keeps an older flat layout sets
  them; see `StageNames`).
  """
  width: int
  stride: int = 2
  kernel_size: int | None = None          # None: the stride (non-overlapping)
  padding: Any = "VALID"
  eps: float = 1e-6
  kernel_init: Callable = _trunc_normal(0.02)
  norm_name: str = "norm"
  conv_name: str = "conv"

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    k = self.kernel_size or self.stride
    x = nn.LayerNorm(epsilon=self.eps, name=self.norm_name)(x)
    return nn.Conv(self.width, (k, k), strides=(self.stride, self.stride), padding=self.padding,
                   kernel_init=self.kernel_init, name=self.conv_name)(x)


@register_downsample("conv_norm")
class ConvNorm(nn.Module):
  """A k x k stride-s convolution (padding p), then LayerNorm: CvT's convolutional token
  embedding and CSWin's merge layers. `norm=False` leaves the norm out."""
  width: int
  stride: int = 2
  kernel_size: int = 3
  padding: int = 1
  norm: bool = True
  eps: float = 1e-5
  kernel_init: Callable = _trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    k, p = self.kernel_size, self.padding
    x = nn.Conv(self.width, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                kernel_init=self.kernel_init, name="conv")(x)
    return nn.LayerNorm(epsilon=self.eps, name="norm")(x) if self.norm else x


@register_downsample("patch_merge")
class PatchMerging(nn.Module):
  """Swin's patch merging: each 2x2 neighbourhood concatenated (x0, x1, x2, x3 in Swin's order:
  (0,0), (1,0), (0,1), (1,1)) -> LayerNorm(4C) -> Linear(4C -> width), no bias."""
  width: int
  stride: ClassVar[int] = 2
  eps: float = 1e-5
  kernel_init: Callable = _trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch_merge needs an even map size; got {h}x{w}")
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)                 # (B, h/2, dy, w/2, dx, C)
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)  # dx-major: Swin's order
    x = nn.LayerNorm(epsilon=self.eps, name="norm")(x)
    return nn.Dense(self.width, use_bias=False, kernel_init=self.kernel_init,
                    name="reduction")(x)


def downsample_stride(cls_or_partial, kwargs) -> int:
  """The `stride` a downsample layer will have with `kwargs` (its field default otherwise)."""
  func = getattr(cls_or_partial, "func", cls_or_partial)
  given = {**getattr(cls_or_partial, "keywords", {}), **dict(kwargs or {})}
  if "stride" in given:
    return int(given["stride"])
  default = getattr(func, "stride", None)
  if not isinstance(default, int):
    raise ValueError(f"downsample layer {func.__name__} declares no integer `stride`")
  return default
