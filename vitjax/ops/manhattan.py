"""Manhattan Self-Attention, MaSA (Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision
Transformers"), the pure-jnp pieces.

RetNet's temporal decay gamma^|n - m| becomes a spatial decay over the Manhattan distance of two
tokens of the (h, w) grid, one gamma per head:

    MaSA(X) = softmax(Q K^T / sqrt(d) + log(gamma_h) * D) V,    D_nm = |x_n - x_m| + |y_n - y_m|

The decay enters as an additive log-mask before the softmax, as the official code does (its
`VisionRetentionAll` adds `decay * distance` to the logits), i.e. the attention weights are
gamma^D-weighted and then re-normalised; not softmax(...) * gamma^D.
    gamma_h = 1 - 2^(-a - r h / H),  h = 0..H-1  (a: `initial_value`, r: `heads_range`)
Before the logits, q and k are rotated RoPE-style ("theta shift") by angles n * theta_i, with n
the token's index in the row-major flattened grid (n = row * w + col, as the official code) and
theta_i = 10000^(-i / (d/2 - 1)), i = 0..d/2-1, each angle shared by one pair of channels
(2i, 2i+1). The official code scales k by d^-1/2 before the rotation; rotation is linear, so that
is the logit scale `scale` here.

Decomposed form (official `VisionRetentionChunk`, RMT's early stages): attention along each row
(keys of the same row, decay gamma^|Δcol|), then along each column on that result (keys of the
same column, decay gamma^|Δrow|), each with its own softmax. Cost O(hw (h + w)) instead of
O((hw)^2).

Layout: q, k (B, h, w, H, d), v (B, h, w, H, dv), the grid kept as two axes. The attention core
is `attend(q, k, v, *, scale, bias)` on (B, T, H, d) (vitjax.ops.attention's layout); the default
is the plain `dot_product_attention`; the Linen mixer passes its kernel selector. LCE, the
depthwise 5x5 convolution of V added to the output, has weights and lives in the mixer.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from vitjax.ops import attention as ops_attention


def decay_rates(num_heads: int, initial_value: float, heads_range: float) -> np.ndarray:
  """log(gamma_h) = log(1 - 2^(-a - r h / H)) for h = 0..H-1, float32 (H,) (all negative)."""
  if num_heads < 1:
    raise ValueError(f"num_heads={num_heads}: allowed values are >= 1")
  h = np.arange(num_heads, dtype=np.float32)
  gamma = 1.0 - np.float32(2.0) ** (-np.float32(initial_value)
                                    - np.float32(heads_range) * h / np.float32(num_heads))
  if not np.all((gamma > 0) & (gamma < 1)):
    raise ValueError(f"initial_value={initial_value}, heads_range={heads_range} give decays "
                     f"{gamma.tolist()}; each must lie in (0, 1) (allowed: initial_value > 0 and "
                     "initial_value + heads_range * (H-1)/H > 0)")
  return np.log(gamma).astype(np.float32)


def manhattan_distance(h: int, w: int) -> np.ndarray:
  """(h*w, h*w) |row_n - row_m| + |col_n - col_m| over the row-major flattened grid."""
  rows, cols = np.divmod(np.arange(h * w), w)
  return (np.abs(rows[:, None] - rows[None, :])
          + np.abs(cols[:, None] - cols[None, :])).astype(np.float32)


def decay_mask(log_gamma, h: int, w: int):
  """(H, h*w, h*w) additive log-decay log(gamma_h) * D of the full form."""
  return jnp.asarray(log_gamma)[:, None, None] * manhattan_distance(h, w)


def decay_mask_1d(log_gamma, n: int):
  """(H, n, n) log(gamma_h) * |i - j|, the decay along one axis of the decomposed form."""
  idx = np.arange(n, dtype=np.float32)
  return jnp.asarray(log_gamma)[:, None, None] * np.abs(idx[:, None] - idx[None, :])


def theta_shift_tables(key_dim: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """sin and cos (h, w, key_dim) of n * theta for the flattened index n = row * w + col."""
  if key_dim % 2:
    raise ValueError(f"the theta shift rotates channel pairs: the head width must be even, "
                     f"got {key_dim}")
  theta = 1.0 / 10000 ** np.linspace(0, 1, key_dim // 2, dtype=np.float32)
  theta = np.repeat(theta, 2)                                          # (d,), pairs share
  angle = np.arange(h * w, dtype=np.float32)[:, None] * theta[None, :]
  return (np.sin(angle).reshape(h, w, key_dim).astype(np.float32),
          np.cos(angle).reshape(h, w, key_dim).astype(np.float32))


def rotate_pairs(x):
  """(x_0, x_1, x_2, x_3, ...) -> (-x_1, x_0, -x_3, x_2, ...) on the last axis."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def theta_shift(x, sin, cos):
  """x * cos + rotate_pairs(x) * sin: each channel pair rotated by its angle (RoPE).

  x: (B, h, w, H, d); sin, cos: (h, w, d) from `theta_shift_tables`.
  """
  sin = jnp.asarray(sin, x.dtype)[:, :, None, :]
  cos = jnp.asarray(cos, x.dtype)[:, :, None, :]
  return x * cos + rotate_pairs(x) * sin


