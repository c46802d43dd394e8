"""ShiftAddViT's primitives (You et al., NeurIPS 2023), in pure jnp: binary codes for Q and K,
the add-only linear angular attention, power-of-two (shift) weights and the latency-aware
load-balancing loss of the multiply/shift mixture of experts.

Symbols follow the paper and the official code (GATECH-EIC/ShiftAddViT, pvt/pvt_v2.py,
hashing/ksh.py, deepshift/, fmoe_new.py). Per head, with queries and keys shared (one `to_qk`
projection) and unit-normalised, q^ = q / |q|:

  KSH codes     h(q^) = 1[ A (k(q^) - mvec) > 0 ] in {0, 1}^nbits, k(q^)_j = exp(-|q^ - a_j|^2 /
                (2 sigma)), a_j the m anchors, sigma the mean squared distance over the tokens and
                anchors of the example (`ksh_project`, `ksh_codes`). The hash state (A, mvec,
                anchor) is fitted once from a batch (`ksh_fit`), not trained by gradient.
  mean codes    b(x) = 1[x - mean(x) > 0] (the official `LinAngularAttention_binary`, `mean_codes`).
  attention     y = 0.5 v + (1/pi) Q_b (K_b^T V), y <- y / |y|, then + DWConv_{9x1}(v) along the
                tokens (`linear_angular_attention`, `token_conv`). With binary Q_b, K_b both
                products are sums of selected rows: `impl='add'` writes them as selects and
                additions, the paper's MatAdd (no multiplication); `impl='dot'` (the default)
                as products of 0/1 matrices, the same sums through XLA's GEMM. XLA has no
                add-only kernel (the paper's is a TVM one): in a one-off timing on a shared
                2-core CPU 'add' ran 20x slower than 'dot' (0.45 s vs 0.023 s for both
                products at 6 heads, N = 16384, d = 64, 16 bits).
  shift weights W = sign(round(s)) * 2^round(clip(p, -(2^(bits-1) - 2), 0)) (DeepShift-PS,
                `shift_weight`); activations and biases rounded to fixed point (`fixed_point`).
  LL-loss       cv^2(alpha * importance) + cv^2(alpha * load) over the experts, alpha the experts'
                relative latencies (`balance_loss`).

Every binarization passes a straight-through gradient (STE), as the official autograd functions
do; each function's docstring states its backward rule, and tests/test_shiftadd.py checks them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vitjax import choices

MATMUL_IMPLS = ("add", "dot")


def _ste(value, surrogate):
  """Forward exactly `value`; backward the gradient of `surrogate`."""
  return jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))


# ---------------------------------------------------------------------------------------------
# Binary codes.

def binarize_ste(y):
  """1[y > 0] as floats; backward g * 1[0 < y < 1] (the official `BinaryQuantizer`)."""
  inside = (y > 0) & (y < 1)
  surrogate = jnp.where(inside, y, jax.lax.stop_gradient(y))
  return _ste((y > 0).astype(y.dtype), surrogate)


def mean_codes(x):
  """1[x - mean(x) > 0], the mean over every axis but the first (one example's heads, tokens
  and channels); backward the gradient of clip(x, 0, 1) (official `LinAngularAttention_binary`,
  whose mean runs over the whole batch: equal for a batch of one)."""
  mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  return _ste((x - mean > 0).astype(x.dtype), jnp.clip(x, 0.0, 1.0))


def _sq_dist(x, anchor):
  """|x_n - a_j|^2 for x (B, H, N, d), anchor (1 or B, H, m, d) -> (B, H, N, m), expanded as
  |x|^2 + |a|^2 - 2 x.a so no (N, m, d) difference is formed."""
  cross = jnp.einsum("bhnd,bhmd->bhnm", x, jnp.broadcast_to(anchor, x.shape[:2] + anchor.shape[2:]))
  return (jnp.sum(x * x, -1)[..., None] + jnp.sum(anchor * anchor, -1)[:, :, None, :]
          - 2.0 * cross)


def ksh_kernel(x, anchor):
  """Gaussian kernel to the anchors, exp(-|x - a|^2 / (2 sigma)), sigma the mean squared
  distance over the example's tokens and anchors (per example and head): (B, H, N, m)."""
  sq = _sq_dist(x, anchor)
  sigma = jnp.mean(sq, axis=(2, 3), keepdims=True)
  return jnp.exp(-sq / (2.0 * sigma))


