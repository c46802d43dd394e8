"""vitjax.ops.mhbc (LookupViT's bidirectional cross-attention) against a plain reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.ops import mhbc

B, M, N, H, D, DV = 2, 3, 7, 2, 4, 5


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q_p = jax.random.normal(ks[0], (B, M, H, D))
  k_l = jax.random.normal(ks[1], (B, N, H, D))
  v_l = jax.random.normal(ks[2], (B, N, H, DV))
  v_p = jax.random.normal(ks[3], (B, M, H, DV))
  return q_p, k_l, v_l, v_p


def _reference(q_p, k_l, v_l, v_p, scale):
  """Per (batch, head) matrices, softmax written out with exp / sum; differentiable jnp."""
  to_p = [[None] * H for _ in range(B)]
  to_l = [[None] * H for _ in range(B)]
  logits = [[None] * H for _ in range(B)]
  for b in range(B):
    for h in range(H):
      s = (q_p[b, :, h, :] @ k_l[b, :, h, :].T) * scale          # (M, N)
      e_n = jnp.exp(s - s.max(axis=1, keepdims=True))             # normalise each row over N
      a_gather = e_n / e_n.sum(axis=1, keepdims=True)
      e_m = jnp.exp(s - s.max(axis=0, keepdims=True))             # normalise each column over M
      a_prop = e_m / e_m.sum(axis=0, keepdims=True)
      to_p[b][h] = a_gather @ v_l[b, :, h, :]                     # (M, DV)
      to_l[b][h] = a_prop.T @ v_p[b, :, h, :]                     # (N, DV)
      logits[b][h] = s
  stack = lambda rows, axis: jnp.stack([jnp.stack(r, axis=axis - 1) for r in rows])  # noqa: E731
  return stack(to_p, 2), stack(to_l, 2), jnp.stack([jnp.stack(r) for r in logits])


def test_forward_matches_dense_reference():
  args = _inputs()
  scale = D ** -0.5
  got = mhbc.bidirectional_cross_attention(*args, scale=scale)
  want = _reference(*args, scale)
  for g, w, shape in zip(got, want, [(B, M, H, DV), (B, N, H, DV), (B, H, M, N)]):
    assert g.shape == shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_split_calls_equal_combined_call():
  q_p, k_l, v_l, v_p = _inputs(1)
  logits = mhbc.mhbc_logits(q_p, k_l, scale=0.3)
  to_p, to_l, logits2 = mhbc.bidirectional_cross_attention(q_p, k_l, v_l, v_p, scale=0.3)
  np.testing.assert_array_equal(logits, logits2)
  np.testing.assert_array_equal(mhbc.gather(logits, v_l), to_p)
  np.testing.assert_array_equal(mhbc.propagate(logits, v_p), to_l)


def test_gradient_matches_dense_reference():
  args = _inputs(2)
  scale = D ** -0.5
  kp, kl = jax.random.split(jax.random.key(3))
  w_p = jax.random.normal(kp, (B, M, H, DV))
  w_l = jax.random.normal(kl, (B, N, H, DV))

  def functional(fn):
    def f(*a):
      to_p, to_l = fn(*a)[:2]
      return jnp.sum(w_p * to_p) + jnp.sum(w_l * to_l)
    return f

  got = jax.grad(functional(lambda *a: mhbc.bidirectional_cross_attention(*a, scale=scale)),
                 argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(functional(lambda *a: _reference(*a, scale)), argnums=(0, 1, 2, 3))(*args)
  for g, w in zip(got, want):
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_softmax_axes():
  """Gather weights sum to 1 over N per (b, h, m); propagate ones over M per (b, h, n)."""
  q_p, k_l, _, _ = _inputs(4)
  logits = mhbc.mhbc_logits(q_p, k_l, scale=1.0)
  a_g, a_p = mhbc.gather_weights(logits), mhbc.propagate_weights(logits)
  np.testing.assert_allclose(a_g.sum(axis=-1), np.ones((B, H, M)), atol=1e-6)
  np.testing.assert_allclose(a_p.sum(axis=-2), np.ones((B, H, N)), atol=1e-6)
  # The transposed gather weights would be the known bug: their columns do not sum to one.
  assert float(jnp.abs(a_g.sum(axis=-2) - 1.0).max()) > 0.1


def test_propagate_reuses_pre_softmax_logits():
  """Propagation = softmax over M of the logits, not a function of the gather weights' transpose."""
  q_p, k_l, _, v_p = _inputs(5)
  logits = mhbc.mhbc_logits(q_p, k_l, scale=1.0)
  want = jnp.einsum("bhmn,bmhd->bnhd", jax.nn.softmax(logits, axis=2), v_p)
  np.testing.assert_allclose(mhbc.propagate(logits, v_p), want, rtol=1e-6, atol=1e-6)
  wrong = jnp.einsum("bhmn,bmhd->bnhd", mhbc.gather_weights(logits), v_p)
  assert float(jnp.abs(wrong - want).max()) > 1e-2


