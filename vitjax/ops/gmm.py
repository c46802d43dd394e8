"""Gaussian mixture mask (GMM) attention.

Li & Zhang, "Toward a Deeper Understanding: RetNet Viewed through Convolution" (2023), official
code CatworldLee/Gaussian-Mixture-Mask-Attention. Each head multiplies its pre-softmax logits by
a learnable mixture of isotropic Gaussians of the distance between patch positions:

  M_h(i, j) = sum_{k=1..K} alpha_{k,h} exp(-|p_i - p_j|^2 / (2 (sigma_{k,h}^2 + eps))),
  A = softmax((Q K^T / sqrt(d)) (.) M).

The official code evaluates exp(-|dp|^2 / 2) ** (1 / (sigma^2 + 1e-5)); here the same value is
computed as one exp, which agrees wherever exp(-|dp|^2 / 2) does not underflow in float32 and
stays correct on large grids (|dp|^2 > ~170) where the power form returns 0.

M depends on the offset p_j - p_i only, so it is computed on the (2h - 1) x (2w - 1) offset
table and expanded to the dense BTTB matrix by `vitjax.ops.toeplitz.bttb_matrix`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.ops import attention as ops_attention


def offset_sq_distances(h: int, w: int) -> np.ndarray:
  """(2h - 1, 2w - 1) table of |dp|^2 = dr^2 + dc^2 for offsets dr in [-(h-1), h-1], etc."""
  dr = np.arange(-(h - 1), h, dtype=np.float32)
  dc = np.arange(-(w - 1), w, dtype=np.float32)
  return dr[:, None] ** 2 + dc[None, :] ** 2


def gaussian_mixture_table(sq_dist, alpha, sigma, *, eps: float = 1e-5):
  """Per-head mixture over a distance table.

  Args:
    sq_dist: (...) squared distances (an offset table or a dense (N, N) matrix).
    alpha: (K, H) mixture weights.
    sigma: (K, H) widths (the official code's sigma; only sigma^2 is used).
    eps: added to sigma^2 as in the official code, so sigma = 0 stays finite.

  Returns:
    (H, ...) with M_h = sum_k alpha_kh exp(-sq_dist / (2 (sigma_kh^2 + eps))).
  """
  extra = (1,) * jnp.ndim(sq_dist)
  var = (sigma ** 2 + eps).reshape(sigma.shape + extra)           # (K, H, 1...)
  gauss = jnp.exp(-jnp.asarray(sq_dist) / (2.0 * var))           # (K, H, ...)
  return jnp.sum(alpha.reshape(alpha.shape + extra) * gauss, axis=0)


def gmm_mask_attention(q, k, v, mask, *, scale):
  """softmax((q k^T * scale) (.) mask) v.

  Args:
    q: (B, T, H, d) queries.
    k: (B, S, H, d) keys.
    v: (B, S, H, dv) values.
    mask: multiplicative logits mask broadcastable to (B, H, T, S).
    scale: the logit scale, e.g. d^{-1/2}.

  Returns:
    (B, T, H, dv).
  """
  logits = ops_attention.attention_logits(q, k, scale) * mask     # (B, H, T, S)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", weights, v)
