"""Tests for vitjax.ops.toeplitz: FFT Toeplitz / BTTB products against explicit matrices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.ops import toeplitz


def loop_toeplitz_index(n):
  """Index of c_{j-i} in a (2n - 1) table, written as a double loop."""
  idx = np.zeros((n, n), np.int32)
  for i in range(n):
    for j in range(n):
      idx[i, j] = (j - i) + (n - 1)
  return idx


def loop_bttb_index(h, w):
  """Flat index of offset (r_j - r_i, c_j - c_i) in a (2h - 1, 2w - 1) table, row-major tokens."""
  idx = np.zeros((h * w, h * w), np.int32)
  for i in range(h * w):
    for j in range(h * w):
      dr = j // w - i // w
      dc = j % w - i % w
      idx[i, j] = (dr + h - 1) * (2 * w - 1) + (dc + w - 1)
  return idx


def rand(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def value_and_probe_grad(f, probe, args):
  """f(*args) and the gradient of the random linear functional sum(probe * f) (one compile)."""
  def run(args):
    out, vjp = jax.vjp(lambda a: f(*a), args)
    return out, vjp(probe)[0]
  return jax.jit(run)(args)


def assert_same_value_and_grad(fast, dense, probe, args, tol=1e-5):
  out_fast, g_fast = value_and_probe_grad(fast, probe, args)
  out_dense, g_dense = value_and_probe_grad(dense, probe, args)
  np.testing.assert_allclose(out_fast, out_dense, rtol=tol, atol=tol)
  for a, b in zip(g_fast, g_dense):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_offset_indices_match_loops():
  np.testing.assert_array_equal(toeplitz.offset_index_1d(5), loop_toeplitz_index(5))
  np.testing.assert_array_equal(toeplitz.offset_index_2d(3, 4), loop_bttb_index(3, 4))


def test_dense_builders_match_loops():
  c1 = rand(0, (2, 9))                                   # two tables, n = 5
  np.testing.assert_array_equal(toeplitz.toeplitz_matrix(c1), c1[:, loop_toeplitz_index(5)])
  c2 = rand(1, (2, 5, 7))                                # h = 3, w = 4
  flat = c2.reshape(2, -1)
  np.testing.assert_array_equal(toeplitz.bttb_matrix(c2), flat[:, loop_bttb_index(3, 4)])


@pytest.mark.parametrize("n,size", [(1, None), (7, None), (8, 40)])
def test_toeplitz_matvec_matches_dense(n, size):
  # Tables per head broadcast over batch and channels, tokens last: c (H, 1, 2n-1), u (B, H, C, n).
  c = rand(2, (3, 1, 2 * n - 1))
  u = rand(3, (2, 3, 4, n))
  probe = rand(4, (2, 3, 4, n))
  idx = loop_toeplitz_index(n)

  def dense(c, u):
    t = c[..., idx]                                      # (H, 1, n, n), t[i, j] = c_{j-i}
    return jnp.einsum("hcij,bhcj->bhci", t, u)

  fast = lambda c, u: toeplitz.toeplitz_matvec(c, u, size=size)  # noqa: E731
  assert_same_value_and_grad(fast, dense, probe, (c, u))


@pytest.mark.parametrize("h,w", [(3, 5), (1, 3)])
def test_bttb_matvec_matches_dense(h, w):
  c = rand(5, (2, 1, 2 * h - 1, 2 * w - 1))
  u = rand(6, (3, 2, 2, h, w))
  probe = rand(7, (3, 2, 2, h, w))
  idx = loop_bttb_index(h, w)

  def dense(c, u):
    t = c.reshape(c.shape[:-2] + (-1,))[..., idx]      # (2, 1, hw, hw)
    y = jnp.einsum("hcij,bhcj->bhci", t, u.reshape(u.shape[:-2] + (h * w,)))
    return y.reshape(u.shape)

  assert_same_value_and_grad(toeplitz.bttb_matvec, dense, probe, (c, u))


def _smooth(x):
  for p in (2, 3, 5):
    while x % p == 0:
      x //= p
  return x == 1


def test_fft_size_is_the_smallest_5_smooth_cover():
  for n, want in ((1, 1), (2, 3), (4, 8), (14, 27), (1024, 2048), (16384, 32768)):
    assert toeplitz.fft_size(n) == want
  for n in range(1, 300):
    size = toeplitz.fft_size(n)
    assert size >= 2 * n - 1 and _smooth(size)
    assert not any(_smooth(s) for s in range(2 * n - 1, size))


def test_with_prefix_fills_rows_and_columns():
  mat = rand(8, (2, 3, 3))
  out = toeplitz.with_prefix(mat, jnp.array([5.0, 7.0]), 2)
  assert out.shape == (2, 5, 5)
  np.testing.assert_array_equal(out[:, 2:, 2:], mat)
  for h, val in enumerate((5.0, 7.0)):
    np.testing.assert_array_equal(out[h, :2, :], val)
    np.testing.assert_array_equal(out[h, :, :2], val)
  np.testing.assert_array_equal(toeplitz.with_prefix(mat, 1.0, 0), mat)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="2n - 1"):
    toeplitz.toeplitz_matvec(jnp.ones((8,)), jnp.ones((5,)))
  with pytest.raises(ValueError, match="size"):
    toeplitz.toeplitz_matvec(jnp.ones((9,)), jnp.ones((5,)), size=8)
  with pytest.raises(ValueError, match="2h - 1"):
    toeplitz.bttb_matvec(jnp.ones((5, 5)), jnp.ones((3, 4)))