Attend = Callable[..., jnp.ndarray]


def _check(q, k, v, log_gamma):
  if q.ndim != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
    raise ValueError(f"MaSA takes q, k (B, h, w, H, d) and v (B, h, w, H, dv) of one grid; got "
                     f"q{q.shape}, k{k.shape}, v{v.shape}")
  if np.shape(log_gamma) != (q.shape[3],):
    raise ValueError(f"log_gamma must hold one decay per head, shape ({q.shape[3]},); got "
                     f"{np.shape(log_gamma)}")


def manhattan_attention(q, k, v, log_gamma, *, scale, attend: Attend | None = None):
  """Full MaSA: softmax(q k^T * scale + log(gamma) * D) v over all h*w tokens.

  Args:
    q, k: (B, h, w, H, d), already theta-shifted.
    v: (B, h, w, H, dv).
    log_gamma: (H,) per-head log decay (`decay_rates`).
    scale: the logit scale (d^-1/2 in RMT).
    attend: the attention core on (B, T, H, d) with an additive bias.

  Returns:
    (B, h, w, H, dv).
  """
  _check(q, k, v, log_gamma)
  attend = attend or ops_attention.dot_product_attention
  b, h, w, nh, d = q.shape
  flat = lambda x: x.reshape(b, h * w, nh, x.shape[-1])  # noqa: E731
  bias = decay_mask(log_gamma, h, w).astype(q.dtype)[None]           # (1, H, hw, hw)
  out = attend(flat(q), flat(k), flat(v), scale=scale, bias=bias)     # (B, hw, H, dv)
  return out.reshape(b, h, w, nh, v.shape[-1])


def decomposed_manhattan_attention(q, k, v, log_gamma, *, scale, attend: Attend | None = None):
  """Axis-decomposed MaSA: attention within each row (decay over |Δcol|), then within each
  column of that output (decay over |Δrow|), the official order. Same arguments and result
  shape as `manhattan_attention`."""
  _check(q, k, v, log_gamma)
  attend = attend or ops_attention.dot_product_attention
  b, h, w, nh, d = q.shape
  dv = v.shape[-1]
  # Along W: every row is a sequence of w tokens.
  rows = lambda x: x.reshape(b * h, w, nh, x.shape[-1])  # noqa: E731
  bias_w = decay_mask_1d(log_gamma, w).astype(q.dtype)[None]          # (1, H, w, w)
  y = attend(rows(q), rows(k), rows(v), scale=scale, bias=bias_w).reshape(b, h, w, nh, dv)
  # Along H: every column is a sequence of h tokens.
  cols = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * w, h, nh, x.shape[-1])  # noqa: E731
  bias_h = decay_mask_1d(log_gamma, h).astype(q.dtype)[None]          # (1, H, h, h)
  out = attend(cols(q), cols(k), cols(y), scale=scale, bias=bias_h)   # (B*w, h, H, dv)
  return jnp.swapaxes(out.reshape(b, w, h, nh, dv), 1, 2)
