"""Toeplitz and block-Toeplitz-Toeplitz-block (BTTB) products, fast (FFT) and dense.

A relative-position matrix assigns pair (i, j) a coefficient that depends only on the offset
j - i. On a 1-D sequence of n tokens that is a Toeplitz matrix T_ij = c_{j-i}, given by the
2n - 1 numbers c_{-(n-1)} .. c_{n-1}; on an h x w grid of patch tokens (row-major order) the
offset is (dr, dc) and the matrix is block-Toeplitz with Toeplitz blocks (BTTB), given by a
(2h - 1) x (2w - 1) table. Luo et al., "Stable, Fast and Accurate: Kernelized Attention with
Relative Positional Encoding" (NeurIPS 2021) apply such matrices to many channels at once in
O(n log n): the Toeplitz matrix is the top-left n x n block of a circulant matrix of size
L >= 2n - 1, and a circulant product is a pointwise product in the Fourier domain.

Table layout used throughout: offsets are the LAST axis (or last two), index `offset + n - 1`,
so `c[..., n - 1]` is the diagonal coefficient c_0; leading axes broadcast (e.g. heads).
Token axes of the vectors are LAST as well, because XLA's FFT transforms the minor axes and
any other layout would cost a transpose of the largest tensor.

`toeplitz_matrix` / `bttb_matrix` build the explicit dense matrices: the O(n^2) oracle for
tests, and what the quadratic mixers (URPE, GMM mask) use directly.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def fft_size(n: int) -> int:
  """Smallest 5-smooth number (2^a 3^b 5^c) >= 2n - 1: the circulant size embedding n x n.

  FFT libraries (ducc on CPU, cuFFT, the TPU FFT) are fastest on such lengths; allowing factors
  3 and 5 rather than only powers of two keeps small grids tight (a 14 x 14 ViT grid needs
  27 x 27, where a power of two would take 32 x 32: 40% more points in 2-D).
  """
  size = max(2 * n - 1, 1)
  while True:
    rest = size
    for p in (2, 3, 5):
      while rest % p == 0:
        rest //= p
    if rest == 1:
      return size
    size += 1


def offset_index_1d(n: int) -> np.ndarray:
  """(n, n) int index into a (2n - 1) table: idx[i, j] = j - i + n - 1."""
  pos = np.arange(n)
  return pos[None, :] - pos[:, None] + n - 1


def offset_index_2d(h: int, w: int) -> np.ndarray:
  """(h*w, h*w) int index into a flattened (2h - 1, 2w - 1) table (Swin's bias-table index).

  Tokens are row-major: token t sits at (t // w, t % w). Pair (i, j) reads the entry of offset
  (dr, dc) = (r_j - r_i, c_j - c_i), i.e. flat index (dr + h - 1) * (2w - 1) + dc + w - 1.
  """
  rows, cols = np.divmod(np.arange(h * w), w)
  dr = rows[None, :] - rows[:, None] + h - 1
  dc = cols[None, :] - cols[:, None] + w - 1
  return dr * (2 * w - 1) + dc


def toeplitz_matrix(c):
  """Dense Toeplitz matrices from offset tables: (..., 2n - 1) -> (..., n, n), T_ij = c_{j-i}."""
  n = (c.shape[-1] + 1) // 2
  if c.shape[-1] != 2 * n - 1:
    raise ValueError(f"a Toeplitz table has odd length 2n - 1, got {c.shape[-1]}")
  return c[..., offset_index_1d(n)]


def bttb_matrix(c):
  """Dense BTTB matrices: (..., 2h - 1, 2w - 1) -> (..., h*w, h*w), T_ij = c[dr_ij, dc_ij]."""
  h, w = (c.shape[-2] + 1) // 2, (c.shape[-1] + 1) // 2
  if c.shape[-2:] != (2 * h - 1, 2 * w - 1):
    raise ValueError(f"a BTTB table has odd sides (2h - 1, 2w - 1), got {c.shape[-2:]}")
  flat = c.reshape(c.shape[:-2] + ((2 * h - 1) * (2 * w - 1),))
  return flat[..., offset_index_2d(h, w)]


def with_prefix(mat, prefix_value, num_prefix: int):
  """Adds `num_prefix` leading rows and columns (CLS-like tokens) filled with `prefix_value`.

  Args:
    mat: (..., n, n) pairwise matrix over the patch tokens.
    prefix_value: scalar or array broadcastable to mat's leading axes `...` (e.g. one value
      per head): the coefficient of every pair that involves a prefix token.
    num_prefix: P >= 0.

  Returns:
    (..., P + n, P + n) with the patch block in the bottom-right corner.
  """
  if num_prefix == 0:
    return mat
  n = mat.shape[-1]
  big = jnp.broadcast_to(jnp.asarray(prefix_value, mat.dtype)[..., None, None],
                         mat.shape[:-2] + (num_prefix + n, num_prefix + n))
  return big.at[..., num_prefix:, num_prefix:].set(mat)


def _circulant_column(c, n: int, size: int, axis: int):
  """First column g of the size-`size` circulant whose top-left n x n block is Toeplitz(c).

  The product y_i = sum_j c_{j-i} u_j is the circular convolution y_i = sum_j g[(i-j) % L] u_j
  with g[k] = c_{-k} for 0 <= k < n and g[L-k] = c_k for 0 < k < n, zeros in between. In table
  indices (c_k at k + n - 1): g = [c[n-1], ..., c[0], 0, ..., 0, c[2n-2], ..., c[n]].
  """
  c = jnp.moveaxis(c, axis, -1)
  head = jnp.flip(c[..., :n], axis=-1)          # c_0, c_{-1}, ..., c_{-(n-1)}
  tail = jnp.flip(c[..., n:], axis=-1)          # c_{n-1}, ..., c_1
  zeros = jnp.zeros(c.shape[:-1] + (size - 2 * n + 1,), c.dtype)
  return jnp.moveaxis(jnp.concatenate([head, zeros, tail], axis=-1), -1, axis)


def toeplitz_matvec(c, u, *, size: int | None = None):
  """y = T u along the last axis via circulant embedding and real FFTs, O(n log n).

  Args:
    c: (..., 2n - 1) real offset table (c_k at index k + n - 1); leading axes broadcast
      against u's leading axes (e.g. (H, 1, 1, 2n - 1) against (B, H, m, e, n)).
    u: (..., n) real vectors, tokens last.
    size: circulant size L >= 2n - 1; default `fft_size(n)`.

  Returns:
    (..., n) with y[..., i] = sum_j c_{j-i} u[..., j].
  """
  n = u.shape[-1]
  if c.shape[-1] != 2 * n - 1:
    raise ValueError(f"toeplitz_matvec: table length {c.shape[-1]} != 2n - 1 = {2 * n - 1}")
  size = fft_size(n) if size is None else size
  if size < 2 * n - 1:
    raise ValueError(f"toeplitz_matvec: size={size} is below 2n - 1 = {2 * n - 1}")
  g_hat = jnp.fft.rfft(_circulant_column(c, n, size, -1), axis=-1)   # (..., L/2 + 1)
  u_hat = jnp.fft.rfft(u, n=size, axis=-1)                           # zero-pads u to L
  return jnp.fft.irfft(g_hat * u_hat, n=size, axis=-1)[..., :n].astype(u.dtype)


def bttb_matvec(c, u, *, size: tuple[int, int] | None = None):
  """y = T u for a BTTB matrix over an h x w grid (last two axes), via 2-D real FFTs.

  The 2-D analogue of `toeplitz_matvec`: the table is embedded per axis into an Lh x Lw
  doubly-circulant kernel and u is zero-padded to the same (about (2h) x (2w)) grid.

  Args:
    c: (..., 2h - 1, 2w - 1) real offset table, c[dr + h - 1, dc + w - 1].
    u: (..., h, w) real grids, row-major token layout unflattened.
    size: (Lh, Lw); default (fft_size(h), fft_size(w)).

  Returns:
    (..., h, w) with y[r, s] = sum_{r', s'} c[r' - r, s' - s] u[r', s'].
  """
  h, w = u.shape[-2:]
  if c.shape[-2:] != (2 * h - 1, 2 * w - 1):
    raise ValueError(
        f"bttb_matvec: table sides {c.shape[-2:]} != (2h - 1, 2w - 1) = {(2 * h - 1, 2 * w - 1)}")
  size = (fft_size(h), fft_size(w)) if size is None else tuple(size)
  if size[0] < 2 * h - 1 or size[1] < 2 * w - 1:
    raise ValueError(f"bttb_matvec: size={size} is below (2h - 1, 2w - 1)")
  g = _circulant_column(_circulant_column(c, h, size[0], -2), w, size[1], -1)
  g_hat = jnp.fft.rfft2(g, axes=(-2, -1))
  u_hat = jnp.fft.rfft2(u, s=size, axes=(-2, -1))
  return jnp.fft.irfft2(g_hat * u_hat, s=size, axes=(-2, -1))[..., :h, :w].astype(u.dtype)
