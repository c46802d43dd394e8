"""SOFT: the Gaussian kernel, the Newton-Schulz inverse and the 'soft_attn' mixer against dense
references with an exact pseudo-inverse (forward and gradient), parameter counts equal to the
official models', the mixer in another backbone and on its own at 64k tokens, and clear errors.

Logits equal the official code's on tests/golden/soft_tiny.npz (written by
experiments/golden/soft.py from fudan-zvg/SOFT; checked without torch with every other fixture
in tests/test_official.py).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import vitjax
from vitjax.convert import official
from vitjax.models import soft
from vitjax.ops import soft as ops

# 1000 classes at 224 px; the official `sum(p.numel() for p in model.parameters())` of
# soft_tiny ... soft_huge (models/softmax_free_vision_transformer.py, fudan-zvg/SOFT @d3febc3).
PINNED_COUNTS = {
    "soft_tiny": (224, 13_069_056),
    "soft_small": (224, 38_858_462),
    "soft_medium": (224, 45_812_707),
    "soft_large": (224, 64_700_646),
    "soft_huge": (224, 87_108_273),
}
# The official `newton_inv` (SOFT/kernel/inverse.py): T steps from V_0 = alpha P, P = A + EPS I,
# alpha = 0.9 * 2 / max row sum(A)^2 (written out here, not read from vitjax.ops.soft).
T, EPS, ALPHA = 20, 0.01, 0.9 * 2


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _two_block_params(embed_dims, num_heads, size):
  """Parameter shapes of a SOFT with these widths and two blocks per stage."""
  model = vitjax.create_model("soft_tiny", embed_dims=embed_dims, num_heads=num_heads,
                              depths=(2,) * len(embed_dims))
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def _count_by_stages(name):
  """The parameter count of `name` from a two-blocks-per-stage copy: blocks after a stage's
  first are built alike (the first adds the position table), so the count is the copy's plus
  (depth - 2) times each stage's second block. Tracing the deep models whole (up to 60 blocks)
  costs seconds each; soft_tiny is counted both ways."""
  size, _ = PINNED_COUNTS[name]
  v = soft.VARIANTS[name]
  params = _two_block_params(v["embed_dims"], v["num_heads"], size)
  return _count(params) + sum((depth - 2) * _count(params[f"stages_{i}"]["blocks_1"])
                              for i, depth in enumerate(v["depths"]))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  assert _count_by_stages(name) == PINNED_COUNTS[name][1]


def test_param_count_of_the_whole_soft_tiny():
  size, count = PINNED_COUNTS["soft_tiny"]
  shapes = jax.eval_shape(vitjax.create_model("soft_tiny").init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))
  assert _count(shapes["params"]) == count
  assert _count(shapes["batch_stats"]) == 2_176      # official buffers less num_batches_tracked


# ---------------------------------------------------------------------------------------------
# The ops, in float64 so that the only difference left is the Newton-Schulz truncation.

def _gauss(x, y):
  """exp(-||x_i - y_j||^2 / 2) from the differences themselves (not the expanded form)."""
  return np.exp(-0.5 * ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1))


def _newton_truncation(a):
  """Per matrix, the Newton-Schulz error bound ||V_T - P^-1||_2 <= ||P^-1||_2 rho^(2^T), with
  P = A + 0.01 I, rho = max_i |1 - alpha lambda_i^2| (P V_t = I - (I - alpha P^2)^(2^t))."""
  p = a + EPS * np.eye(a.shape[-1])
  lam = np.linalg.eigvalsh(p)
  alpha = ALPHA / a.sum(-1).max(-1) ** 2
  rho = np.abs(1 - alpha[..., None] * lam ** 2).max(-1)
  return rho ** (2.0 ** T) / lam[..., 0]


def test_gaussian_kernel_is_the_dense_distance():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, 3, 7, 5)), rng.standard_normal((2, 3, 4, 5))
  np.testing.assert_allclose(ops.gaussian_kernel(jnp.float32(x), jnp.float32(y)), _gauss(x, y),
                             atol=2e-6)


def test_newton_inverse_converges_to_pinv_forward_and_gradient():
  rng = np.random.default_rng(1)
  a = _gauss(*[rng.standard_normal((3, 9, 6))] * 2)                   # spread landmarks
  p_inv = np.linalg.pinv(a + EPS * np.eye(9))
  w = rng.standard_normal(a.shape)
  # Tolerance: the truncation bound after T steps (tiny here: well conditioned, so converged)
  # plus float64 rounding, which Newton-Schulz corrects each step rather than accumulates.
  trunc = float(_newton_truncation(a).max())
  assert trunc < 1e-12
  tol = trunc + 1e-12 * float(np.linalg.cond(p_inv).max())
  with jax.enable_x64(True):
    v, vjp = jax.vjp(ops.newton_inverse, jnp.asarray(a))
    (g,) = vjp(jnp.asarray(w))
  np.testing.assert_allclose(v, p_inv, atol=tol, rtol=0)
  # The gradient of an exact inverse, -P^-T W P^-T (the official backward), at the same tolerance
  # scaled by the two factors of P^-1 it carries.
  expected = -np.swapaxes(p_inv, -1, -2) @ w @ np.swapaxes(p_inv, -1, -2)
  scale = 2 * np.linalg.norm(p_inv, 2, axis=(-2, -1)).max() * np.abs(w).sum(-1).max()
  np.testing.assert_allclose(g, expected, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("num_iters", [1, 7, T])
def test_newton_inverse_is_the_official_iteration(num_iters):
  """Nearly equal landmarks (A ~ all ones) do not converge in T steps: the result is then the
  closed form of the official iteration, V_t = U diag((1 - (1 - alpha lambda^2)^(2^t)) / lambda) U^T
  with alpha = 1.8 / max row sum(A)^2 and P = A + 0.01 I = U diag(lambda) U^T."""
  rng = np.random.default_rng(2)
  pts = rng.standard_normal((2, 1, 6)) + 0.05 * rng.standard_normal((2, 7, 6))
  a = _gauss(pts, pts)
  p = a + EPS * np.eye(7)
  lam, u = np.linalg.eigh(p)
  alpha = ALPHA / a.sum(-1).max(-1)[:, None] ** 2
  f = (1 - (1 - alpha * lam ** 2) ** (2.0 ** num_iters)) / lam
  expected = np.einsum("bij,bj,bkj->bik", u, f, u)
  assert np.abs(expected - np.linalg.inv(p)).max() > 1e-2     # far from the exact inverse
  with jax.enable_x64(True):
    a = jnp.asarray(a)
    got = ops.newton_inverse(a) if num_iters == T else ops.newton_inverse(a, num_iters)  # default
  np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max(), rtol=0)


# ---------------------------------------------------------------------------------------------
# The mixer against a dense reference.

def _dense_soft(params, x, grid, heads, s, k, *, xp, pinv, erf):
  """'soft_attn' written out: landmarks as an explicit sum over the tokens of each s x s cell,
  the three Gaussian matrices from coordinate differences, the exact (pseudo-)inverse of
  G(Q~, Q~) + 0.01 I, and the depthwise conv as an explicit (N, N, heads) matrix of k x k taps
  between neighbouring tokens. Runs in numpy (xp=np, pinv=np.linalg.pinv) or jnp (for
  gradients). Returns the output and the (B, heads, m, m) landmark matrices A."""
  b, n, c = x.shape
  h, w = grid
  d = c // heads
  dense = lambda t, p: xp.einsum("bnc,ce->bne", t, p["kernel"]) + p["bias"]  # noqa: E731
  q = dense(x, params["query"]).reshape(b, n, heads, d) * d ** -0.25
  v = dense(x, params["value"]).reshape(b, n, heads, d)
  ys, xs = np.divmod(np.arange(n), w)
  # cell[l, t]: token t (row-major inside the cell) of landmark cell l (row-major cells).
  cell = np.array([[(s * cy + i) * w + s * cx + j for i in range(s) for j in range(s)]
                   for cy in range(h // s) for cx in range(w // s)])
  kern = params["landmark"]["kernel"].reshape(s * s, d, d)
  lm = xp.einsum("bltgc,tcd->blgd", q[:, cell], kern)                 # (B, m, heads, d)
  mu = lm.mean(-1, keepdims=True)
  var = ((lm - mu) ** 2).mean(-1, keepdims=True)
  ln = params["landmark_norm"]
  lm = (lm - mu) / xp.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
  lm = 0.5 * lm * (1 + erf(lm / np.sqrt(2.0)))
  gauss = lambda p, r: xp.exp(  # noqa: E731
      -0.5 * ((p[:, :, None] - r[:, None]) ** 2).sum(-1).transpose(0, 3, 1, 2))  # (B, g, ., .)
  a = gauss(lm, lm)
  inv = pinv(a + EPS * xp.eye(a.shape[-1]))
  y = gauss(q, lm) @ inv @ (gauss(lm, q) @ v.transpose(0, 2, 1, 3))   # (B, heads, N, d)
  tap = np.full((n, n), -1)
  for i in range(n):
    for j in range(n):
      dy, dx = ys[j] - ys[i], xs[j] - xs[i]
      if abs(dy) <= k // 2 and abs(dx) <= k // 2:
        tap[i, j] = (dy + k // 2) * k + dx + k // 2
  taps = params["dwconv"].reshape(k * k, heads)[np.maximum(tap, 0)] * (tap >= 0)[..., None]
  y = y.transpose(0, 2, 1, 3) + xp.einsum("ijg,bjgd->bigd", taps, v)
  return dense(y.reshape(b, n, c), params["out"]), a


def test_mixer_matches_dense_nystrom_with_exact_pinv():
  grid, heads, dim, s, k = (4, 6), 2, 16, 2, 3                   # 2x3 landmarks, 3x3 conv
  mixer = soft.SoftAttention(num_heads=heads, sr_ratio=s, conv_size=k)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, grid[0] * grid[1], dim))
  shapes = jax.eval_shape(functools.partial(mixer.init, grid=grid), jax.random.key(0),
                          jnp.zeros(x.shape))["params"]
  assert set(shapes) == {"query", "value", "landmark", "landmark_norm", "dwconv", "out"}
  params = jax.tree.map(lambda t: 0.4 * rng.standard_normal(t.shape), shapes)   # every weight
  params["landmark_norm"]["scale"] = 1.5 + params["landmark_norm"]["scale"]     # spread landmarks
  ref, a = _dense_soft(params, x, grid, heads, s, k, xp=np, pinv=np.linalg.pinv,
                       erf=scipy.special.erf)
  # Tolerance. The case is converged: after T Newton-Schulz steps each inverse is within the
  # truncation bound of the exact one, asserted negligible here, so what is left is rounding.
  # In float64 that is ~1e-15, except that layers.gelu (the landmarks' GELU) holds sqrt(1/2) as
  # a float32 constant (relative error 3e-8 in its argument): 1e-8 relative on the outputs, 1e-7
  # on the gradients, which pass it through LayerNorm and the Gaussian exponents.
  assert float(_newton_truncation(a).max()) < 1e-12
  tol = 1e-8 * float(np.abs(ref).max())
  w = rng.standard_normal(ref.shape)
  with jax.enable_x64(True):
    ours = lambda p, x: mixer.apply({"params": p}, x, grid=grid)  # noqa: E731
    # P = A + 0.01 I is positive definite (A is a Gaussian Gram matrix), so its pseudo-inverse
    # is its inverse; jnp.linalg.inv differentiates more cheaply than pinv's SVD.
    dense = lambda p, x: _dense_soft(p, x, grid, heads, s, k, xp=jnp,  # noqa: E731
                                     pinv=jnp.linalg.inv, erf=jax.scipy.special.erf)[0]
    loss = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p, x: (jnp.sum(f(p, x) * w), f(p, x)), argnums=(0, 1), has_aux=True))
    (_, y), g = loss(ours)(params, jnp.asarray(x))
    (_, y_ref), g_ref = loss(dense)(params, jnp.asarray(x))
    assert y.dtype == jnp.float64
  np.testing.assert_allclose(y, ref, atol=tol, rtol=0)
  np.testing.assert_allclose(y_ref, ref, atol=tol, rtol=0)        # the jnp copy of the reference
  # Gradients: the official backward (an exact inverse's) against autodiff through the inverse.
  for ours_g, ref_g in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert float(np.abs(ref_g).max()) > 0.1
    np.testing.assert_allclose(ours_g, ref_g, atol=1e-7 * float(np.abs(ref_g).max()), rtol=0)


def test_soft_attn_is_a_mixer_for_other_backbones():
  """'soft_attn' by name in the isotropic ViT (grid passed by the block), traced through init
  and a training gradient without compiling (the values are checked above)."""
  model = vitjax.create_model("vit_nano4", mixer="soft_attn", num_classes=10, depth=2, width=32,
                              num_heads=2, mlp_dim=64, pool="gap",
                              mixer_kwargs=dict(sr_ratio=2, conv_size=3))
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  loss = lambda p, x: model.apply({"params": p}, x).sum()  # noqa: E731
  grads = jax.eval_shape(jax.grad(loss), params, x)
  attn = grads["Transformer"]["encoderblock_0"]["attn"]
  assert attn["landmark"]["kernel"].shape == (2, 2, 16, 16)        # head width 16
  assert attn["dwconv"].shape == (3, 3, 1, 2)


def test_standalone_mixer_at_64k_tokens():
  """The scaling benchmark's shape: N = 256 x 256, width 384, 6 heads, 8 x 8 landmarks."""
  mixer = soft.SoftAttention(num_heads=6, sr_ratio=32, conv_size=3)
  x = jax.ShapeDtypeStruct((1, 256 * 256, 384), jnp.float32)
  variables = jax.eval_shape(functools.partial(mixer.init, grid=(256, 256)), jax.random.key(0), x)
  assert variables["params"]["landmark"]["kernel"].shape == (32, 32, 64, 64)
  y = jax.eval_shape(functools.partial(mixer.apply, grid=(256, 256)), variables, x)
  assert y.shape == (1, 65536, 384)


