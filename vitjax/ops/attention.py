"""Scaled dot-product attention (Vaswani et al., 2017), written plainly and laid out for XLA.

Layout of the public functions follows `jax.nn.dot_product_attention` and the Pallas GPU kernel:
q is (B, T, H, d), k and v are (B, S, H, d).

Two choices make the XLA path fast on CPU without changing the math (checked against the plain
`softmax(q k^T * scale) v` in tests/test_convert.py, float32, within 1e-5):

  * The two attention matmuls run heads-major, (B, H, T, d) x (B, H, S, d). Written directly on
    the (B, T, H, d) inputs, XLA:CPU lays the P V product out as V^T P^T (both operands
    contracted on their minor axis) plus transposes on every side; that form ran about 2.8x
    slower than this function for ViT-B/16 shapes (8 x 12 heads, 197 tokens, d = 64;
    `python -m experiments.bench_parts`).
    The explicit transposes in and out are cheap copies that fuse with their neighbours.
  * The softmax normalisation is deferred: out = (exp(s - max) v) / sum(exp(s - max)). Dividing
    the (B, H, T, d) result instead of the (B, H, T, S) weights saves one full pass over the
    logits; it is the same function (each row's weights are divided by the same sum).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads_major(x):
  """(B, T, H, d) -> (B, H, T, d)."""
  return jnp.swapaxes(x, 1, 2)


def attention_logits(q, k, scale):
  """Per-head similarity logits q k^T * scale: (B, T, H, d), (B, S, H, d) -> (B, H, T, S)."""
  q = _heads_major(q * jnp.asarray(scale, q.dtype))
  return jnp.einsum("bhtd,bhsd->bhts", q, _heads_major(k))


def softmax_weighted_sum(logits, v_heads_major):
  """softmax(logits, -1) @ v with the normalisation applied to the output (module docstring).

  Args:
    logits: (B, H, T, S) attention logits (masked entries already set to a large negative).
    v_heads_major: (B, H, S, dv) values, heads-major.

  Returns:
    (B, H, T, dv).
  """
  # The max only guards exp against overflow; it cancels in the ratio, so no gradient flows
  # through it (as in jax.nn.softmax).
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - m)                                           # (B, H, T, S), <= 1
  out = jnp.einsum("bhts,bhsd->bhtd", e, v_heads_major)             # unnormalised
  return out / jnp.sum(e, axis=-1, keepdims=True)


def dot_product_attention(q, k, v, *, scale, bias=None, mask=None):
  """softmax(q k^T * scale + bias) v, the reference every attention kernel is checked against.

  Args:
    q: (B, T, H, d) queries.
    k: (B, S, H, d) keys.
    v: (B, S, H, dv) values.
    scale: the logit scale, always explicit (1/sqrt(d) for standard attention).
    bias: optional additive logits bias broadcastable to (B, H, T, S).
    mask: optional boolean mask broadcastable to (B, H, T, S); False entries are excluded. A row
      with every entry masked attends uniformly (as `jax.nn.softmax` over equal logits does).

  Returns:
    (B, T, H, dv) attended values.
  """
  logits = attention_logits(q, k, scale)                            # (B, H, T, S)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  out = softmax_weighted_sum(logits, _heads_major(v))               # (B, H, T, dv)
  return jnp.swapaxes(out, 1, 2)