def ksh_project(x, A, mvec, anchor):
  """The KSH projections before binarization, A (k(x) - mvec): (B, H, N, nbits).

  x: (B, H, N, d) unit-norm queries/keys; A: (H, nbits, m); mvec: (1, H, 1, m); anchor:
  (1, H, m, d) (the official buffers' shapes). No gradient reaches the hash state.
  """
  A, mvec, anchor = (jax.lax.stop_gradient(t) for t in (A, mvec, anchor))
  return jnp.einsum("bhnm,hkm->bhnk", ksh_kernel(x, anchor) - mvec, A)


def ksh_codes(x, A, mvec, anchor):
  """Binary KSH codes 1[A (k(x) - mvec) > 0] (B, H, N, nbits), STE as `binarize_ste`."""
  return binarize_ste(ksh_project(x, A, mvec, anchor))


def ksh_fit(x, key, A, *, topk: int = 10, lr: float = 5e-4, momentum: float = 0.9,
            iterations: int = 100, anchor_index=None):
  """Fits the KSH hash state to one batch of unit-norm queries/keys x (B, H, N, d), as the
  official `EcoformerQuant` does on its first forward (`KernelSH.train_hashing_weight_woeig`).

    S   = +1 for each token's `topk` most similar tokens (cosine), -1 for its `topk` least
          similar (-1 wins where both), times nbits;
    anchors a_1..a_m: tokens `anchor_index` (default: a random draw of m with `key`) of example 0;
    K   = k(x) - mvec, mvec the kernel's mean over the batch and tokens;
    for each bit r: starting from A[:, r], `iterations` steps of Nesterov SGD (lr, momentum) on
          L(a) = -mean_{b,h} y^T S y / (N nbits),  y = 2 sigmoid(K a) - 1,
      keep the new or old row, whichever has the lower L with y = sign(K a) (one choice over all
      heads), then S <- S - y y^T.

  Memory is O(B H N^2) (S); fit on a small batch. Returns dict(A, mvec, anchor) shaped as
  `ksh_project` takes them; m is A.shape[-1].
  """
  x = jax.lax.stop_gradient(x)
  b, h, n, d = x.shape
  nbits, m = A.shape[1], A.shape[2]
  if anchor_index is None:
    anchor_index = jax.random.permutation(key, n)[:m]
  anchor = x[:1, :, anchor_index]                                      # (1, H, m, d)
  cos = jnp.einsum("bhnd,bhld->bhnl", x, x)
  s0 = jnp.zeros_like(cos)
  rows = tuple(jnp.indices((b, h, n, topk), sparse=True)[:3])
  s0 = s0.at[rows + (jax.lax.top_k(cos, topk)[1],)].set(1.0)
  s0 = s0.at[rows + (jax.lax.top_k(-cos, topk)[1],)].set(-1.0)
  kern = ksh_kernel(x, anchor)                                         # (B, H, N, m)
  mvec = jnp.mean(kern, axis=(0, 2), keepdims=True)                    # (1, H, 1, m)
  kk = kern - mvec

  def loss(y, s):
    return jnp.mean(-jnp.einsum("bhn,bhnl,bhl->bh", y, s, y) / (n * nbits))

  def smooth_loss(a, s):
    return loss(2.0 * jax.nn.sigmoid(jnp.einsum("bhnm,hm->bhn", kk, a)) - 1.0, s)

  def sgd_step(_, carry):
    a, buf, s = carry
    g = jax.grad(smooth_loss)(a, s)
    buf = momentum * buf + g                                           # torch SGD, dampening 0
    return a - lr * (g + momentum * buf), buf, s

  def bit(s, a0):
    a, _, _ = jax.lax.fori_loop(0, iterations, sgd_step, (a0, jnp.zeros_like(a0), s))
    sign = lambda a: jnp.where(jnp.einsum("bhnm,hm->bhn", kk, a) > 0, 1.0, -1.0)  # noqa: E731
    y0, y1 = sign(a0), sign(a)
    better = loss(y1, s) < loss(y0, s)
    a, y = jnp.where(better, a, a0), jnp.where(better, y1, y0)
    return s - jnp.einsum("bhn,bhl->bhnl", y, y), a

  _, rows_a = jax.lax.scan(bit, s0 * nbits, jnp.swapaxes(A, 0, 1))    # over bits: (nbits, H, m)
  return dict(A=jnp.swapaxes(rows_a, 0, 1), mvec=mvec, anchor=anchor)


