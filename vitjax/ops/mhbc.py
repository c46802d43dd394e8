"""Multi-head bidirectional cross-attention (MHBC) of LookupViT, as pure jnp functions.

Koner et al., "LookupViT: Compressing visual information to a limited number of tokens",
ECCV 2024 (arXiv:2407.12753). M compressed tokens F_p and N lookup tokens F_l exchange
information through ONE similarity matrix per head,

    S = Q_p K_l^T / sqrt(d)                                   (B, H, M, N),

with Q_p projected from the compressed tokens and K_l from the lookup tokens:
  * gather    (compressed <- lookup): softmax of S over the N lookup tokens, times V_l;
  * propagate (lookup <- compressed): softmax of the SAME pre-softmax S over the M compressed
    tokens, times V_p.
Re-normalising the logits (rather than transposing the gather weights) keeps every lookup
token's weights summing to one whatever N/M is; sharing S saves the second query/key
projection pair and the second N*M*d logits matmul, so nothing here is quadratic in N.

The two directions run at different times inside a block (the compressed tokens are refined by
a full ViT block in between, and V_p is taken from the refined tokens), so the logits are
returned by `mhbc_logits` and passed to `propagate` explicitly.

Layout: token tensors are (B, tokens, H, d) like `vitjax.ops.attention`; the weighted sums run heads-major
with the softmax normalisation deferred to the output, as there (about 5% faster for LookupViT-B/16
inference on CPU than einsums on the token-major tensors).
Axis names in einsums: b batch, h head, m compressed token, n lookup token, d head channel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax.ops.attention import _heads_major
from vitjax.ops.attention import attention_logits
from vitjax.ops.attention import softmax_weighted_sum


def mhbc_logits(q_p, k_l, *, scale):
  """Shared similarity logits S = q_p k_l^T * scale: (B, M, H, d), (B, N, H, d) -> (B, H, M, N)."""
  return attention_logits(q_p, k_l, scale)


def gather_weights(logits):
  """A_g: softmax over the lookup axis N; (B, H, M, N), each (b, h, m) row sums to 1."""
  return jax.nn.softmax(logits, axis=-1)


def propagate_weights(logits):
  """A_p: softmax of the same logits over the compressed axis M; each (b, h, n) column sums to 1."""
  return jax.nn.softmax(logits, axis=-2)


def gather(logits, v_l):
  """Compressed <- lookup: A_g V_l.

  Args:
    logits: (B, H, M, N) from `mhbc_logits`.
    v_l: (B, N, H, dv) lookup-token values.

  Returns:
    (B, M, H, dv) per-head messages for the compressed tokens.
  """
  out = softmax_weighted_sum(logits, _heads_major(v_l))             # (B, H, M, dv)
  return jnp.swapaxes(out, 1, 2)


def propagate(logits, v_p):
  """Lookup <- compressed: A_p^T V_p, reusing the gather logits.

  Args:
    logits: (B, H, M, N), the pre-softmax logits the gather step computed.
    v_p: (B, M, H, dv) compressed-token values.

  Returns:
    (B, N, H, dv) per-head messages for the lookup tokens.
  """
  # Softmax over M: the logits transposed to (B, H, N, M), normalised over their last axis.
  out = softmax_weighted_sum(jnp.swapaxes(logits, -1, -2), _heads_major(v_p))  # (B, H, N, dv)
  return jnp.swapaxes(out, 1, 2)


def bidirectional_cross_attention(q_p, k_l, v_l, v_p, *, scale):
  """Both directions at once (same inputs for both): returns (to_compressed, to_lookup, logits).

  Shapes: q_p (B, M, H, d), k_l (B, N, H, d), v_l (B, N, H, dv), v_p (B, M, H, dv) ->
  (B, M, H, dv), (B, N, H, dv), (B, H, M, N).
  """
  logits = mhbc_logits(q_p, k_l, scale=scale)
  return gather(logits, v_l), propagate(logits, v_p), logits


# Weight-absorbed forms. With few compressed tokens the lookup-side projections (W_k, W_vl on
# all N lookup tokens, W_ol back onto them: 3 N D^2 per block) dominate the cost. Associating the
# products the other way moves them onto the M compressed tokens, at the price of per-head
# contractions over the full width D:
#   S_h        = (q_h W_k,h^T) x_l^T + q_h b_k,h                  (no K_l is formed)
#   A_g,h V_l,h = (A_g,h x_l) W_vl,h + b_vl,h                      (rows of A_g sum to 1)
#   sum_h A_p,h^T V_p,h W_ol,h = sum_h A_p,h^T (V_p,h W_ol,h)      (one contraction over h and m)
# Per block this costs 2 M D^2 + 2 H N M D (gather) and 2 M D^2 + H N M D (propagate) instead of
# 2 N D^2 + 2 N M D and M D^2 + N M D + N D^2: fewer multiply-adds when M (D + (H - 1) N) < N D.
# The math and the parameters are the same as the projected form (tests/test_mhbc.py).


def absorbed_logits(q_p, x_l, w_k, b_k, *, scale):
  """mhbc_logits(q_p, x_l W_k + b_k) without forming the keys.

  Args:
    q_p: (B, M, H, d) compressed-token queries.
    x_l: (B, N, D) (normalised) lookup tokens, the input of the key projection.
    w_k: (D, H, d) key kernel; b_k: (H, d) key bias or None.
    scale: logit scale, 1 / sqrt(d).

  Returns:
    (B, H, M, N) logits.
  """
  q_p = q_p * jnp.asarray(scale, q_p.dtype)
  q_k = jnp.einsum("bmhd,Dhd->bhmD", q_p, w_k)                      # (B, H, M, D)
  logits = jnp.einsum("bhmD,bnD->bhmn", q_k, x_l)
  if b_k is not None:
    logits = logits + jnp.einsum("bmhd,hd->bhm", q_p, b_k)[..., None]
  return logits


def gather_absorbed(logits, x_l, w_v, b_v):
  """gather(logits, x_l W_v + b_v) without forming the lookup values: (B, M, H, d)."""
  mixed = softmax_weighted_sum(logits, x_l[:, None])                # (B, H, M, D); x_l shared by heads
  out = jnp.einsum("bhmD,Dhd->bmhd", mixed, w_v)
  return out if b_v is None else out + b_v


def propagate_absorbed(logits, v_p, w_o):
  """Output projection of propagate(logits, v_p), without bias: (B, N, D).

  Equal to einsum('bnhd,hdD->bnD', propagate(logits, v_p), w_o); the per-head values are mapped
  to the output width first, on the M compressed tokens, then mixed onto the N lookup tokens.
  """
  u = jnp.einsum("bmhd,hdD->bhmD", v_p, w_o)                         # (B, H, M, D)
  return jnp.einsum("bhmn,bhmD->bnD", propagate_weights(logits), u)
