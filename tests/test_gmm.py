"""Tests for Gaussian mixture mask attention (vitjax.ops.gmm) and the 'gmm_mask' mixer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.mixers import MultiHeadSelfAttention
from vitjax.models.rpe_mixers import GMMMaskAttention
from vitjax.ops import gmm
from tests.rpe_reference import rand
from tests.mixer_checks import tiny_vit_block_grads


def pair_sq_dist(grid, num_prefix):
  """(N, N) squared patch distance per token pair, NaN where a prefix token is involved."""
  h, w = grid
  size = num_prefix + h * w
  dist = np.full((size, size), np.nan, np.float32)
  for i in range(num_prefix, size):
    for j in range(num_prefix, size):
      (ri, ci), (rj, cj) = divmod(i - num_prefix, w), divmod(j - num_prefix, w)
      dist[i, j] = (ri - rj) ** 2 + (ci - cj) ** 2
  return dist


def value_and_probe_grad(f, probe, args):
  """f(*args) and the gradient of the random linear functional sum(probe * f) (one compile)."""
  def run(args):
    out, vjp = jax.vjp(lambda a: f(*a), args)
    return out, vjp(probe)[0]
  return jax.jit(run)(args)


def reference(x, p, grid, num_prefix):
  """softmax((QK^T / sqrt(d)) (.) M) V with M summed kernel by kernel, prefix pairs M = 1."""
  q, k, v = (jnp.einsum("bnc,chd->bnhd", x, p[name]["kernel"]) + p[name]["bias"]
             for name in ("query", "key", "value"))
  dist = pair_sq_dist(grid, num_prefix)
  on_grid = ~np.isnan(dist)
  dist = np.nan_to_num(dist)
  mask = 0.0
  for kk in range(p["alpha"].shape[0]):
    alpha = p["alpha"][kk][:, None, None]
    var = p["sigma"][kk][:, None, None] ** 2 + 1e-5
    mask = mask + alpha * jnp.exp(-dist / (2 * var))
  mask = jnp.where(on_grid, mask, 1.0)                                         # (H, N, N)
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1]) * mask
  y = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1), v)
  return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_mixture_table_matches_official_power_form():
  # The official module evaluates exp(-|dp|^2 / 2) ** (1 / (sigma^2 + 1e-5)), per kernel.
  alpha, sigma = rand(0, (3, 2), 2.0), 1.0 + rand(1, (3, 2), 3.0)
  h, w = 4, 3
  ours = gmm.gaussian_mixture_table(gmm.offset_sq_distances(h, w), alpha, sigma)
  for dr in range(-(h - 1), h):
    for dc in range(-(w - 1), w):
      base = np.exp(-(dr ** 2 + dc ** 2)) ** 0.5
      for head in range(2):
        want = sum(float(alpha[kk, head]) * base ** (1.0 / (float(sigma[kk, head]) ** 2 + 1e-5))
                   for kk in range(3))
        np.testing.assert_allclose(ours[head, dr + h - 1, dc + w - 1], want, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("grid,num_prefix", [((2, 3), 1), ((3, 3), 0)])
def test_mixer_matches_dense_reference(grid, num_prefix):
  x = rand(2, (2, num_prefix + grid[0] * grid[1], 16))
  mixer = GMMMaskAttention(num_heads=2, num_kernels=3)
  params = mixer.init(jax.random.PRNGKey(3), x, grid=grid, num_prefix=num_prefix)["params"]
  # Narrow widths so the mask really varies over these tiny grids (init sigma ~ 10 is flat).
  params = dict(params, sigma=1.0 + 0.5 * rand(4, params["sigma"].shape))
  run = lambda p: mixer.apply({"params": p}, x, grid=grid, num_prefix=num_prefix)  # noqa: E731
  probe = rand(5, x.shape)
  out, grads = value_and_probe_grad(run, probe, (params,))
  out_ref, grads_ref = value_and_probe_grad(lambda p: reference(x, p, grid, num_prefix), probe,
                                            (params,))
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         grads, grads_ref)
  (g,) = grads
  assert float(jnp.abs(g["sigma"]).sum()) > 0 and float(jnp.abs(g["alpha"]).sum()) > 0


def test_wide_gaussians_with_unit_mass_reduce_to_plain_attention():
  # sigma -> inf makes every Gaussian 1, so M = sum_k alpha_k = 1: plain softmax attention.
  x = rand(6, (2, 1 + 12, 16))
  mixer = GMMMaskAttention(num_heads=2, num_kernels=3)
  params = mixer.init(jax.random.PRNGKey(7), x, grid=(3, 4), num_prefix=1)["params"]
  params = dict(params, sigma=jnp.full((3, 2), 1e5),
                alpha=jnp.array([[0.2, 0.7], [0.3, -0.5], [0.5, 0.8]]))
  got = mixer.apply({"params": params}, x, grid=(3, 4), num_prefix=1)
  mhsa_params = {k: v for k, v in params.items() if k in ("query", "key", "value", "out")}
  expected = MultiHeadSelfAttention(num_heads=2).apply({"params": mhsa_params}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # ... and a mass other than 1 rescales the logits, so the outputs must differ.
  params["alpha"] = params["alpha"] * 2.0
  assert not np.allclose(mixer.apply({"params": params}, x, grid=(3, 4), num_prefix=1),
                         expected, atol=1e-4)


def test_bad_config_raises():
  x = jnp.ones((1, 6, 8))
  with pytest.raises(ValueError, match="grid"):
    GMMMaskAttention(num_heads=2).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="num_kernels"):
    GMMMaskAttention(num_heads=2, num_kernels=0).init(jax.random.PRNGKey(0), x, grid=(2, 3))


def test_tiny_vit_runs_and_has_finite_grads():
  attn = tiny_vit_block_grads("gmm_mask")["MultiHeadDotProductAttention_0"]
  assert float(jnp.abs(attn["alpha"]).sum()) > 0 and float(jnp.abs(attn["sigma"]).sum()) > 0
