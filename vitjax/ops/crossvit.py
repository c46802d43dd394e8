"""CrossViT's two pure pieces (Chen, Fan, Panda, "CrossViT: Cross-Attention Multi-Scale Vision
Transformer for Image Classification", ICCV 2021).

  cls_cross_attention - the fusion's cross-attention (paper, eq. 5-6): only the class token
                        queries. With x' = [f(x_cls^l); x_patch^s] (B, 1 + N, D),
                          q = x'_cls W_q,  k = x' W_k,  v = x' W_v,
                          CA(x') = softmax(q k^T / sqrt(d)) v        per head,
                        one query row instead of 1 + N, so the cost is linear in N.
                        Written for P >= 1 query tokens (P = 1 in CrossViT).
  bicubic_taps /      - the image resize of the large-patch branch in PyTorch's convention
  resize_bicubic        (`F.interpolate(mode='bicubic', align_corners=False)`, what timm and the
                        official code call): half-pixel centres, the cubic convolution kernel of
                        Keys with a = -0.75, four taps per output whose indices are clamped to the
                        border, no anti-aliasing when downsampling. `jax.image.resize` differs
                        (a = -0.5, anti-aliased), so the taps are computed here, one axis at a
                        time; `bicubic_matrix` writes them as the (out, in) matrix.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def cls_cross_attention(q, k, v, *, scale):
  """softmax(q k^T * scale) v for a few query tokens over all tokens.

  Args:
    q: (B, P, H, d) queries of the P class tokens (CrossViT: P = 1).
    k: (B, N, H, d) keys of all tokens (the class token included).
    v: (B, N, H, dv) values.
    scale: the logit scale, d ** -0.5 in CrossViT.

  Returns:
    (B, P, H, dv).
  """
  logits = jnp.einsum("bphd,bnhd->bhpn", q * jnp.asarray(scale, q.dtype), k)   # (B, H, P, N)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhpn,bnhd->bphd", weights, v)


A_BICUBIC = -0.75   # PyTorch's cubic convolution coefficient (OpenCV's too)


def _cubic(x, a: float = A_BICUBIC):
  """Keys' cubic convolution kernel W(x) for |x| < 2 (zero beyond)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1                      # |x| <= 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a                  # 1 < |x| < 2
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The four input indices (clamped to the border) and float32 weights of each output sample,
  both (out_size, 4): PyTorch's 1-D bicubic resampling (module docstring)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
  # The half-pixel source coordinate with PyTorch's roundings: a float32 scale in/out, the
  # product taken in float64, the coordinate stored as float32 (an exact float64 coordinate moves
  # the fraction t by up to 1e-5 at 240 px, the output by up to 1e-4).
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  base = np.floor(src)
  t = (src - base).astype(np.float64)[:, None]
  offsets = np.arange(-1, 3)                                        # taps at base - 1 ... base + 2
  index = np.clip(base[:, None].astype(np.int64) + offsets, 0, in_size - 1)
  weight = _cubic(t - offsets).astype(np.float32)
  index.setflags(write=False)
  weight.setflags(write=False)
  return index, weight


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The same resampling as an (out_size, in_size) float64 matrix (rows sum to 1; the identity
  when the sizes are equal), for reading and testing."""
  index, weight = bicubic_taps(int(in_size), int(out_size))
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size)[:, None], index), weight)
  return m


def resize_bicubic(x, out_hw: tuple[int, int]):
  """Resizes (B, H, W, C) images to (B, out_h, out_w, C) as PyTorch's bicubic interpolation
  (align_corners=False, no anti-aliasing) does: separable, rows first, four taps per output
  (about 4 multiply-adds per output sample, as in PyTorch; a dense matrix would cost H_in each)."""
  for axis, out in ((1, out_hw[0]), (2, out_hw[1])):
    size = x.shape[axis]
    if size == out:
      continue
    index, weight = bicubic_taps(size, out)
    # One gather per tap, summed: on XLA:CPU this is far faster than gathering all out * 4 taps
    # at once and reducing over a middle axis of 4 (experiments/README.md, CrossViT-9).
    trailing = (1,) * (x.ndim - axis - 1)
    x = sum(jnp.take(x, jnp.asarray(index[:, j]), axis=axis)
            * jnp.asarray(weight[:, j], x.dtype).reshape((out,) + trailing) for j in range(4))
  return x
