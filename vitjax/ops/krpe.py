"""Kernelized attention with relative positional encoding in O(N log N).

Luo, Li, Cai, He, et al., "Stable, Fast and Accurate: Kernelized Attention with Relative
Positional Encoding" (NeurIPS 2021). With an additive relative bias b_{j-i} the softmax weight
exp(q_i . k_j / sqrt(d) + b_{j-i}) factorises as c_{j-i} exp(q_i . k_j / sqrt(d)), c = exp(b).
Replacing the exponential kernel by Performer's positive random features (Choromanski et al.,
"Rethinking Attention with Performers", ICLR 2021),

  phi(x) = m^{-1/2} [exp(w_r . x - |x|^2 / 2)]_{r=1..m},   w_r ~ N(0, I_d) (orthogonal blocks),

with x = d^{-1/4} q (resp. k), gives

  z_i = phi(q_i)^T [sum_j c_{j-i} phi(k_j) v_j^T] / phi(q_i)^T [sum_j c_{j-i} phi(k_j)],

and each bracket is a Toeplitz (1-D) or BTTB (2-D grid) product over the tokens for each of
the m (d + 1) channels, done with FFTs in `vitjax.ops.toeplitz`. Cost O(N m d log N).

Prefix tokens (CLS): the Toeplitz structure covers the patch tokens only; every pair that
involves a prefix token gets one extra coefficient per head, c_p = exp(b_p). So a patch query
sees Toeplitz(patches) + c_p * (prefix keys), and a prefix query sees all keys weighted c_p.

Numerical stabilisation (all of it cancels in the ratio up to the additive eps):
  * phi(q_i) subtracts max_r of its own exponents, phi(k_j) the max over all keys and features
    of the same example and head (never across the batch), both under stop_gradient;
  * eps (1e-6, as in Performer) is added to each feature so the denominator stays positive;
  * c = exp(b - max b) per head, so the largest coefficient is exactly 1 and the FFT's
    rounding error is relative to the useful signal.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.ops import toeplitz

TOEPLITZ_IMPLS = ("fft", "dense")


def draw_projection(key, num_features: int, dim: int, *, orthogonal: bool = True):
  """Random feature matrix W (m, d) for positive random features.

  With `orthogonal=True` rows come in blocks of d mutually orthogonal directions (QR of a
  Gaussian matrix), each row rescaled to the norm of an independent N(0, I_d) sample, so the
  rows are still marginally Gaussian while the estimator's variance drops (Performer's ORF).
  """
  if num_features < 1:
    raise ValueError(f"num_features must be >= 1, got {num_features}")
  if not orthogonal:
    return jax.random.normal(key, (num_features, dim), jnp.float32)
  num_blocks = -(-num_features // dim)
  key_q, key_norm = jax.random.split(key)
  gauss = jax.random.normal(key_q, (num_blocks, dim, dim), jnp.float32)
  q, r = jnp.linalg.qr(gauss)                                   # (blocks, d, d), orthonormal cols
  # QR fixes the signs of diag(r) by convention, which skews the directions of q; flipping
  # columns by sign(diag(r)) makes q Haar-distributed, so each row is uniformly oriented
  # and the feature estimator stays unbiased.
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(key_norm, (num_features, dim)), axis=-1)
  return rows * norms[:, None]


def prf_features(x, projection, *, is_query: bool, eps: float = 1e-6):
  """Positive random features phi(x), stabilised; x (B, N, H, d) already scaled by d^{-1/4}.

  Returns:
    (B, H, m, N): token axis last, the layout the FFT products want.
  """
  m = projection.shape[0]
  # Exponents w_r . x - |x|^2 / 2 with the features as the minor axis, so that the per-query
  # max is a minor-axis reduction (on XLA:CPU a reduction over a non-minor axis of this
  # tensor cost more than all the rest of the feature map); transposed at the end.
  logits = jnp.einsum("bnhd,md->bnhm", x, projection.astype(x.dtype))
  logits = logits - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  axes = (3,) if is_query else (1, 3)                           # per query / per (example, head)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
  features = (jnp.exp(logits - shift) + eps) * (m ** -0.5)
  return jnp.einsum("bnhm->bhmn", features)


def _contract_features(phi_q, y):
  """sum_r phi_q[b, h, r, n] * y[b, h, r, e, n] -> (B, H, e, n).

  Written as an unrolled chain of multiply-adds over the m features: XLA fuses it into one
  elementwise loop with tokens as the minor axis. On XLA:CPU that was far faster than the same
  contraction as a reduce over a non-minor axis or as a dot_general batched over tokens.
  """
  acc = phi_q[:, :, 0, None, :] * y[:, :, 0]
  for r in range(1, phi_q.shape[2]):
    acc = acc + phi_q[:, :, r, None, :] * y[:, :, r]
  return acc


def _toeplitz_feature_sum(phi_q, phi_k, v1, apply_t, block: int):
  """sum_r phi_q[:, :, r] * T(phi_k[:, :, r] * v1) over the m features, `block` at a time.

  A scan over feature blocks keeps only (B, H, block, e, n) FFT buffers alive instead of the
  full (B, H, m, e, n) tensor: less memory, and buffers small enough to stay in cache (on CPU
  one feature per step was the fastest setting for long sequences; see
  experiments/attention_scaling). The body is rematerialised in the backward pass, so the
  gradient does not store per-feature FFT outputs either.

  Args:
    phi_q, phi_k: (B, H, m, n) features of the patch queries / keys.
    v1: (B, H, e, n) values with the ones channel.
    apply_t: (B, H, f, e, n) -> same, the Toeplitz/BTTB product over the last axis.
    block: features per scan step; m is zero-padded to a multiple (zero features add 0).

  Returns:
    (B, H, e, n).
  """
  b, h, m, n = phi_q.shape
  block = max(1, min(block, m))
  steps = -(-m // block)
  pad = [(0, 0), (0, 0), (0, steps * block - m), (0, 0)]

  def split(phi):                                                 # (steps, B, H, block, n)
    return jnp.moveaxis(jnp.pad(phi, pad).reshape(b, h, steps, block, n), 2, 0)

  @jax.checkpoint
  def step(acc, feats):
    fq, fk = feats
    y = apply_t(fk[:, :, :, None, :] * v1[:, :, None, :, :])     # (B, H, block, e, n)
    return acc + _contract_features(fq, y), None

  acc = jnp.zeros(v1.shape, jnp.result_type(phi_q, v1))
  acc, _ = jax.lax.scan(step, acc, (split(phi_q), split(phi_k)))
  return acc


def krpe_attention(q, k, v, rel_bias, projection, *, grid=None, num_prefix: int = 0,
                   prefix_bias=None, scale=None, eps: float = 1e-6, feature_block: int = 1,
                   toeplitz_impl: str = "fft"):
  """Kernelized attention with a relative-position multiplier exp(b), O(N log N) via FFT.

  Args:
    q, k: (B, N, H, d) queries and keys.
    v: (B, N, H, dv) values.
    rel_bias: relative bias b over the n = N - num_prefix patch tokens, one table per head:
      (H, 2n - 1) for a 1-D sequence (grid=None), or (H, 2h - 1, 2w - 1) for an h x w grid.
    projection: (m, d) random feature matrix (`draw_projection`).
    grid: (h, w) for the 2-D (BTTB) form; None for the 1-D (Toeplitz) form.
    num_prefix: P leading tokens that are not on the grid / sequence (e.g. CLS).
    prefix_bias: (H,) bias of every pair involving a prefix token; required if P > 0.
    scale: logit scale of q . k, default d^{-1/2}; split as sqrt(scale) on q and on k.
    eps: Performer's additive feature stabiliser.
    feature_block: random features per FFT pass (see `_toeplitz_feature_sum`).
    toeplitz_impl: 'fft' (O(n log n), the method of the paper) or 'dense' (the explicit
      (H, n, n) matrix, O(n^2) but GEMM-speed: the faster choice for ViT-sized grids on CPU,
      see experiments/attention_scaling). Both compute the same function.

  Returns:
    (B, N, H, dv) attended values.
  """
  choices.check("toeplitz_impl", toeplitz_impl, TOEPLITZ_IMPLS)
  _, n_all, num_heads, d = q.shape
  n = n_all - num_prefix
  if grid is not None:
    if grid[0] * grid[1] != n:
      raise ValueError(f"grid {grid} holds {grid[0] * grid[1]} tokens but there are {n} patches")
    want = (num_heads, 2 * grid[0] - 1, 2 * grid[1] - 1)
  else:
    want = (num_heads, 2 * n - 1)
  if rel_bias.shape != want:
    raise ValueError(f"rel_bias has shape {rel_bias.shape}, expected {want}")
  if num_prefix and prefix_bias is None:
    raise ValueError("prefix_bias (one value per head) is required when num_prefix > 0")
  scale = d ** -0.5 if scale is None else scale
  root = jnp.asarray(scale, q.dtype) ** 0.5
  phi_q = prf_features(q * root, projection, is_query=True, eps=eps)   # (B, H, m, N)
  phi_k = prf_features(k * root, projection, is_query=False, eps=eps)  # (B, H, m, N)

  # c = exp(b - max b) per head: the max cancels between numerator and denominator.
  flat = rel_bias.reshape(num_heads, -1)
  if num_prefix:
    flat = jnp.concatenate([flat, prefix_bias[:, None]], axis=1)
  top = jax.lax.stop_gradient(jnp.max(flat, axis=1))              # (H,)
  coef = jnp.exp(rel_bias - top.reshape((num_heads,) + (1,) * (rel_bias.ndim - 1)))

  # Values with a row of ones appended: the last channel carries the denominator.
  v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  v1 = jnp.einsum("bnhe->bhen", v1)                               # (B, H, e, N), e = dv + 1

  # Patch tokens: sum_r phi_r(q_i) [T (phi_r(k) v1)]_i, T Toeplitz (1-D) or BTTB (2-D).
  if toeplitz_impl == "dense":
    mat = toeplitz.toeplitz_matrix(coef) if grid is None else toeplitz.bttb_matrix(coef)
    apply_t = functools.partial(jnp.einsum, "hij,bhfej->bhfei", mat)  # (H, n, n) explicit T
  elif grid is None:
    apply_t = functools.partial(toeplitz.toeplitz_matvec, coef[:, None, None, :])
  else:
    def apply_t(u):                                               # (B, H, f, e, n)
      y = toeplitz.bttb_matvec(coef[:, None, None, :, :], u.reshape(u.shape[:-1] + tuple(grid)))
      return y.reshape(u.shape)
  out_patch = _toeplitz_feature_sum(phi_q[..., num_prefix:], phi_k[..., num_prefix:],
                                    v1[..., num_prefix:], apply_t, feature_block)

  if num_prefix:
    c_p = jnp.exp(prefix_bias - top)[None, :, None, None]         # (1, H, 1, 1)
    # Prefix keys seen by every query with weight c_p: a rank-P term, no FFT needed.
    s_prefix = jnp.einsum("bhmp,bhep->bhme", phi_k[..., :num_prefix], v1[..., :num_prefix])
    s_all = jnp.einsum("bhmn,bhen->bhme", phi_k, v1)
    out_patch = out_patch + c_p * jnp.einsum("bhmn,bhme->bhen", phi_q[..., num_prefix:],
                                             s_prefix)
    out_prefix = c_p * jnp.einsum("bhmp,bhme->bhep", phi_q[..., :num_prefix], s_all)
    out = jnp.concatenate([out_prefix, out_patch], axis=-1)       # (B, H, e, N)
  else:
    out = out_patch
  out = out[:, :, :-1] / out[:, :, -1:]
  return jnp.einsum("bhen->bnhe", out)
