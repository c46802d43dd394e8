"""Tests for URPE attention (vitjax.ops.urpe) and the 'urpe' mixer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.mixers import MultiHeadSelfAttention
from vitjax.models.rpe_mixers import URPEAttention
from vitjax.ops import urpe
from tests.rpe_reference import pair_index, rand
from tests.mixer_checks import tiny_vit_block_grads


def dense_pairs(table, prefix_value, idx):
  """(H, N, N): table entry of each pair's offset, prefix_value (per head) on prefix pairs."""
  gathered = table.reshape(table.shape[0], -1)[:, np.maximum(idx, 0)]
  return jnp.where(idx >= 0, gathered, prefix_value[:, None, None])


def value_and_probe_grad(f, probe, args):
  """f(*args) and the gradient of the random linear functional sum(probe * f) (one compile)."""
  def run(args):
    out, vjp = jax.vjp(lambda a: f(*a), args)
    return out, vjp(probe)[0]
  return jax.jit(run)(args)


def assert_trees_close(a, b, tol=1e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def project(x, p, name):
  return jnp.einsum("bnc,chd->bnhd", x, p[name]["kernel"]) + p[name]["bias"]


def rpe_attention_reference(x, p, bias):
  """Ordinary relative-position attention softmax(QK^T / sqrt(d) + B) V, then the out proj."""
  q, k, v = project(x, p, "query"), project(x, p, "key"), project(x, p, "value")
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1]) + bias
  y = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1), v)
  return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]


def urpe_reference(x, p, bias, mult):
  """(softmax(QK^T / sqrt(d) + B) (.) C) V, then the out proj."""
  q, k, v = project(x, p, "query"), project(x, p, "key"), project(x, p, "value")
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1]) + bias
  y = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1) * mult, v)
  return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_op_matches_plain_formula():
  q, k, v = rand(0, (2, 5, 3, 4)), rand(1, (2, 5, 3, 4)), rand(2, (2, 5, 3, 6))
  bias, mult = rand(3, (3, 5, 5)), rand(4, (3, 5, 5))
  a = jnp.einsum("bihd,bjhd->bhij", q, k) * 0.5 + bias
  a = jnp.exp(a - a.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  expected = jnp.einsum("bhij,bjhd->bihd", a * mult, v)
  np.testing.assert_allclose(urpe.urpe_attention(q, k, v, bias, mult, scale=0.5), expected,
                             rtol=1e-5, atol=1e-5)


CASES = [("2d", (2, 3), 1), ("2d", (3, 3), 0), ("1d", (2, 3), 1)]


def _setup(rpe, grid, num_prefix, seed=0):
  h, width = 2, 16
  x = rand(seed, (2, num_prefix + grid[0] * grid[1], width))
  mixer = URPEAttention(num_heads=h, rpe=rpe)
  params = mixer.init(jax.random.PRNGKey(seed + 1), x, grid=grid, num_prefix=num_prefix)["params"]
  # Move every parameter off its init so B, C and the prefix scalars all matter.
  params = jax.tree_util.tree_map(lambda a: a + 0.3 * rand(seed + 2, a.shape), params)
  table_grid = None if rpe == "1d" else grid
  idx = pair_index(table_grid, grid[0] * grid[1], num_prefix)
  run = lambda p: mixer.apply({"params": p}, x, grid=grid, num_prefix=num_prefix)  # noqa: E731
  return x, params, idx, run


def _prefix(p, name, h=2):
  return p[name] if name in p else jnp.zeros((h,))


@pytest.mark.parametrize("rpe,grid,num_prefix", CASES)
def test_mixer_matches_dense_reference(rpe, grid, num_prefix):
  x, params, idx, run = _setup(rpe, grid, num_prefix)

  def ref(p):
    bias = dense_pairs(p["rel_bias"], _prefix(p, "prefix_bias"), idx)
    mult = dense_pairs(p["rel_mult"], _prefix(p, "prefix_mult"), idx)
    return urpe_reference(x, p, bias, mult)

  probe = rand(9, x.shape)
  out, grads = value_and_probe_grad(run, probe, (params,))
  out_ref, grads_ref = value_and_probe_grad(ref, probe, (params,))
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, grads_ref)


@pytest.mark.parametrize("rpe,grid,num_prefix", CASES[:2])
def test_unit_multiplier_is_plain_rpe_attention(rpe, grid, num_prefix):
  x, params, idx, run = _setup(rpe, grid, num_prefix, seed=20)
  params = dict(params, rel_mult=jnp.ones_like(params["rel_mult"]))
  if num_prefix:
    params["prefix_mult"] = jnp.ones_like(params["prefix_mult"])
  expected = rpe_attention_reference(
      x, params, dense_pairs(params["rel_bias"], _prefix(params, "prefix_bias"), idx))
  np.testing.assert_allclose(run(params), expected, rtol=1e-5, atol=1e-5)


def test_fresh_init_equals_mhsa_with_same_projections():
  # B = 0 and C = 1 at init, and the q/k/v/out names match 'mhsa': the layers agree exactly.
  x = rand(30, (2, 7, 16))
  mixer = URPEAttention(num_heads=2)
  params = mixer.init(jax.random.PRNGKey(31), x, grid=(2, 3), num_prefix=1)["params"]
  mhsa_params = {k: v for k, v in params.items() if k in ("query", "key", "value", "out")}
  expected = MultiHeadSelfAttention(num_heads=2).apply({"params": mhsa_params}, x)
  got = mixer.apply({"params": params}, x, grid=(2, 3), num_prefix=1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_config_raises():
  x = jnp.ones((1, 7, 8))
  with pytest.raises(ValueError, match="rpe='x'.*1d, 2d"):
    URPEAttention(num_heads=2, rpe="x").init(jax.random.PRNGKey(0), x, grid=(2, 3), num_prefix=1)
  with pytest.raises(ValueError, match="grid"):
    URPEAttention(num_heads=2).init(jax.random.PRNGKey(0), x, grid=(2, 2), num_prefix=1)


def test_tiny_vit_runs_and_has_finite_grads():
  attn = tiny_vit_block_grads("urpe")["MultiHeadDotProductAttention_0"]
  for name in ("rel_bias", "rel_mult", "prefix_bias", "prefix_mult"):
    assert float(jnp.abs(attn[name]).sum()) > 0, name
