"""SOFT's softmax-free attention (Lu et al., "SOFT: Softmax-free Transformer with Linear
Complexity", NeurIPS 2021), the math in pure jnp.

Queries and keys are one matrix (Q = K). With q_i already scaled by d^(-1/4), the attention
kernel is Gaussian,

    G(q_i, k_j) = exp(-||q_i - k_j||^2 / 2)        (= exp(-||q_i - k_j||^2 / (2 sqrt d)) unscaled),

and the N x N matrix S = G(Q, Q) is replaced by its Nystrom approximation through m landmarks
Q~ (sampled from Q by a strided convolution in the model, `vitjax.models.soft`):

    S V  ~  G(Q, Q~) . (G(Q~, Q~) + eps I)^+ . (G(Q~, Q) . V),

evaluated right to left in O(N m d) time and memory (linear in N for a fixed m). The
pseudo-inverse of the m x m landmark matrix A = G(Q~, Q~) is computed, as in the official code
(fudan-zvg/SOFT, `SOFT/kernel/inverse.py`), by Newton-Schulz iterations on P = A + eps I
(eps = 0.01) from V_0 = alpha P with alpha = 0.9 * 2 / max_i(sum_j A_ij)^2:

    V_{t+1} = 2 V_t - V_t P V_t,      T = 20 steps.

Convergence: in P's eigenbasis P V_t = I - (I - alpha P^2)^(2^t), so an eigenvalue lambda of P
is inverted up to the relative error (1 - alpha lambda^2)^(2^t). max row sum >= lambda_max
makes |1 - alpha lambda^2| <= 0.8 at the top of the spectrum; small eigenvalues (near eps)
converge slowly, so with T = 20 the result is a smoothly regularised inverse rather than the
exact one when A is ill-conditioned (tests/test_soft.py checks both the converged case against
numpy's pinv and the closed form above in float64).

The backward pass is the official one (`_NewtonInverseKernel.backward`): the gradient of an
exact inverse evaluated at the iterate, dL/dP = -V^T (dL/dV) V^T, not the derivative of the 20
steps (whose graph is never stored).

  gaussian_kernel   G(x_i, y_j) for two sets of (scaled) vectors
  newton_inverse    the Newton-Schulz pseudo-inverse of a batch of m x m matrices
  soft_attention    G(Q, Q~) . NS(G(Q~, Q~)) . (G(Q~, Q) . V) over (B, N, H, d) heads
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEWTON_ITERS = 20        # the official `newton_max_iter`
NEWTON_REG = 0.01        # eps: P = A + eps I (official `newton_inv`)
NEWTON_SCALE = 0.9       # alpha = NEWTON_SCALE * 2 / max row sum^2
# The m x m Newton products are tiny; full precision keeps them float32 on GPU/TPU too, where the
# default matmul precision is lower and 20 steps would amplify the difference.
_HIGHEST = jax.lax.Precision.HIGHEST


def gaussian_kernel(x, y):
  """exp(-||x_i - y_j||^2 / 2) over the last axis: x (..., N, d), y (..., M, d) -> (..., N, M).

  Expanded as ||x||^2 + ||y||^2 - 2 x.y, the official `subtraction_gaussian_kernel_torch`; the
  expansion may round slightly below zero, giving values slightly above 1, as there.
  """
  sq = (jnp.sum(x * x, -1)[..., :, None] + jnp.sum(y * y, -1)[..., None, :]
        - 2.0 * jnp.einsum("...nd,...md->...nm", x, y))
  return jnp.exp(-0.5 * sq)


def _newton_forward(a, num_iters: int, reg: float):
  m = a.shape[-1]
  eye = jnp.eye(m, dtype=a.dtype)
  alpha = NEWTON_SCALE * 2.0 / jnp.max(jnp.sum(a, -1), -1) ** 2     # (...,) per matrix
  p = a + reg * eye
  v = alpha[..., None, None] * p
  mm = functools.partial(jnp.matmul, precision=_HIGHEST)
  # Traced once, unrolled when lowered (the same program as a Python loop, cheaper to trace).
  return jax.lax.fori_loop(0, num_iters, lambda _, v: 2.0 * v - mm(mm(v, p), v), v,
                           unroll=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def newton_inverse(a, num_iters: int = NEWTON_ITERS, reg: float = NEWTON_REG):
  """(A + reg I)^-1 of a batch of m x m matrices by `num_iters` Newton-Schulz steps (module
  docstring). a: (..., m, m) -> (..., m, m). Differentiable (the official backward)."""
  return _newton_forward(a, num_iters, reg)


def _newton_fwd(a, num_iters, reg):
  v = _newton_forward(a, num_iters, reg)
  return v, v


def _newton_bwd(num_iters, reg, v, g):
  del num_iters, reg
  vt = jnp.swapaxes(v, -1, -2)
  return (-jnp.matmul(jnp.matmul(vt, g, precision=_HIGHEST), vt, precision=_HIGHEST),)


newton_inverse.defvjp(_newton_fwd, _newton_bwd)


def soft_attention(q, landmarks, v, *, num_iters: int = NEWTON_ITERS, reg: float = NEWTON_REG):
  """Softmax-free attention of every head (module docstring).

  Args:
    q: (B, N, H, d) queries = keys, already scaled by d^(-1/4).
    landmarks: (B, m, H, d) the landmark queries Q~ (same scale).
    v: (B, N, H, dv) values.
    num_iters, reg: the Newton-Schulz steps and the ridge eps of the landmark inverse.

  Returns:
    (B, N, H, dv) = G(Q, Q~) . NS(G(Q~, Q~)) . (G(Q~, Q) . V) per head, in v's dtype; the
    kernels and the inverse are computed in at least float32.
  """
  out_dtype, dtype = v.dtype, jnp.promote_types(q.dtype, jnp.float32)
  q, landmarks, v = (jnp.moveaxis(t, 2, 1).astype(dtype) for t in (q, landmarks, v))  # (B,H,.,.)
  k1 = gaussian_kernel(q, landmarks)                               # (B, H, N, m)
  inv = newton_inverse(gaussian_kernel(landmarks, landmarks), num_iters, reg)  # (B, H, m, m)
  kv = jnp.einsum("bhnm,bhnd->bhmd", k1, v)                       # G(Q~, Q) V: (B, H, m, dv)
  y = jnp.einsum("bhnm,bhmk->bhnk", k1, inv)                      # G(Q, Q~) NS(A): (B, H, N, m)
  y = jnp.einsum("bhnk,bhkd->bhnd", y, kv)
  return jnp.moveaxis(y, 1, 2).astype(out_dtype)                   # (B, N, H, dv)