def test_official_weights_show_the_landmark_strides_and_tables():
  """from_official reads the per-stage landmark stride, conv size and the position tables'
  image size off the fixture's state dict (the logits are checked in tests/test_official.py)."""
  path = os.path.join(os.path.dirname(__file__), "golden", "soft_tiny.npz")
  with np.load(path) as f:
    state = {k[len("state/"):]: f[k] for k in f.files if k.startswith("state/")}
  read = official.FAMILIES["soft"].overrides(state)
  assert read["sr_ratios"] == (8, 4, 2) and read["conv_sizes"] == (9, 5, 3)
  assert read["pos_size"] == 224 and read["depths"] == (1, 1, 2, 1)
  assert read["embed_dims"] == (8, 16, 16, 24) and read["num_heads"] == (2, 2, 2, 3)


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 224, 224, 3))
  make = functools.partial(vitjax.create_model, "soft_tiny", num_classes=3)
  cases = [
      (dict(sr_ratios=(8, 4, 4)), r"SOFT stage 3 at 224x224 px: sr_ratios\[2\]=4 \(the landmark "
                                  r"stride\) does not divide the 14x14 token grid; allowed values "
                                  r"divide both 14 and 14: 1, 2, 7, 14"),
      (dict(sr_ratios=(8, 4, 2, 1)), r"sr_ratios=\(8, 4, 2, 1\) needs one entry per SOFT stage "
                                     r"\(3"),
      (dict(num_heads=(2, 4, 10)), r"num_heads=\(2, 4, 10\) needs one entry per stage \(4"),
      (dict(conv_sizes=(9, 4, 3)), r"soft_attn: conv_size=4; allowed values are 0"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**overrides).init, jax.random.key(0), x)
  mixer = soft.SoftAttention(num_heads=2, sr_ratio=4)
  with pytest.raises(ValueError, match=r"soft_attn: sr_ratio=4 \(the landmark stride\) does not "
                                       r"divide the 8x6 token grid; allowed values divide both 8 "
                                       r"and 6: 1, 2"):
    jax.eval_shape(functools.partial(mixer.init, grid=(8, 6)), jax.random.key(0),
                   jnp.zeros((1, 48, 8)))