# ---------------------------------------------------------------------------------------------
# The attention.

def _rows_sum(codes, rows):
  """sum_j codes[..., n, j] rows[..., j, :] for 0/1 codes, as selects and additions:
  codes (B, H, N, K), rows (B, H, K, d) -> (B, H, N, d)."""
  out = jnp.zeros(codes.shape[:-1] + rows.shape[-1:], rows.dtype)
  for j in range(codes.shape[-1]):
    out = out + jnp.where(codes[..., j, None] > 0, rows[..., j, None, :], 0.0)
  return out


def _tokens_sum(codes, v):
  """sum_n codes[..., n, j] v[..., n, :] for 0/1 codes, as selects and additions:
  codes (B, H, N, K), v (B, H, N, d) -> (B, H, K, d)."""
  return jnp.stack([jnp.sum(jnp.where(codes[..., j, None] > 0, v, 0.0), axis=-2)
                    for j in range(codes.shape[-1])], axis=-2)


# Forward as additions; backward the gradients of the matrix products they equal for 0/1 codes
# (the gradient reaching the codes is what their STE passes on).
@jax.custom_vjp
def add_codes_rows(codes, rows):
  """Q_b R for 0/1 codes Q_b (B, H, N, K) and rows R (B, H, K, d), by additions only."""
  return _rows_sum(codes, rows)


def _codes_rows_fwd(codes, rows):
  return _rows_sum(codes, rows), (codes, rows)


def _codes_rows_bwd(res, g):
  codes, rows = res
  return (jnp.einsum("bhnd,bhkd->bhnk", g, rows), jnp.einsum("bhnk,bhnd->bhkd", codes, g))


add_codes_rows.defvjp(_codes_rows_fwd, _codes_rows_bwd)


@jax.custom_vjp
def add_codes_t_values(codes, v):
  """K_b^T V for 0/1 codes K_b (B, H, N, K) and values V (B, H, N, d), by additions only."""
  return _tokens_sum(codes, v)


def _codes_t_values_fwd(codes, v):
  return _tokens_sum(codes, v), (codes, v)


def _codes_t_values_bwd(res, g):
  codes, v = res
  return (jnp.einsum("bhnd,bhkd->bhnk", v, g), jnp.einsum("bhnk,bhkd->bhnd", codes, g))


add_codes_t_values.defvjp(_codes_t_values_fwd, _codes_t_values_bwd)


def linear_angular_attention(qb, kb, v, *, impl: str = "dot"):
  """y = 0.5 v + (1/pi) Q_b (K_b^T V), normalised to unit length per token: (B, H, N, d).

  qb, kb: (B, H, N, K) binary codes; v: (B, H, N, d). K_b^T V sums the value rows of the tokens
  whose bit j is set (K x d sums over N) and Q_b (.) sums those rows back per token: with
  impl='add' as selects and additions (`add_codes_t_values`, `add_codes_rows`; their backward
  is the matrix products' gradient), with impl='dot' as products of 0/1 matrices. The cost is
  linear in N; the N x N matrix Q_b K_b^T is never formed.
  """
  choices.check("matmul_impl", impl, MATMUL_IMPLS)
  if impl == "add":
    qkv = add_codes_rows(qb, add_codes_t_values(kb, v))
  else:
    qkv = jnp.einsum("bhnk,bhkd->bhnd", qb, jnp.einsum("bhnk,bhnd->bhkd", kb, v))
  y = 0.5 * v + (1.0 / math.pi) * qkv
  return y / jnp.linalg.norm(y, axis=-1, keepdims=True)


def token_conv(v, kernel):
  """Per-head depthwise convolution along the token axis (the official `dconv`, a (K, 1) Conv2d
  with one group per head): out[b, h, n] = sum_t kernel[t, h] v[b, h, n + t - K // 2], zero
  padded. v: (B, H, N, d); kernel: (K, H), K odd."""
  k = kernel.shape[0]
  r = k // 2
  n = v.shape[2]
  vp = jnp.pad(v, ((0, 0), (0, 0), (r, r), (0, 0)))
  out = jnp.zeros_like(v)
  for t in range(k):
    out = out + kernel[t][None, :, None, None].astype(v.dtype) * vp[:, :, t:t + n]
  return out


