"""Scaled dot-product attention, written plainly.

Layout follows `jax.nn.dot_product_attention` and the Pallas GPU kernel:
q is (B, T, H, d), k and v are (B, S, H, d).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_logits(q, k, scale):
  """Per-head similarity logits q k^T * scale: (B, T, H, d), (B, S, H, d) -> (B, H, T, S)."""
  return jnp.einsum("bthd,bshd->bhts", q * jnp.asarray(scale, q.dtype), k)


def dot_product_attention(q, k, v, *, scale, bias=None, mask=None):
  """softmax(q k^T * scale + bias) v, the reference every attention kernel is checked against.

  Args:
    q: (B, T, H, d) queries.
    k: (B, S, H, d) keys.
    v: (B, S, H, dv) values.
    scale: the logit scale, always explicit (1/sqrt(d) for standard attention).
    bias: optional additive logits bias broadcastable to (B, H, T, S).
    mask: optional boolean mask broadcastable to (B, H, T, S); False entries are excluded.

  Returns:
    (B, T, H, dv) attended values.
  """
  logits = attention_logits(q, k, scale)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", weights, v)
