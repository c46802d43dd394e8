"""Performer attention with positive random features (Choromanski et al., ICLR 2021, "Rethinking
Attention with Performers"; FAVOR+), in the form T2T-ViT's Performer layer uses.

Softmax attention weighs token s for query t by exp(q_t . k_s). FAVOR+ replaces that kernel by
an inner product of positive features,

    phi(x) = exp(omega x - |x|^2 / 2) / sqrt(m)          omega: (m, d) random features,

so that the (T, S) weight matrix is never formed:

    y_t = phi(q_t)^T (sum_s phi(k_s) v_s^T) / (phi(q_t)^T sum_s phi(k_s) + eps)

costs O((T + S) m d) instead of O(T S d). For omega with i.i.d. N(0, I) rows the features are an
unbiased estimate of exp(q . k); T2T-ViT draws omega once at init as orthogonal rows scaled by
sqrt(m) (`orthogonal_ * sqrt(m)`) and freezes it. Neither q nor k is scaled by d^(-1/4) there,
and eps = 1e-8 guards the division. Inputs are used as given (float32 for the official
numerics: exp of the projections can reach large values).

Shapes: q (..., T, d), k (..., S, d), v (..., S, dv), omega (m, d); leading axes are batch axes
(one head per leading index).
"""
from __future__ import annotations

import jax.numpy as jnp


def positive_random_features(x, omega):
  """phi(x) = exp(omega x - |x|^2 / 2) / sqrt(m): (..., N, d), (m, d) -> (..., N, m)."""
  m = omega.shape[0]
  wx = jnp.einsum("...nd,md->...nm", x, omega)
  half_sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  return jnp.exp(wx - half_sq_norm) / jnp.sqrt(jnp.asarray(m, x.dtype))


def performer_attention(q, k, v, omega, *, eps: float = 1e-8):
  """Linear-time attention with the kernel phi(q)^T phi(k) (module docstring).

  Args:
    q: (..., T, d) queries.
    k: (..., S, d) keys.
    v: (..., S, dv) values.
    omega: (m, d) random features.
    eps: added to the normaliser phi(q_t)^T sum_s phi(k_s).

  Returns:
    (..., T, dv).
  """
  qp = positive_random_features(q, omega)                        # (..., T, m)
  kp = positive_random_features(k, omega)                        # (..., S, m)
  kv = jnp.einsum("...sm,...se->...me", kp, v)                   # (..., m, dv)
  normaliser = jnp.einsum("...tm,...m->...t", qp, kp.sum(axis=-2))[..., None]  # (..., T, 1)
  return jnp.einsum("...tm,...me->...te", qp, kv) / (normaliser + eps)
