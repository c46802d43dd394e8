"""Reference helpers shared by the relative-position mixer tests (written from the definitions)."""
import jax
import jax.numpy as jnp
import numpy as np


def rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def pair_index(grid, n, num_prefix):
  """(N, N) flat index into the relative table for each token pair, -1 where a prefix token is
  involved; written pair by pair from the definition of the offsets."""
  size = n + num_prefix
  idx = np.full((size, size), -1, np.int64)
  for i in range(num_prefix, size):
    for j in range(num_prefix, size):
      a, b = i - num_prefix, j - num_prefix
      if grid is None:
        idx[i, j] = (b - a) + n - 1
      else:
        h, w = grid
        dr, dc = b // w - a // w, b % w - a % w
        idx[i, j] = (dr + h - 1) * (2 * w - 1) + (dc + w - 1)
  return idx