@pytest.mark.parametrize("m", [1, 4])
def test_one_or_few_compressed_tokens(m):
  """M = 1 (a 1x1 grid): every lookup token receives exactly V_p of the one compressed token."""
  q_p = jax.random.normal(jax.random.key(6), (B, m, H, D))
  k_l = jax.random.normal(jax.random.key(7), (B, N, H, D))
  v_p = jax.random.normal(jax.random.key(8), (B, m, H, DV))
  out = mhbc.propagate(mhbc.mhbc_logits(q_p, k_l, scale=1.0), v_p)
  assert out.shape == (B, N, H, DV)
  if m == 1:
    np.testing.assert_allclose(out, jnp.broadcast_to(v_p, out.shape), rtol=1e-6)


# ------------------------------------------------------------------------ absorbed forms

WIDTH = 6   # model width of the absorbed tests; per-head width D, value width DV as above


def _absorbed_inputs(seed=5):
  ks = jax.random.split(jax.random.key(seed), 9)
  q_p = jax.random.normal(ks[0], (B, M, H, D))
  x_l = jax.random.normal(ks[1], (B, N, WIDTH))                 # normalised lookup tokens
  w_k = jax.random.normal(ks[2], (WIDTH, H, D))
  b_k = jax.random.normal(ks[3], (H, D))
  w_v = jax.random.normal(ks[4], (WIDTH, H, DV))
  b_v = jax.random.normal(ks[5], (H, DV))
  v_p = jax.random.normal(ks[6], (B, M, H, DV))
  w_o = jax.random.normal(ks[7], (H, DV, WIDTH))
  return q_p, x_l, w_k, b_k, w_v, b_v, v_p, w_o


def _absorbed(q_p, x_l, w_k, b_k, w_v, b_v, v_p, w_o, scale):
  logits = mhbc.absorbed_logits(q_p, x_l, w_k, b_k, scale=scale)
  return (mhbc.gather_absorbed(logits, x_l, w_v, b_v), mhbc.propagate_absorbed(logits, v_p, w_o),
          logits)


def _projected_reference(q_p, x_l, w_k, b_k, w_v, b_v, v_p, w_o, scale):
  """Keys and values projected per token with explicit matrix products, then the dense reference."""
  k_l = jnp.stack([x_l[:, :, :] @ w_k[:, h, :] + b_k[h] for h in range(H)], axis=2)
  v_l = jnp.stack([x_l[:, :, :] @ w_v[:, h, :] + b_v[h] for h in range(H)], axis=2)
  to_p, to_l, logits = _reference(q_p, k_l, v_l, v_p, scale)
  return to_p, sum(to_l[:, :, h, :] @ w_o[h] for h in range(H)), logits


def test_absorbed_forms_match_projected_reference():
  """Same logits, same gather messages (bias included), same propagate output after W_ol."""
  args = _absorbed_inputs()
  got = _absorbed(*args, scale=0.4)
  want = _projected_reference(*args, scale=0.4)
  for g, w, shape in zip(got, want, [(B, M, H, DV), (B, N, WIDTH), (B, H, M, N)]):
    assert g.shape == shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_absorbed_key_bias_matters_only_for_propagate():
  """q b_k is constant along N: gather ignores it, propagate (softmax over M) does not."""
  q_p, x_l, w_k, b_k, w_v, b_v, v_p, w_o = _absorbed_inputs(6)
  with_bias = _absorbed(q_p, x_l, w_k, b_k, w_v, b_v, v_p, w_o, scale=0.4)
  without = _absorbed(q_p, x_l, w_k, None, w_v, b_v, v_p, w_o, scale=0.4)
  np.testing.assert_allclose(with_bias[0], without[0], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(with_bias[1] - without[1]).max()) > 1e-2


def test_absorbed_gradients_match_projected_reference():
  args = _absorbed_inputs(7)
  kp, kl = jax.random.split(jax.random.key(8))
  w_p = jax.random.normal(kp, (B, M, H, DV))
  w_l = jax.random.normal(kl, (B, N, WIDTH))

  def functional(fn):
    def f(*a):
      to_p, to_l = fn(*a, scale=0.4)[:2]
      return jnp.sum(w_p * to_p) + jnp.sum(w_l * to_l)
    return f

  argnums = tuple(range(8))
  got = jax.grad(functional(_absorbed), argnums=argnums)(*args)
  want = jax.grad(functional(_projected_reference), argnums=argnums)(*args)
  for g, w in zip(got, want):
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
