"""Spectral gating (GFNet / SpectFormer) vs an explicit circular convolution, forward and grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.spectral_mixers import SpectralGating
from vitjax.ops import spectral
from tests.mixer_checks import tiny_vit_block_grads

TOL = dict(rtol=1e-4, atol=1e-5)


def _bilinear_loops(x, size):
  """align_corners=True bilinear resize of the two leading axes, written with loops."""
  a, b = x.shape[:2]
  out = np.zeros((size[0], size[1]) + x.shape[2:], np.float64)
  for i in range(size[0]):
    r = i * (a - 1) / (size[0] - 1) if size[0] > 1 else 0.0
    r0 = min(int(np.floor(r)), a - 1)
    r1, fr = min(r0 + 1, a - 1), r - r0
    for j in range(size[1]):
      c = j * (b - 1) / (size[1] - 1) if size[1] > 1 else 0.0
      c0 = min(int(np.floor(c)), b - 1)
      c1, fc = min(c0 + 1, b - 1), c - c0
      out[i, j] = ((1 - fr) * (1 - fc) * x[r0, c0] + (1 - fr) * fc * x[r0, c1]
                   + fr * (1 - fc) * x[r1, c0] + fr * fc * x[r1, c1])
  return out


def _circular_conv(x, k):
  """y[b, p, c] = sum_q k[(p - q) mod grid, c] x[b, q, c], by an explicit circulant matrix."""
  _, h, w, _ = x.shape
  py, px, qy, qx = np.meshgrid(np.arange(h), np.arange(w), np.arange(h), np.arange(w),
                               indexing="ij")
  circ = k[(py - qy) % h, (px - qx) % w]                             # (h, w, h, w, C)
  return jnp.einsum("pxqyc,bqyc->bpxc", circ, x)


@pytest.mark.parametrize("src,dst", [((4, 3), (7, 5)), ((6, 5), (3, 2)), ((5, 4), (5, 4))])
def test_resize_bilinear_matches_loops(src, dst):
  x = np.random.default_rng(0).normal(size=src + (3, 2)).astype(np.float32)
  np.testing.assert_allclose(spectral.resize_bilinear(jnp.asarray(x), dst), _bilinear_loops(x, dst),
                             **TOL)


def test_resize_bilinear_reproduces_affine_functions():
  # Bilinear interpolation with aligned corners is exact on functions affine in the coordinates.
  f = lambda u, v: 0.5 + 2.0 * u - 3.0 * v  # noqa: E731  (u, v in [0, 1])
  src = f(*np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 3), indexing="ij"))
  dst = f(*np.meshgrid(np.linspace(0, 1, 9), np.linspace(0, 1, 6), indexing="ij"))
  np.testing.assert_allclose(spectral.resize_bilinear(jnp.asarray(src), (9, 6)), dst, **TOL)


@pytest.mark.parametrize("grid", [(5, 6), (4, 7)])  # even w has a Nyquist column, odd w has none
def test_spectral_gating_is_circular_convolution_forward_and_grad(grid):
  rng = np.random.default_rng(1)
  h, w = grid
  x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(h, w // 2 + 1, 3, 2)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)

  def ours(x, weight):
    return spectral.spectral_gating(x, spectral.filter_for_grid(weight, grid))

  def reference(x, weight):
    filt = weight[..., 0] + 1j * weight[..., 1]
    k = jnp.fft.irfft2(filt, s=grid, axes=(0, 1))                    # the spatial kernel
    return _circular_conv(x, k)

  np.testing.assert_allclose(ours(x, weight), reference(x, weight), **TOL)
  loss = lambda f: lambda x, weight: jnp.sum(r * f(x, weight))  # noqa: E731
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, weight)
  g_ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(x, weight)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, **TOL)


def test_all_ones_filter_is_identity():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 6, 4)), jnp.float32)
  ones = jnp.ones((5, 4, 4), jnp.complex64)
  np.testing.assert_allclose(spectral.spectral_gating(x, ones), x, **TOL)


def test_spectral_gating_rejects_mismatched_filter():
  with pytest.raises(ValueError, match="filter shape"):
    spectral.spectral_gating(jnp.zeros((1, 4, 4, 2)), jnp.ones((4, 4, 2), jnp.complex64))


def test_mixer_passes_prefix_and_interpolates_filter_on_new_grid():
  rng = np.random.default_rng(3)
  mixer = SpectralGating()
  x = jnp.asarray(rng.normal(size=(2, 1 + 4 * 4, 6)), jnp.float32)
  params = mixer.init(jax.random.PRNGKey(0), x, grid=(4, 4), num_prefix=1)["params"]
  weight = params["complex_weight"]
  assert weight.shape == (4, 3, 6, 2)                                # created for the init grid
  # On a 6x5 grid the (4, 3) filter is resized to (6, 3), bilinearly with aligned corners.
  x2 = jnp.asarray(rng.normal(size=(2, 1 + 6 * 5, 6)), jnp.float32)
  y2 = mixer.apply({"params": params}, x2, grid=(6, 5), num_prefix=1)
  np.testing.assert_allclose(y2[:, :1], x2[:, :1])                   # CLS passed through
  w6 = _bilinear_loops(np.asarray(weight), (6, 3))
  filt = jnp.asarray(w6[..., 0] + 1j * w6[..., 1], jnp.complex64)
  kernel = jnp.fft.irfft2(filt, s=(6, 5), axes=(0, 1))
  expect = _circular_conv(x2[:, 1:].reshape(2, 6, 5, 6), kernel)
  np.testing.assert_allclose(y2[:, 1:], expect.reshape(2, 30, 6), **TOL)


def test_mixer_rejects_tokens_that_do_not_fit_the_grid():
  with pytest.raises(ValueError, match="do not fit grid"):
    SpectralGating().init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 4)), grid=(3, 3), num_prefix=0)


def test_registered_and_trains_in_tiny_vit():
  # Mean pooling so the loss reaches the mixer: the CLS token of the default 'tok' pool never
  # reads the patches through a grid mixer (see vitjax.models.spectral_mixers).
  block = tiny_vit_block_grads("spectral_gating", pool="gap")
  assert float(jnp.abs(block["mixer"]["complex_weight"]).max()) > 0
