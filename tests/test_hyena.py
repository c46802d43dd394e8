"""Hyena N-D: FFT long convolution against direct convolution, the recurrence, and the mixer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.spectral_mixers import HyenaND
from vitjax.ops import hyena
from tests.mixer_checks import tiny_vit_block_grads

TOL = dict(rtol=1e-4, atol=1e-4)


def _toeplitz_conv(u, k):
  """y[b, p, c] = sum_q k[p - q + (h-1, w-1), c] u[b, q, c] with an explicit (h, w, h, w) matrix."""
  _, h, w, _ = u.shape
  py, px, qy, qx = np.meshgrid(np.arange(h), np.arange(w), np.arange(h), np.arange(w),
                               indexing="ij")
  toeplitz = k[py - qy + h - 1, px - qx + w - 1]                     # (h, w, h, w, C)
  return jnp.einsum("pxqyc,bqyc->bpxc", toeplitz, u)


def _lax_conv(u, k):
  """The same linear convolution as a grouped lax convolution of the zero-padded input."""
  _, h, w, c = u.shape
  rhs = k[::-1, ::-1][:, :, None, :]                                 # flip: conv, not correlation
  return jax.lax.conv_general_dilated(
      u, rhs, (1, 1), ((h - 1, h - 1), (w - 1, w - 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def _data(grid, c=3, seed=0):
  rng = np.random.default_rng(seed)
  h, w = grid
  u = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2 * h - 1, 2 * w - 1, c)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
  return u, k, r


@pytest.mark.parametrize("grid", [(4, 5), (3, 3)])
@pytest.mark.parametrize("impl", ["fft", "direct"])
def test_long_conv_matches_direct_convolution_forward_and_grad(grid, impl):
  u, k, r = _data(grid)
  ours = lambda u, k: hyena.long_conv2d(u, k, impl=impl)  # noqa: E731
  np.testing.assert_allclose(ours(u, k), _lax_conv(u, k), **TOL)
  np.testing.assert_allclose(ours(u, k), _toeplitz_conv(u, k), **TOL)
  loss = lambda f: lambda u, k: jnp.sum(r * f(u, k))  # noqa: E731
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(u, k)
  g_ref = jax.jit(jax.grad(loss(_toeplitz_conv), argnums=(0, 1)))(u, k)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, **TOL)


def test_long_conv_is_linear_not_circular():
  # An impulse in the top row and a filter that only moves mass one row up: the result leaves the
  # grid. A circular convolution would wrap it to the bottom row instead.
  h, w = 4, 4
  u = jnp.zeros((1, h, w, 1)).at[0, 0, 2, 0].set(1.0)
  k = jnp.zeros((2 * h - 1, 2 * w - 1, 1)).at[h - 1 - 1, w - 1, 0].set(1.0)  # offset (-1, 0)
  np.testing.assert_allclose(hyena.long_conv2d_fft(u, k), jnp.zeros_like(u), atol=1e-6)
  # The opposite offset moves the impulse one row down, inside the grid.
  k = jnp.zeros_like(k).at[h - 1 + 1, w - 1, 0].set(1.0)
  np.testing.assert_allclose(hyena.long_conv2d_fft(u, k), jnp.zeros_like(u).at[0, 1, 2, 0].set(1.0),
                             atol=1e-6)


def test_hyena_recurrence_matches_plain_loop_forward_and_grad():
  rng = np.random.default_rng(1)
  n, (h, w), c = 3, (3, 4), 2
  v = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
  gates = jnp.asarray(rng.normal(size=(n, 2, h, w, c)), jnp.float32)
  filters = jnp.asarray(rng.normal(size=(n, 2 * h - 1, 2 * w - 1, c)), jnp.float32)
  skips = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)

  def reference(v, gates, filters, skips):
    z = v
    for i in range(n):
      z = gates[i] * (_toeplitz_conv(z, filters[i]) + skips[i] * z)
    return z

  args = (v, gates, filters, skips)
  np.testing.assert_allclose(hyena.hyena_recurrence(*args), reference(*args), **TOL)
  grad = lambda f: jax.jit(  # noqa: E731
      jax.grad(lambda *a: jnp.sum(r * f(*a)), argnums=(0, 1, 2, 3)))
  g_ours, g_ref = grad(hyena.hyena_recurrence)(*args), grad(reference)(*args)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, **TOL)


def test_filter_features_and_window():
  coords = hyena.offset_coords((3, 5))
  assert coords.shape == (5, 9, 2)
  np.testing.assert_allclose(coords[2, 4], [0.0, 0.0])              # centre = offset (0, 0)
  np.testing.assert_allclose(coords[0, 0], [-1.0, -1.0])
  feats = hyena.offset_features(coords, num_bands=3)
  assert feats.shape == (5, 9, 2 + 4 * 3)
  np.testing.assert_allclose(feats[..., 2], jnp.sin(jnp.pi * coords[..., 0]), atol=1e-6)
  rates = hyena.decay_rates(4)
  np.testing.assert_allclose([rates[0], rates[-1]], [np.log(100) / 1.5, np.log(100) / 0.3],
                             rtol=1e-5)
  win = hyena.exponential_window(coords, rates)
  np.testing.assert_allclose(win[2, 4], jnp.ones(4))                 # no decay at offset 0
  np.testing.assert_allclose(win[2, 8], jnp.exp(-rates * 1.0), rtol=1e-6)  # |o| = 1


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="long-conv filter shape"):
    hyena.long_conv2d_fft(jnp.zeros((1, 3, 3, 2)), jnp.zeros((3, 3, 2)))
  with pytest.raises(ValueError, match="impl='nope'"):
    hyena.long_conv2d(jnp.zeros((1, 3, 3, 2)), jnp.zeros((5, 5, 2)), impl="nope")
  with pytest.raises(ValueError, match="conv_impl"):
    HyenaND(conv_impl="nope").init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 4)), grid=(3, 3))


def test_mixer_impls_agree_prefix_passes_and_grid_changes():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 1 + 3 * 4, 8)), jnp.float32)
  mixer = HyenaND(order=2, filter_width=16, num_bands=2)
  params = jax.jit(functools.partial(mixer.init, grid=(3, 4), num_prefix=1))(
      jax.random.PRNGKey(0), x)["params"]
  apply = lambda m, grid, num_prefix: jax.jit(functools.partial(  # noqa: E731
      m.apply, grid=grid, num_prefix=num_prefix))
  y_fft = apply(mixer, (3, 4), 1)({"params": params}, x)
  y_dir = apply(HyenaND(order=2, filter_width=16, num_bands=2, conv_impl="direct"), (3, 4), 1)(
      {"params": params}, x)
  np.testing.assert_allclose(y_fft, y_dir, **TOL)
  np.testing.assert_allclose(y_fft[:, :1], x[:, :1])                 # CLS passed through
  # Implicit filters are evaluated on any grid with the same parameters.
  x2 = jnp.asarray(rng.normal(size=(2, 5 * 2, 8)), jnp.float32)
  y2 = apply(mixer, (5, 2), 0)({"params": params}, x2)
  assert y2.shape == x2.shape and bool(jnp.all(jnp.isfinite(y2)))


def test_registered_and_trains_in_tiny_vit():
  # Mean pooling so the loss reaches the mixer: the CLS token of the default 'tok' pool never
  # reads the patches through a grid mixer (see vitjax.models.spectral_mixers).
  block = tiny_vit_block_grads("hyena_nd", pool="gap")
  assert float(jnp.abs(block["mixer"]["filter_out"]["kernel"]).max()) > 0
