"""Dynamic Token Normalization (Shao et al., ICLR 2022, "Dynamic Token Normalization Improves
Vision Transformers") as pure functions over arrays.

For tokens X (B, T, C) on an h x w grid, split into H heads of C/H channels (as the official
`DTN` of wqshao126/DTN, models/normkit/norms/dtn.py, computes it):

  0. head-wise RMS pre-normalisation:  X_h <- X_h / sqrt(mean_c(X_h^2) + eps)
  1. LayerNorm statistics over the C channels of each token:
       mu_LN = mean_c X,  sigma2_LN = sum_c (X - mu_LN)^2 / (C - ddof)    (ddof = 1 officially:
       torch's `Tensor.var` default, the unbiased estimate)
  2. position-aware instance statistics of head h at token j, over the tokens i:
       mu_IN^h = X_h P^h,  sigma2_IN^h = (X_h * X_h) P^h - (mu_IN^h)^2,
       P^h[i, j] = softmax_i(w_h . [dx, dy, dx^2 + dy^2] + b_h),  (dx, dy) = pos_j - pos_i
     (w, b: a Linear 3 -> H, `pos_proj`; pos = (column, row) on the grid)
  3. per-head mixing with lambda_h = sigmoid(lambda_mean_h), lambda'_h = sigmoid(lambda_var_h):
       mu = lambda mu_LN + (1 - lambda) mu_IN,  sigma2 = lambda' sigma2_LN + (1 - lambda') sigma2_IN
  4. y = gamma (X - mu) / sqrt(sigma2 + eps) + beta.
With lambda = lambda' = 1 this is LayerNorm of the RMS-prenormalised tokens (with one head and
ddof = 0, LayerNorm itself up to eps). `only_var` (the official 'dtn_var') takes mu = mu_LN.

Large grids: when the longer side exceeds `pool_size` (14 officially), step 2 runs on the grid
average-pooled by p = side // pool_size (the official `DTN(resolution=...)`, 'dtn_pool': 56 ->
14 x 14 cells), with the squares taken of the pooled values, and each cell's statistics are
copied back to its p x p tokens (nearest upsampling). The official code fixes the grid at
construction and handles square grids whose side is at most 14 or a multiple of 14; here the
grid is the input's, rectangular grids work, and a p that does not divide both sides is an error.

Beyond the official code (which normalises patch tokens only: its ViT* models prepend the class
token after the DTN blocks): prefix tokens (a class token) have no position and are normalised
with the LN statistics alone (lambda = lambda' = 1) and take no part in the instance statistics;
with a token `mask` (B, T) (a reducer dropping by masking) the dropped tokens take no part in
them either (they leave the softmax over i; a pooled cell averages its kept tokens only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def head_rms_normalize(x, num_heads: int, eps: float):
  """X_h / sqrt(mean_c X_h^2 + eps) for each head's C/H channels of x (..., C)."""
  shape = x.shape
  xh = x.reshape(*shape[:-1], num_heads, shape[-1] // num_heads)
  xh = xh * jax.lax.rsqrt(jnp.mean(xh * xh, axis=-1, keepdims=True) + eps)
  return xh.reshape(shape)


def relative_features(h: int, w: int) -> np.ndarray:
  """(h*w, h*w, 3) float32: [i, j] = (dx, dy, dx^2 + dy^2), (dx, dy) = pos_j - pos_i, for
  row-major tokens t = row * w + column at pos_t = (column, row)."""
  rows, cols = np.divmod(np.arange(h * w), w)
  dx = cols[None, :] - cols[:, None]
  dy = rows[None, :] - rows[:, None]
  return np.stack([dx, dy, dx * dx + dy * dy], axis=-1).astype(np.float32)


def locality_init(num_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """The official locality initialisation of the 3 -> H position map (ConViT's): for the first
  k*k heads, k = floor(sqrt(H)), head q = a + k*b gets w = (2(b - c), 2(a - c), -1),
  c = (k - 1) / 2, so that P^q peaks at the offset (dx, dy) = (b - c, a - c) with a Gaussian
  fall-off. Returns (kernel (3, H), covered (H,) bool): the values and the heads they apply to
  (the others keep their random init). The official code then scales the whole kernel by its
  `locality_strength` (1)."""
  k = int(num_heads ** 0.5)
  center = (k - 1) / 2
  kernel = np.zeros((3, num_heads), np.float32)
  covered = np.zeros((num_heads,), bool)
  for a in range(k):
    for b in range(k):
      q = a + k * b
      kernel[:, q] = (2 * (b - center), 2 * (a - center), -1.0)
      covered[q] = True
  return kernel, covered


def pool_factor(grid: tuple[int, int], pool_size: int = 14) -> int:
  """p = max(h, w) // pool_size when the longer side exceeds pool_size, else 1; p must divide
  both sides (one clear error naming the sizes otherwise)."""
  h, w = grid
  if pool_size < 1:
    raise ValueError(f"norm 'dtn': pool_size={pool_size}; allowed values are positive integers")
  side = max(h, w)
  p = side // pool_size if side > pool_size else 1
  if h % p or w % p:
    raise ValueError(
        f"norm 'dtn': the {h}x{w} token grid is pooled by p = {side} // pool_size={pool_size} = "
        f"{p} for its position-aware statistics, which does not divide both sides; allowed: "
        f"grids whose sides p divides (e.g. multiples of {pool_size}), or pool_size >= {side} "
        "(no pooling)")
  return p


def pool_cells(x, grid: tuple[int, int], p: int, mask=None):
  """Averages (B, h*w, C) tokens over p x p cells -> ((B, h/p * w/p, C), valid). With a token
  mask (B, h*w) a cell averages its kept tokens and `valid` (B, cells) says which cells have
  any; without one, valid is None."""
  b, _, c = x.shape
  h, w = grid
  shape = (b, h // p, p, w // p, p)
  if mask is None:
    if p == 1:
      return x, None
    return x.reshape(*shape, c).mean(axis=(2, 4)).reshape(b, -1, c), None
  m = mask.astype(x.dtype).reshape(*shape, 1)
  total = m.sum(axis=(2, 4))                                           # (B, h/p, w/p, 1)
  cells = (x.reshape(*shape, c) * m).sum(axis=(2, 4)) / jnp.maximum(total, 1.0)
  return cells.reshape(b, -1, c), (total[..., 0] > 0).reshape(b, -1)


def upsample_cells(s, grid: tuple[int, int], p: int):
  """(B, h/p * w/p, C) cell values -> (B, h*w, C), each cell's value on its p x p tokens."""
  if p == 1:
    return s
  b, _, c = s.shape
  h, w = grid
  s = s.reshape(b, h // p, 1, w // p, 1, c)
  return jnp.broadcast_to(s, (b, h // p, p, w // p, p, c)).reshape(b, h * w, c)


def position_weights(kernel, bias, grid: tuple[int, int], valid=None):
  """P^h[i, j] = softmax over i of kernel . [dx, dy, dx^2 + dy^2] + bias: (H, n, n) for the
  n = h*w tokens of `grid`, or (B, H, n, n) with `valid` (B, n) (invalid i get weight 0)."""
  feats = jnp.asarray(relative_features(*grid), kernel.dtype)            # (n, n, 3)
  scores = jnp.einsum("ijf,fh->hij", feats, kernel) + bias[:, None, None]
  if valid is not None:
    low = jnp.finfo(scores.dtype).min
    scores = jnp.where(valid[:, None, :, None], scores[None], low)
  return jax.nn.softmax(scores, axis=-2)


def instance_stats(cells, weights, num_heads: int):
  """Position-aware instance statistics mu_IN = X_h P^h and sigma2_IN = (X_h * X_h) P^h - mu^2
  of (B, n, C) values with weights (H, n, n) or (B, H, n, n): two (B, n, C) arrays."""
  b, n, c = cells.shape
  xh = cells.reshape(b, n, num_heads, c // num_heads)
  spec = "bihd,hij->bjhd" if weights.ndim == 3 else "bihd,bhij->bjhd"
  mean = jnp.einsum(spec, xh, weights)
  mean2 = jnp.einsum(spec, xh * xh, weights)
  return mean.reshape(b, n, c), (mean2 - mean * mean).reshape(b, n, c)


def _per_channel(logit, c: int):
  """sigmoid of a per-head logit (H,), repeated over each head's C/H channels -> (C,)."""
  return jnp.repeat(jax.nn.sigmoid(logit), c // logit.shape[0])


def dtn(x, scale, bias, lambda_mean, lambda_var, pos_kernel, pos_bias, *,
        grid: tuple[int, int], num_heads: int, num_prefix: int = 0, eps: float = 1e-5,
        pool_size: int = 14, ddof: int = 1, mask=None):
  """Dynamic Token Normalization of x (B, num_prefix + h*w, C) (module docstring).

  scale, bias: gamma, beta (C,); lambda_mean, lambda_var: the mixing logits (H,) before the
  sigmoid (lambda_mean None: mu = mu_LN, the official `only_var`); pos_kernel (3, H), pos_bias
  (H,): the position map; grid (h, w) of the patch tokens, which follow `num_prefix` prefix
  tokens; mask (B, T) bool: the tokens in play (None: all).
  """
  b, t, c = x.shape
  h, w = grid
  if t != num_prefix + h * w:
    raise ValueError(f"norm 'dtn': {t} tokens do not make {num_prefix} prefix token(s) and a "
                     f"{h}x{w} grid")
  if c % num_heads:
    raise ValueError(f"norm 'dtn': num_heads={num_heads} must divide the width {c}")
  if ddof >= c:
    raise ValueError(f"norm 'dtn': ddof={ddof}; allowed values are 0 or 1, below the width {c}")
  x = head_rms_normalize(x, num_heads, eps)
  mu_ln = jnp.mean(x, axis=-1, keepdims=True)
  var_ln = jnp.sum(jnp.square(x - mu_ln), axis=-1, keepdims=True) / (c - ddof)
  p = pool_factor(grid, pool_size)
  cells, valid = pool_cells(x[:, num_prefix:], grid, p,
                            None if mask is None else mask[:, num_prefix:])
  weights = position_weights(pos_kernel, pos_bias, (h // p, w // p), valid)
  mu_in, var_in = (upsample_cells(s, grid, p) for s in instance_stats(cells, weights, num_heads))

  def mix(logit, ln, inst):                     # prefix tokens keep the LN statistic
    lam = _per_channel(logit, c)
    patches = lam * ln[:, num_prefix:] + (1.0 - lam) * inst
    return jnp.concatenate([jnp.broadcast_to(ln[:, :num_prefix], (b, num_prefix, c)), patches], 1)

  mu = mu_ln if lambda_mean is None else mix(lambda_mean, mu_ln, mu_in)
  var = mix(lambda_var, var_ln, var_in)
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias
