"""RPE-2D (Hou, Liu et al., 2025): 2-D positions drawn at random from an enlarged range in
training, so that a larger grid at inference asks for positions the model has seen.

For an h x w grid and a range of L_h x L_w positions (L >= the largest grid side to be used):
  training  - rows: h distinct integers drawn uniformly from {0, ..., L_h - 1}, sorted (columns
              likewise, independently); token (i, j) sits at (row_i, col_j). The model can rely
              on the order of positions, not their spacing.
  inference - rows at the mean of those draws: the i-th smallest of h distinct draws from
              {0, ..., L-1} has expectation (i + 1)(L + 1)/(h + 1) - 1 (i = 0..h-1), so
              `eval_positions(h, L)` = (i + 1)(L + 1)/(h + 1) - 1: evenly spaced by (L+1)/(h+1),
              with equal margins at both ends; at h = L they are 0, 1, ..., L-1 (the plain grid).
The positions feed the 2-D sin-cos table of `layers.posemb_sincos_2d`, generalised to real
coordinates (`sincos_2d`), or 2-D RoPE (`vitjax.ops.group_pe.rope2d`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_range(length, grid, field: str = "posemb_kwargs.range") -> tuple[int, int]:
  """(L_h, L_w) from an int or a pair, checked against the grid (h, w): one clear error."""
  pair = (length, length) if np.ndim(length) == 0 else tuple(length)
  if len(pair) != 2 or any(int(x) != x or x < 1 for x in pair):
    raise ValueError(f"{field}={length!r}: allowed values are a positive int or a pair of them "
                     "(positions per axis, rows then columns)")
  pair = (int(pair[0]), int(pair[1]))
  if grid[0] > pair[0] or grid[1] > pair[1]:
    raise ValueError(f"{field}={length!r} is smaller than the token grid {tuple(grid)}: RPE-2D "
                     f"places each of the h x w tokens at a distinct position, so it needs range "
                     f">= ({grid[0]}, {grid[1]}); raise {field}")
  return pair


def sample_positions(key, batch: int, n: int, length: int):
  """(batch, n) int32: per example, n distinct positions of {0..length-1}, drawn uniformly
  (all n-subsets equally likely) and sorted ascending."""
  noise = jax.random.uniform(key, (batch, length))
  return jnp.sort(jax.lax.top_k(noise, n)[1], axis=-1).astype(jnp.int32)


def eval_positions(n: int, length: int) -> np.ndarray:
  """(n,) float32 positions (i + 1)(L + 1)/(n + 1) - 1: the mean of `sample_positions`' i-th."""
  return ((np.arange(1, n + 1) * (length + 1)) / (n + 1) - 1).astype(np.float32)


def grid_coords(rows, cols):
  """rows (..., h), cols (..., w) -> (..., h*w, 2) (row, col) of a raster-ordered grid."""
  rows, cols = jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)
  h, w = rows.shape[-1], cols.shape[-1]
  lead = jnp.broadcast_shapes(rows.shape[:-1], cols.shape[:-1])
  r = jnp.broadcast_to(rows[..., :, None], lead + (h, w))
  c = jnp.broadcast_to(cols[..., None, :], lead + (h, w))
  return jnp.stack([r, c], -1).reshape(lead + (h * w, 2))


def sincos_2d(coords, dim: int, temperature: float = 10_000.0):
  """The 2-D sin-cos embedding at real (row, col) coordinates (..., 2) -> (..., dim), with the
  channel layout of `layers.posemb_sincos_2d`: [sin(x w), cos(x w), sin(y w), cos(y w)] for the
  column x, the row y and the dim/4 frequencies w_k = temperature^(-k / (dim/4))."""
  if dim % 4:
    raise ValueError(f"posemb='rpe2d' with kind='sincos' needs a width divisible by 4, got "
                     f"width={dim}")
  omega = jnp.asarray(temperature ** -(np.arange(dim // 4) / (dim // 4)), jnp.float32)
  coords = jnp.asarray(coords, jnp.float32)
  ang_x = coords[..., 1:2] * omega
  ang_y = coords[..., 0:1] * omega
  return jnp.concatenate([jnp.sin(ang_x), jnp.cos(ang_x), jnp.sin(ang_y), jnp.cos(ang_y)], -1)