# ---------------------------------------------------------------------------------------------
# Shift (power-of-two) weights.

def shift_range(weight_bits: int = 5) -> tuple[int, int]:
  """DeepShift-PS's exponent range (-(2^(bits-1) - 2), 0): (-14, 0) for 5 bits."""
  return -(2 ** (weight_bits - 1) - 2), 0


def shift_weight(shift, sign, *, weight_bits: int = 5):
  """W = 2^round(clip(shift)) * sign(round(sign)): zero or a signed power of two.

  Backward (DeepShift's STEs: clip, round and sign pass gradients unchanged, the product
  `unsym_grad_mul` passes g * sign to the power and g itself to the sign):
    dL/dshift = G * sign(round(sign)) * 2^round(clip(shift)) * ln 2,   dL/dsign = G,
  with G = dL/dW.
  """
  lo, hi = shift_range(weight_bits)
  p = jnp.round(jnp.clip(shift, lo, hi))
  power = jnp.ldexp(jnp.ones_like(shift), p.astype(jnp.int32))      # exactly 2^p
  power = power + power * math.log(2.0) * (shift - jax.lax.stop_gradient(shift))
  s = jnp.sign(jnp.round(sign))
  return power * s + (sign - jax.lax.stop_gradient(sign))


def shift_from_weight(w, *, weight_bits: int = 5):
  """(shift, sign) parameters whose `shift_weight` is w rounded to the nearest power of two in
  log2 (DeepShift's `get_shift_and_sign`, deterministic rounding), exponents clipped to the range
  (so zero weights get the smallest power and sign 0)."""
  lo, hi = shift_range(weight_bits)
  mag = jnp.abs(w)
  shift = jnp.where(mag > 0, jnp.round(jnp.log2(jnp.where(mag > 0, mag, 1.0))), lo)
  return jnp.clip(shift, lo, hi), jnp.sign(w)


def fixed_point(x, integer_bits: int = 16, fraction_bits: int = 16):
  """floor(x 2^f) / 2^f clipped to [-2^(i-1), 2^(i-1) - 1] (DeepShift's `round_to_fixed`);
  backward: identity."""
  delta = 2.0 ** -fraction_bits
  bound = 2.0 ** (integer_bits - 1)
  return _ste(jnp.clip(jnp.floor(x / delta) * delta, -bound, bound - 1), x)


# ---------------------------------------------------------------------------------------------
# Mixture of experts: top-1 routing and the latency-aware load-balancing loss.

def cv_squared(x):
  """Squared coefficient of variation var(x) / mean(x)^2 (unbiased variance, as torch's)."""
  return jnp.var(x, ddof=1) / (jnp.mean(x) ** 2 + 1e-10)


def balance_loss(logits, alpha, *, noise_std: float | None = None):
  """The latency-aware load-balancing loss of top-1 routing over E experts:

    importance_i = alpha_i sum_x softmax(logits(x))_i
    load_i       = alpha_i sum_x P(x, i),  P(x, i) = Phi((l_i(x) - max_{j != i} l_j(x)) / sigma)
    loss         = cv^2(importance) + cv^2(load)

  alpha: the experts' relative latencies (the official (6, 4) for multiply and shift), so that at
  balance a faster expert receives more tokens. P is the smooth load of noisy top-k gating
  (Shazeer et al., 2017; official `NoisyGate_V2`, sigma = 1/E) at the clean logits, the ones the
  router routes with. logits: (T, E) over the batch's tokens.
  """
  e = logits.shape[-1]
  sigma = 1.0 / e if noise_std is None else noise_std
  alpha = jnp.asarray(alpha, logits.dtype)
  importance = alpha * jnp.sum(jax.nn.softmax(logits, axis=-1), axis=0)
  others = jnp.where(jnp.eye(e, dtype=bool), -jnp.inf, logits[:, None, :])  # (T, E, E)
  p = jax.scipy.stats.norm.cdf((logits - jnp.max(others, axis=-1)) / sigma)
  load = alpha * jnp.sum(p, axis=0)
  return cv_squared(importance) + cv_squared(load)
