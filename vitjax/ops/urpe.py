"""Universal relative positional encoding (URPE) attention.

Luo, Zheng, et al., "Your Transformer May Not be as Powerful as You Expect" (NeurIPS 2022).
A relative bias inside the softmax leaves every attention row stochastic, which the paper
shows limits what RPE Transformers can represent. URPE adds a second, post-softmax factor:

  Out = (softmax(Q K^T / sqrt(d) + B) (.) C) V,    B_ij = b_{j-i},  C_ij = c_{j-i},

with C a learnable Toeplitz matrix per head (initialised to all ones, so training starts at
plain RPE attention). On an image grid both B and C are BTTB matrices indexed by the 2-D
offset; `vitjax.ops.toeplitz` builds them from their tables. Quadratic in N, like softmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax.ops import attention as ops_attention


def urpe_attention(q, k, v, bias, mult, *, scale):
  """(softmax(q k^T * scale + bias) (.) mult) v.

  Args:
    q: (B, T, H, d) queries.
    k: (B, S, H, d) keys.
    v: (B, S, H, dv) values.
    bias: additive pre-softmax logits bias, broadcastable to (B, H, T, S) (RPE B).
    mult: post-softmax multiplier, broadcastable to (B, H, T, S) (URPE C).
    scale: the logit scale, e.g. d^{-1/2}.

  Returns:
    (B, T, H, dv).
  """
  logits = ops_attention.attention_logits(q, k, scale) + bias     # (B, H, T, S)
  weights = jax.nn.softmax(logits, axis=-1) * mult
  return jnp.einsum("bhts,bshd->bthd", weights, v)
