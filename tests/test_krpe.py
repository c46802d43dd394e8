"""Tests for kernelized RPE attention (vitjax.ops.krpe) and the 'krpe_fft' mixer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.rpe_mixers import KernelizedRPEAttention
from vitjax.ops import krpe
from tests.rpe_reference import pair_index, rand
from tests.mixer_checks import tiny_vit_block_grads


def dense_bias(rel_bias, prefix_bias, grid, n, num_prefix):
  """(H, N, N) relative bias b; pairs with a prefix token take prefix_bias (per head)."""
  idx = pair_index(grid, n, num_prefix)
  gathered = rel_bias.reshape(rel_bias.shape[0], -1)[:, np.maximum(idx, 0)]
  if prefix_bias is None:
    return gathered
  return jnp.where(idx >= 0, gathered, prefix_bias[:, None, None])


def reference(q, k, v, rel_bias, prefix_bias, projection, grid, num_prefix, eps=1e-6):
  """sum_j C_ij phi(q_i).phi(k_j) v_j / sum_j C_ij phi(q_i).phi(k_j) with dense C = exp(b)."""
  d = q.shape[-1]
  m = projection.shape[0]
  n = q.shape[1] - num_prefix
  c = jnp.exp(dense_bias(rel_bias, prefix_bias, grid, n, num_prefix))        # (H, N, N)

  def phi(x, is_query):
    x = x * d ** -0.25
    a = jnp.einsum("bnhd,md->bnhm", x, projection) - 0.5 * jnp.sum(x * x, -1, keepdims=True)
    if is_query:
      shift = jnp.max(a, axis=-1, keepdims=True)          # per query token
    else:
      shift = jnp.max(a, axis=(1, 3), keepdims=True)      # per (example, head)
    return (jnp.exp(a - jax.lax.stop_gradient(shift)) + eps) / np.sqrt(m)

  kern = jnp.einsum("bihm,bjhm->bhij", phi(q, True), phi(k, False)) * c        # (B, H, N, N)
  num = jnp.einsum("bhij,bjhe->bihe", kern, v)
  den = jnp.einsum("bhij->bih", kern)[..., None]
  return num / den


def value_and_probe_grad(f, probe, args):
  """f(*args) and the gradient of the random linear functional sum(probe * f) (one compile)."""
  def run(args):
    out, vjp = jax.vjp(lambda a: f(*a), args)
    return out, vjp(probe)[0]
  return jax.jit(run)(args)


CASES = [  # (grid, num_prefix, N patches, toeplitz_impl)
    (None, 0, 7, "fft"),
    (None, 1, 6, "fft"),
    ((2, 3), 0, 6, "fft"),
    ((3, 2), 2, 6, "fft"),
    ((3, 2), 1, 6, "dense"),
]


@pytest.mark.parametrize("grid,num_prefix,n,impl", CASES)
def test_fft_matches_dense_toeplitz(grid, num_prefix, n, impl):
  b, h, d, m = 2, 2, 8, 12
  size = n + num_prefix
  q, k, v = rand(0, (b, size, h, d)), rand(1, (b, size, h, d)), rand(2, (b, size, h, 5))
  table = (h, 2 * n - 1) if grid is None else (h, 2 * grid[0] - 1, 2 * grid[1] - 1)
  rel_bias = rand(3, table, 0.5)
  prefix_bias = rand(4, (h,), 0.5) if num_prefix else None
  projection = krpe.draw_projection(jax.random.PRNGKey(5), m, d)
  probe = rand(6, (b, size, h, 5))

  def fast(q, k, v, rel_bias, prefix_bias):
    return krpe.krpe_attention(q, k, v, rel_bias, projection, grid=grid, num_prefix=num_prefix,
                               prefix_bias=prefix_bias, toeplitz_impl=impl,
                               feature_block=5)   # 12 features: 3 scan steps, last one padded

  def dense(q, k, v, rel_bias, prefix_bias):
    return reference(q, k, v, rel_bias, prefix_bias, projection, grid, num_prefix)

  args = (q, k, v, rel_bias, prefix_bias)
  out_fast, g_fast = value_and_probe_grad(fast, probe, args)
  out_dense, g_dense = value_and_probe_grad(dense, probe, args)
  np.testing.assert_allclose(out_fast, out_dense, rtol=1e-4, atol=1e-4)
  for a, r in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_dense)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_many_features_approach_softmax_with_rpe():
  # Positive random features are an unbiased estimate of exp(q.k / sqrt(d)); with many of them
  # the FFT path must approach exact softmax(q k^T / sqrt(d) + B) v with the same RPE table.
  b, n, h, d = 1, 9, 1, 4
  q, k, v = rand(10, (b, n, h, d), 0.5), rand(11, (b, n, h, d), 0.5), rand(12, (b, n, h, d))
  rel_bias = rand(13, (h, 5, 5))
  projection = krpe.draw_projection(jax.random.PRNGKey(14), 4096, d)
  approx = jax.jit(functools.partial(krpe.krpe_attention, grid=(3, 3)))(q, k, v, rel_bias,
                                                                        projection)
  bias = dense_bias(rel_bias, None, (3, 3), n, 0)                            # b_{j-i}
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d) + bias
  exact = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, -1), v)
  err = float(jnp.max(jnp.abs(approx - exact)))
  spread = float(jnp.max(jnp.abs(exact - exact.mean(axis=1, keepdims=True))))
  assert err < 0.05 * max(spread, 1.0), (err, spread)


def test_orthogonal_projection_blocks():
  w = np.asarray(krpe.draw_projection(jax.random.PRNGKey(0), 10, 4))
  assert w.shape == (10, 4)
  for block in (w[0:4], w[4:8]):                         # rows inside a block are orthogonal
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  assert not np.allclose(w[0:4], w[4:8])


def test_mixer_matches_reference_and_is_fixed_per_seed():
  b, h, width, grid, num_prefix = 2, 2, 16, (2, 3), 1
  x = rand(20, (b, num_prefix + 6, width))
  mixer = KernelizedRPEAttention(num_heads=h, num_features=16)
  variables = jax.jit(lambda key: mixer.init(key, x, grid=grid, num_prefix=num_prefix))(
      jax.random.PRNGKey(21))
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * rand(22, p.shape), variables["params"])
  projection = jax.jit(lambda p: mixer.apply({"params": p}, width // h,
                                             method=KernelizedRPEAttention.feature_projection))(
                                                 params)
  assert projection.shape == (16, width // h)

  def proj(p, name):
    return jnp.einsum("bnc,chd->bnhd", x, p[name]["kernel"]) + p[name]["bias"]

  def ref(p):
    q, k, v = proj(p, "query"), proj(p, "key"), proj(p, "value")
    y = reference(q, k, v, p["rel_bias"], p["prefix_bias"], projection, grid, num_prefix)
    return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]

  run = lambda p: mixer.apply({"params": p}, x, grid=grid, num_prefix=num_prefix)  # noqa: E731
  probe = rand(23, x.shape)
  out_run, g_run = value_and_probe_grad(run, probe, (params,))
  out_ref, g_ref = value_and_probe_grad(ref, probe, (params,))
  np.testing.assert_allclose(out_run, out_ref, rtol=1e-4, atol=1e-4)
  jax.tree_util.tree_map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4),
                         g_run, g_ref)
  other = KernelizedRPEAttention(num_heads=h, num_features=16, feature_seed=1)
  redrawn = jax.jit(lambda p: other.apply({"params": p}, x, grid=grid, num_prefix=num_prefix))
  assert not np.allclose(redrawn(params), out_run, atol=1e-4)


def test_bad_config_raises():
  x = jnp.ones((1, 6, 8))
  with pytest.raises(ValueError, match="rpe='3d'.*1d, 2d"):
    KernelizedRPEAttention(num_heads=2, rpe="3d").init(jax.random.PRNGKey(0), x, grid=(2, 3))
  with pytest.raises(ValueError, match="grid"):
    KernelizedRPEAttention(num_heads=2).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="toeplitz_impl='fast'.*fft, dense"):
    KernelizedRPEAttention(num_heads=2, toeplitz_impl="fast").init(jax.random.PRNGKey(0), x,
                                                                   grid=(2, 3))


def test_tiny_vit_runs_and_has_finite_grads():
  attn = tiny_vit_block_grads("krpe_fft", mixer_kwargs={"num_features": 16})
  attn = attn["MultiHeadDotProductAttention_0"]
  assert float(jnp.abs(attn["rel_bias"]).sum()) > 0
  assert float(jnp.abs(attn["query"]["kernel"]).sum()) > 0
