"""ResFormer's positional encodings (Tian et al., "ResFormer: Scaling ViTs with Multi-Resolution
Training", CVPR 2023) in pure jnp. Both are functions of the current token grid, so one set of
weights runs at any input resolution.

  global_sincos - the DETR-style normalized 2-D sin-cos table of an h x w grid: positions
                  1..h and 1..w scaled to (0, 2*pi], channels [y | x], each half interleaving
                  sin and cos of one frequency per pair.
  global_pe     - that table through a depthwise 3x3 convolution (zero padding, bias): the
                  global positional embedding added to the patch tokens.
  local_pe      - the local positional embedding inside attention: a depthwise 3x3 convolution
                  of the values V on the patch map, one kernel shared by all heads, added to
                  softmax(Q K^T / sqrt(d)) V. Prefix tokens (CLS) get zeros.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from vitjax.ops import conv


def global_sincos(h: int, w: int, dim: int, *, temperature: float = 10_000.0,
                  scale: float = 2 * math.pi, eps: float = 1e-6) -> np.ndarray:
  """The (h, w, dim) float32 sin-cos table of ResFormer's global PE (DETR's `PositionEmbedding
  Sine` with normalize=True), computed in float32 in the official order of operations.

  With F = dim / 2 channels per axis, y_i = i / (h + eps) * scale (i = 1..h), likewise x_j, and
  t_k = temperature ** (2 floor(k/2) / F) for k = 0..F-1:
    table[i, j, k]     = sin(y_i / t_k) for even k, cos(y_i / t_k) for odd k     (k < F)
    table[i, j, F + k] = the same with x_j.
  """
  if dim % 4:
    raise ValueError(f"posemb='resformer' needs a width divisible by 4 (sin and cos of each "
                     f"of two axes); got width={dim}")
  f32 = np.float32
  half = dim // 2
  ys = np.arange(1, h + 1, dtype=f32) / (f32(h) + f32(eps)) * f32(scale)       # (h,)
  xs = np.arange(1, w + 1, dtype=f32) / (f32(w) + f32(eps)) * f32(scale)       # (w,)
  k = np.arange(half, dtype=f32)
  t = f32(temperature) ** (f32(2) * np.floor(k / f32(2)) / f32(half))           # (F,)

  def embed(p):                                    # (n,) -> (n, F): sin, cos, sin, cos, ...
    a = p[:, None] / t
    out = np.empty_like(a)
    out[:, 0::2] = np.sin(a[:, 0::2])
    out[:, 1::2] = np.cos(a[:, 1::2])
    return out

  ey, ex = embed(ys), embed(xs)
  table = np.concatenate([np.broadcast_to(ey[:, None], (h, w, half)),
                          np.broadcast_to(ex[None, :], (h, w, half))], axis=-1)
  return table.astype(f32)


def global_pe(grid: tuple[int, int], kernel, bias, *, temperature: float = 10_000.0,
              scale: float = 2 * math.pi, impl: str = "auto"):
  """ResFormer's global PE of a grid: DWConv3x3(global_sincos(h, w, D)) + bias, as (h*w, D).

  kernel: (3, 3, 1, D), Flax's depthwise layout; bias: (D,). `impl` is
  `conv.depthwise_conv_same`'s ('xla' on accelerators, slices on CPU).
  """
  h, w = grid
  d = kernel.shape[-1]
  table = jnp.asarray(global_sincos(h, w, d, temperature=temperature, scale=scale),
                      kernel.dtype)[None]
  y = conv.depthwise_conv_same(table, kernel, bias, impl=impl)
  return y.reshape(h * w, d)


def local_pe(v, grid: tuple[int, int], num_prefix: int, kernel, bias, *, mask=None,
             impl: str = "auto"):
  """ResFormer's local PE of the values: DWConv3x3 over each head's patch map, zeros at prefix.

  Args:
    v: (B, P + h*w, H, d) values per head; the first `num_prefix` tokens are not on the grid.
    grid: (h, w), the patch tokens' layout (row-major).
    kernel: (3, 3, 1, d), one depthwise kernel over the d channels of a head, shared by every
      head (the official `get_v` is Conv2d(d, d, 3, padding=1, groups=d) applied to each head).
    bias: (d,).
    mask: optional (B, P + h*w) bool, the tokens still in play: the others' values are zeroed
      before the convolution (a dropped token contributes nothing, as it is no key).
    impl: see `conv.depthwise_conv_same`.

  Returns:
    (B, P + h*w, H, d); out[:, :P] = 0, out[b, P + i*w + j, n] = bias + sum of the 3x3 taps
    of head n's values around (i, j) (zero outside the map).
  """
  b, n, heads, d = v.shape
  h, w = grid
  if n - num_prefix != h * w:
    raise ValueError(f"local_pe: {n} tokens with num_prefix={num_prefix} do not fit "
                     f"grid={grid} (expected {num_prefix + h * w})")
  if kernel.shape != (3, 3, 1, d) or bias.shape != (d,):
    raise ValueError(f"local_pe: kernel {kernel.shape} / bias {bias.shape} do not fit head "
                     f"width d={d}; expected (3, 3, 1, {d}) and ({d},)")
  if mask is not None:
    v = v * mask[:, :, None, None].astype(v.dtype)
  patches = v[:, num_prefix:].reshape(b, h, w, heads * d)        # channel n*d + c = head n, c
  y = conv.depthwise_conv_same(patches, jnp.tile(kernel, (1, 1, 1, heads)),
                               jnp.tile(bias, heads), impl=impl)
  y = y.reshape(b, h * w, heads, d)
  return jnp.concatenate([jnp.zeros((b, num_prefix, heads, d), y.dtype), y], axis=1)
