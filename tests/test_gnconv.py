"""HorNet gnConv (7x7 and GF variants) against a plainly written reference, forward and grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.spectral_mixers import GlobalLocalFilter, GnConv
from vitjax.ops import gnconv
from tests.mixer_checks import tiny_vit_block_grads

TOL = dict(rtol=1e-4, atol=1e-4)


def _layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dwconv_loops(x, kernel, bias=None):
  """'SAME' depthwise correlation as a sum of k*k shifted copies of the zero-padded input."""
  _, h, w, _ = x.shape
  k = kernel.shape[0]
  r = k // 2
  xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j] for i in range(k) for j in range(k))
  return y if bias is None else y + bias


def _circular_conv(x, k):
  _, h, w, _ = x.shape
  py, px, qy, qx = np.meshgrid(np.arange(h), np.arange(w), np.arange(h), np.arange(w),
                               indexing="ij")
  return jnp.einsum("pxqyc,bqyc->bpxc", k[(py - qy) % h, (px - qx) % w], x)


def _interp_matrix(n_in, n_out):
  """Linear interpolation with aligned end points, one row per output sample (loops)."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    pos = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    lo = min(int(np.floor(pos)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    m[i, lo] += 1 - (pos - lo)
    m[i, hi] += pos - lo
  return m


def _global_filter(x, weight):
  """irfft2(rfft2(x) * W) as a circular convolution with the spatial kernel irfft2(W)."""
  _, h, w, _ = x.shape
  rows, cols = _interp_matrix(weight.shape[0], h), _interp_matrix(weight.shape[1], w // 2 + 1)
  weight = jnp.einsum("ia,jb,abcz->ijcz", rows, cols, weight)        # resized to the grid
  kernel = jnp.fft.irfft2(weight[..., 0] + 1j * weight[..., 1], s=(h, w), axes=(0, 1))
  return _circular_conv(x, kernel)


def _reference(params, x, order, variant, scale=1.0 / 3.0):
  """HorNet's gnconv written out step by step on a (B, h, w, C) map."""
  c = x.shape[-1]
  dims = [c // 2 ** (order - 1 - i) for i in range(order)]
  dense = lambda p, t: jnp.einsum("bhwi,io->bhwo", t, p["kernel"]) + p["bias"]  # noqa: E731
  fused = dense(params["proj_in"], x)
  p0, q = fused[..., :dims[0]], fused[..., dims[0]:]
  sp = params["dwconv"]
  if variant == "dwconv":
    q = _dwconv_loops(q, sp["kernel"], sp["bias"])
  else:
    q = _layer_norm(q, sp["pre_norm"])
    half = q.shape[-1] // 2
    local = _dwconv_loops(q[..., :half], sp["dw"]["kernel"])
    glob = _global_filter(q[..., half:], sp["complex_weight"])
    q = jnp.zeros_like(q).at[..., 0::2].set(local).at[..., 1::2].set(glob)
    q = _layer_norm(q, sp["post_norm"])
  q = q * scale
  starts = np.cumsum([0] + dims)
  qs = [q[..., starts[i]:starts[i + 1]] for i in range(order)]
  p = p0 * qs[0]
  for i in range(order - 1):
    p = dense(params[f"pws_{i}"], p) * qs[i + 1]
  return dense(params["proj_out"], p)


def _random_params(module, *args, seed, **kwargs):
  """Parameters of module's shapes (from eval_shape, no compile) filled with N(0, 0.3^2) values,
  LayerNorm scales and biases included, so every path of the reference is exercised."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def test_gnconv_dims_and_errors():
  assert gnconv.gnconv_dims(64, 4) == [8, 16, 32, 64]
  assert gnconv.gnconv_dims(12, 1) == [12]
  with pytest.raises(ValueError, match="divisible by 2"):
    gnconv.gnconv_dims(12, 4)
  with pytest.raises(ValueError, match="variant"):
    GnConv(variant="nope").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8)), grid=(2, 2))


def test_depthwise_conv_and_interleave_ops():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  np.testing.assert_allclose(gnconv.depthwise_conv2d(x, kernel, bias),
                             _dwconv_loops(x, kernel, bias), **TOL)
  a, b = jnp.arange(6.0).reshape(1, 3, 2), 10 + jnp.arange(6.0).reshape(1, 3, 2)
  np.testing.assert_array_equal(gnconv.interleave_channels(a, b)[0, 1], [2.0, 12.0, 3.0, 13.0])


@pytest.mark.parametrize("variant,order,init_grid,grid", [
    ("dwconv", 3, (4, 5), (4, 5)),
    ("gf", 3, (4, 5), (4, 5)),
    ("gf", 2, (3, 3), (5, 4)),      # GF filter interpolated to a new grid
])
def test_gnconv_matches_reference_forward_and_grad(variant, order, init_grid, grid):
  rng = np.random.default_rng(1)
  c = 8
  mixer = GnConv(order=order, variant=variant)
  x0 = jnp.zeros((1, init_grid[0] * init_grid[1], c))
  params = _random_params(mixer, x0, grid=init_grid, seed=2)
  x = jnp.asarray(rng.normal(size=(2, 1 + grid[0] * grid[1], c)), jnp.float32)  # with a CLS
  r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def ours(params, x):
    return mixer.apply({"params": params}, x, grid=grid, num_prefix=1)

  def reference(params, x):
    y = _reference(params, x[:, 1:].reshape(2, *grid, c), order, variant)
    return jnp.concatenate([x[:, :1], y.reshape(2, -1, c)], axis=1)

  # One jit per side keeps the test to a few compiles (eager mode compiles every small op).
  def value_and_grad(f):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(r * f(p, x)), argnums=(0, 1),
                                      has_aux=False))

  y = jax.jit(ours)(params, x)
  np.testing.assert_allclose(y, jax.jit(reference)(params, x), **TOL)
  np.testing.assert_allclose(y[:, 0], x[:, 0])                        # prefix passed through
  _, g_ours = value_and_grad(ours)(params, x)
  _, g_ref = value_and_grad(reference)(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, **TOL)


def test_gf_filter_branch_is_circular_convolution():
  # Only the global half: a GF layer with identity norms and a zero local kernel leaves the
  # interleaved odd channels = circular convolution of the (normalized) input's second half.
  rng = np.random.default_rng(3)
  mixer = GnConv(order=1, variant="gf")
  sp = _random_params(mixer, jnp.zeros((1, 16, 4)), grid=(4, 4), seed=5)["dwconv"]
  sp["dw"]["kernel"] = jnp.zeros_like(sp["dw"]["kernel"])
  sp["pre_norm"] = sp["post_norm"] = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
  q = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
  out = GlobalLocalFilter().apply({"params": sp}, q)
  qn = _layer_norm(q, {"scale": 1.0, "bias": 0.0})
  expect = jnp.zeros_like(q).at[..., 1::2].set(_global_filter(qn[..., 2:], sp["complex_weight"]))
  np.testing.assert_allclose(out, _layer_norm(expect, {"scale": 1.0, "bias": 0.0}), **TOL)


def test_registered_and_trains_in_tiny_vit():
  # Mean pooling so the loss reaches the mixer: the CLS token of the default 'tok' pool never
  # reads the patches through a grid mixer (see vitjax.models.spectral_mixers).
  block = tiny_vit_block_grads("gnconv", pool="gap")
  assert float(jnp.abs(block["mixer"]["dwconv"]["kernel"]).max()) > 0
