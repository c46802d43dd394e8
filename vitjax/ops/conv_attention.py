"""Convolutional projection attention (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to
Vision Transformers", section 3.2), the pure-jnp pieces.

CvT computes Q, K and V from the token map with a depthwise k x k convolution (then BatchNorm, which
holds state and so lives in the Linen module) before the usual linear projections; K and V use
stride 2, which shrinks the number of keys by about 4 ("squeezed" attention). The pieces:

  depthwise_conv2d - x (B, H, W, C) convolved per channel with kernel (k, k, 1, C), stride s,
                     zero padding p on every side (PyTorch's Conv2d(groups=C) semantics), as
                     k*k shifted slices (faster than XLA:CPU's grouped convolution).
  conv_output_size - the side length that gives: floor((n + 2p - k) / s) + 1.
  split_heads / merge_heads - (B, N, D) <-> (B, N, H, D/H), channels head-major as in the
                     official `rearrange(x, 'b t (h d) -> b h t d')`.
  multihead_attention - (B, T, D) queries, (B, S, D) keys and values -> (B, T, D):
                     softmax(q k^T * scale) v per head, heads merged.
  prefix_concat    - class token(s) + flattened map, the order the official code projects them in.
  quick_gelu       - the official MLP activation x * sigmoid(1.702 x).

The official code scales the logits by dim_out ** -0.5 (the full width, not the head width); the
mixer passes that scale explicitly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax.ops import attention as ops_attention


def conv_output_size(n: int, kernel_size: int, stride: int, padding: int) -> int:
  """Output side of a convolution over `n` positions: floor((n + 2p - k) / s) + 1."""
  return (n + 2 * padding - kernel_size) // stride + 1


def depthwise_conv2d(x, kernel, *, stride: int = 1, padding: int = 0):
  """Depthwise 2-D convolution (cross-correlation, as PyTorch's Conv2d with groups=C, no bias).

  out[b, i, j, c] = sum_{di, dj} xpad[b, s*i + di, s*j + dj, c] * kernel[di, dj, 0, c], written
  as k*k strided slices of the padded map, each scaled per channel and summed. XLA fuses the
  slices into one loop; on CPU that ran 1.2-8x faster (forward + backward, CvT shapes, stride 2
  gaining most) than `lax.conv_general_dilated(feature_group_count=C)`, whose grouped
  convolution takes a generic path there. tests/test_cvt.py checks both against an einsum.

  Args:
    x: (B, H, W, C) map.
    kernel: (k, k, 1, C), Flax's depthwise `nn.Conv` layout (torch stores it as (C, 1, k, k)).
    stride: the same stride along both axes.
    padding: zeros added on every side of both axes.

  Returns:
    (B, H', W', C) with H' = conv_output_size(H, k, stride, padding), likewise W'.
  """
  c = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2:] != (1, c):
    raise ValueError(f"depthwise kernel must have shape (k, k, 1, {c}) for {c} channels; "
                     f"got {kernel.shape}")
  k = kernel.shape[0]
  ho, wo = (conv_output_size(n, k, stride, padding) for n in x.shape[1:3])
  if ho < 1 or wo < 1:
    raise ValueError(f"depthwise conv: a {x.shape[1]}x{x.shape[2]} map with kernel {k}, stride "
                     f"{stride} and padding {padding} has no output positions")
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kernel = kernel.astype(x.dtype)
  out = None
  for di in range(k):
    for dj in range(k):
      window = jax.lax.slice(xp, (0, di, dj, 0),
                             (xp.shape[0], di + stride * (ho - 1) + 1,
                              dj + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
      term = window * kernel[di, dj, 0]
      out = term if out is None else out + term
  return out


def split_heads(x, num_heads: int):
  """(B, N, D) -> (B, N, H, D/H); channel c belongs to head c // (D/H)."""
  b, n, d = x.shape
  if d % num_heads:
    raise ValueError(f"width {d} is not divisible by num_heads={num_heads}")
  return x.reshape(b, n, num_heads, d // num_heads)


def merge_heads(x):
  """(B, N, H, d) -> (B, N, H*d), the inverse of `split_heads`."""
  b, n, h, d = x.shape
  return x.reshape(b, n, h * d)


def multihead_attention(q, k, v, *, num_heads: int, scale):
  """Multi-head scaled dot-product attention on unsplit tokens.

  Args:
    q: (B, T, D) queries.
    k: (B, S, D) keys.
    v: (B, S, D) values.
    num_heads: heads H; D must be divisible by H.
    scale: the logit scale (CvT: D ** -0.5).

  Returns:
    (B, T, D): per head softmax(q_h k_h^T * scale) v_h, heads concatenated along channels.
  """
  y = ops_attention.dot_product_attention(
      split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads),
      scale=scale)
  return merge_heads(y)


def prefix_concat(prefix, x_map):
  """prefix (B, P, D), x_map (B, h, w, D) -> (B, P + h*w, D): the class token(s) skip the
  convolution and rejoin the flattened map before the linear projections (official order)."""
  b, h, w, d = x_map.shape
  return jnp.concatenate([prefix.astype(x_map.dtype), x_map.reshape(b, h * w, d)], axis=1)


def quick_gelu(x):
  """CvT's MLP activation (official `QuickGELU`, from CLIP): x * sigmoid(1.702 x), a sigmoid
  approximation of GELU (Hendrycks & Gimpel, 2016)."""
  return x * jax.nn.sigmoid(1.702 * x)
