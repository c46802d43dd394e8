"""Convolutional projection attention (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to
Vision Transformers", section 3.2), the pure-jnp pieces.

CvT computes Q, K and V from the token map with a depthwise k x k convolution (then BatchNorm, which
holds state and so lives in the Linen module) before the usual linear projections; K and V use
stride 2, which shrinks the number of keys by about 4 ("squeezed" attention). The pieces:

  depthwise_conv2d - x (B, H, W, C) convolved per channel with kernel (k, k, 1, C), stride s,
                     zero padding p on every side (`vitjax.ops.conv`, re-exported here).
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
from vitjax.ops.conv import conv_output_size, depthwise_conv2d  # noqa: F401  (CvT's convs)


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
