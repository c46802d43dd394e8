"""T2T-ViT: parameter counts against the official models (and how the frozen tensors make up the
difference), the soft split against a direct loop over patches, the Performer attention against
its explicit (T, S) kernel form, the sinusoid table against its formula (forward and gradients
where differentiable), the backbone attention's logit scale, training-mode behaviour of the frozen
random features, the converter's position-table check, and clear errors for bad input.

Logits equal the official code's on the golden fixtures tests/golden/t2t_vit_7.npz (Performer
T2T layers) and t2t_vit_t_14.npz (transformer T2T layers), written by experiments/golden/t2t.py
from yitu-opensource/T2T-ViT and checked without torch in tests/test_official.py.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import t2t
from vitjax.ops import performer, soft_split

# 1000 classes at 224 px: the official `sum(p.numel() for p in model.parameters())`, which counts
# the frozen sinusoid table and the Performer's random features (test_param_counts).
PINNED_COUNTS = {
    "t2t_vit_7": (224, 4_310_222),
    "t2t_vit_10": (224, 5_889_230),
    "t2t_vit_12": (224, 6_941_902),
    "t2t_vit_14": (224, 21_545_550),
    "t2t_vit_19": (224, 39_177_422),
    "t2t_vit_24": (224, 64_105_934),
    "t2t_vit_t_14": (224, 21_541_070),
    "t2t_vit_t_19": (224, 39_172_942),
    "t2t_vit_t_24": (224, 64_101_454),
}
# The official trainable counts (requires_grad=True): vitjax's `params`.
OFFICIAL_TRAINABLE = {
    "t2t_vit_7": 4_255_694, "t2t_vit_10": 5_834_702, "t2t_vit_12": 6_887_374,
    "t2t_vit_14": 21_465_806, "t2t_vit_19": 39_085_070, "t2t_vit_24": 64_000_974,
    "t2t_vit_t_14": 21_465_422, "t2t_vit_t_19": 39_084_686, "t2t_vit_t_24": 64_000_590,
}
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _perturbed(shapes, seed, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  """params == official trainable; params + random features (batch_stats) + the sinusoid table
  ((N + 1) x D, a constant here) == the official parameter count."""
  size, official = PINNED_COUNTS[name]
  model = vitjax.create_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  tokens = (size // model.total_stride()) ** 2
  table = (tokens + 1) * model.embed_dim
  features = _count(shapes.get("batch_stats", {}))
  assert features == (2 * 32 * 64 if model.tokens_type == "performer" else 0)
  assert _count(shapes["params"]) == OFFICIAL_TRAINABLE[name]
  assert _count(shapes["params"]) + features + table == official


def _unfold_loop(x, k, s, p):
  """nn.Unfold written out: out[b, y, x, c*k*k + i*k + j] = x[b, s*y + i - p, s*x + j - p, c]."""
  b, h, w, c = x.shape
  oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  out = np.zeros((b, oh, ow, c * k * k), x.dtype)
  for y in range(oh):
    for xx in range(ow):
      for ch in range(c):
        for i in range(k):
          for j in range(k):
            r, col = s * y + i - p, s * xx + j - p
            if 0 <= r < h and 0 <= col < w:
              out[:, y, xx, ch * k * k + i * k + j] = x[:, r, col, ch]
  return out


def _unfold_adjoint_loop(g, shape, k, s, p):
  """The gradient of sum(g * unfold(x)) w.r.t. x: every patch entry added back to its pixel."""
  b, h, w, c = shape
  out = np.zeros(shape, g.dtype)
  for y in range(g.shape[1]):
    for xx in range(g.shape[2]):
      for ch in range(c):
        for i in range(k):
          for j in range(k):
            r, col = s * y + i - p, s * xx + j - p
            if 0 <= r < h and 0 <= col < w:
              out[:, r, col, ch] += g[:, y, xx, ch * k * k + i * k + j]
  return out


@pytest.mark.parametrize("k,s,p,hw", [(7, 4, 2, (12, 8)), (3, 2, 1, (6, 5)), (3, 1, 1, (4, 4))])
def test_soft_split_matches_a_direct_loop(k, s, p, hw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
  fn = functools.partial(soft_split.soft_split, kernel=k, stride=s, padding=p)
  ref = _unfold_loop(x, k, s, p)
  g = rng.standard_normal(ref.shape).astype(np.float32)
  y, grad = jax.jit(lambda x: (fn(x), jax.grad(lambda x: jnp.sum(fn(x) * g))(x)))(jnp.asarray(x))
  assert y.shape == ref.shape
  np.testing.assert_array_equal(y, ref)
  np.testing.assert_allclose(grad, _unfold_adjoint_loop(g, x.shape, k, s, p), atol=1e-5)
  with pytest.raises(ValueError, match="smaller than the kernel 7"):
    soft_split.soft_split(jnp.zeros((1, 2, 2, 1)), 7, 4, 2)


def _performer_dense(q, k, v, omega, eps):
  """Performer attention by its definition: the (T, S) kernel matrix
  A[t, s] = phi(q_t) . phi(k_s), phi(x)_i = exp(omega_i . x - |x|^2 / 2) / sqrt(m), each row
  normalised by its sum (+ eps)."""
  m = omega.shape[0]
  def phi(x):
    return jnp.exp(x @ omega.T - 0.5 * jnp.sum(x ** 2, -1, keepdims=True)) / np.sqrt(m)
  a = jnp.einsum("btm,bsm->bts", phi(q), phi(k))
  return jnp.einsum("bts,bse->bte", a, v) / (a.sum(-1, keepdims=True) + eps)


def test_performer_attention_matches_its_kernel_form():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(0.5 * rng.standard_normal((2, 9, 8)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((2, 9, 5)), jnp.float32)
  omega = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 9, 5)), jnp.float32)
  def value_and_grads(f):
    f = functools.partial(f, eps=1e-8)
    return jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: jnp.sum(f(*a) * w),
                                                argnums=(0, 1, 2, 3))(*a)))(q, k, v, omega)
  (y, grads), (y_ref, grads_ref) = (value_and_grads(f) for f in (
      performer.performer_attention, _performer_dense))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_positive_random_features_estimate_the_softmax_kernel():
  """E_omega[phi(x) . phi(y)] = exp(x . y) for omega ~ N(0, I) (the Performer's estimator)."""
  rng = np.random.default_rng(2)
  x, y = 0.3 * rng.standard_normal((2, 1, 6))
  omega = jnp.asarray(rng.standard_normal((200_000, 6)), jnp.float32)
  px, py = (performer.positive_random_features(jnp.asarray(t, jnp.float32), omega) for t in (x, y))
  estimate = float(jnp.sum(px * py))
  np.testing.assert_allclose(estimate, np.exp(float(x[0] @ y[0])), rtol=2e-2)


def test_sinusoid_table_matches_the_formula():
  n, d = 5, 6
  table = t2t.sinusoid_table(n, d)
  for pos in range(n):
    for j in range(d):
      angle = pos / 10000 ** (2 * (j // 2) / d)
      assert table[pos, j] == pytest.approx(np.sin(angle) if j % 2 == 0 else np.cos(angle),
                                            abs=1e-6)


@pytest.mark.parametrize("scale", [None, 0.1])
def test_backbone_attention_scale(scale):
  """SelfAttention = softmax(q k^T * scale) v per head (scale None: head_dim^-1/2), with q/k/v
  projections without bias (the official qkv_bias=False), forward and gradients."""
  heads, dim = 2, 8
  mixer = t2t.SelfAttention(num_heads=heads, qkv_bias=False, scale=scale)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, dim)), jnp.float32)
  params = _perturbed(jax.eval_shape(mixer.init, jax.random.key(0), x), 4)["params"]
  assert set(params) == {"query", "key", "value", "out"} and "bias" not in params["query"]
  c = (dim // heads) ** -0.5 if scale is None else scale

  def ref(p, x):
    q, k, v = (jnp.einsum("bnc,chd->bnhd", x, p[n]["kernel"]) for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k) * c, axis=-1)
    y = jnp.einsum("bhij,bjhd->bihd", att, v)
    return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]

  ours = lambda p, x: mixer.apply({"params": p}, x)  # noqa: E731
  value_and_grads = lambda f: jax.jit(lambda p, x: (f(p, x), jax.grad(  # noqa: E731
      lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(p, x)))(params, x)
  (y, grads), (y_ref, grads_ref) = value_and_grads(ours), value_and_grads(ref)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               grads, grads_ref)


TINY = dict(num_classes=3, embed_dim=16, depth=1, num_heads=2, token_dim=8)


def test_performer_layer_random_features_are_frozen_orthogonal_and_required():
  """omega is drawn at init as orthogonal rows of norm sqrt(m), in 'batch_stats'; a training
  step (dropout on) leaves it unchanged and it gets no gradient; applying the model without it is
  one clear error."""
  layer = t2t.TokenPerformer(dim=8, kernel_ratio=0.5)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 12)), jnp.float32)

  @jax.jit
  def init_and_step(key, x):
    variables = layer.init(key, x)
    def loss(params, x):
      y, updates = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)})
      return jnp.sum(y ** 2), (y, updates)
    grads, (y, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    return variables, grads, y, updates, layer.apply(variables, x)

  variables, grads, y_train, updates, y_eval = init_and_step(jax.random.key(0), x)
  omega = np.asarray(variables["batch_stats"]["random_features"])
  assert omega.shape == (4, 8) and set(variables["params"]) == {"norm1", "kqv", "proj", "norm2",
                                                                  "mlp"}
  np.testing.assert_allclose(omega @ omega.T, 4 * np.eye(4), atol=1e-4)
  np.testing.assert_array_equal(updates["batch_stats"]["random_features"], omega)
  assert not np.allclose(y_train, y_eval)                        # the fixed 0.1 dropout
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[0]["kqv"]["kernel"]).sum()) > 0
  model = vitjax.create_model("t2t_vit_7", **TINY)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  with pytest.raises(ValueError, match="random features in the 'batch_stats' collection"):
    jax.eval_shape(model.apply, {"params": shapes["params"]}, images)


def test_converter_checks_the_position_table():
  with np.load(os.path.join(GOLDEN, "t2t_vit_7.npz")) as f:
    state = {k[len("state/"):]: f[k] for k in f.files if k.startswith("state/")}
  read = vitjax.convert.official.FAMILIES["t2t"].overrides(state)
  assert read == dict(embed_dim=32, depth=2, mlp_ratio=2.0, qkv_bias=False, tokens_type="performer",
                      token_dim=16, kernel_ratio=0.5, num_classes=10)
  state["pos_embed"] = state["pos_embed"] * 1.01
  with pytest.raises(ValueError, match=r"pos_embed \(1, 10, 32\) is not the sinusoid table"):
    convert.from_official(state, "t2t_vit_7", num_heads=2)


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 32, 32, 3))
  make = functools.partial(vitjax.create_model, "t2t_vit_7", **TINY)
  cases = [
      (dict(tokens_type="performr"), r"Unknown tokens_type='performr'. Did you mean: performer"),
      (dict(strides=(4, 2)), r"kernel_sizes=\(7, 3, 3\), strides=\(4, 2\), paddings=\(2, 1, 1\): "
                             r"allowed values are tuples of one and the same length"),
      (dict(kernel_sizes=(7, 3, 5)), r"soft split 2: kernel_sizes\[2\]=5, strides\[2\]=2, "
                                     r"paddings\[2\]=1; allowed values have 2 \* padding < kernel"),
      (dict(kernel_ratio=0.01), r"kernel_ratio=0.01 gives 0 random features for token_dim=8"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**overrides).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"image size 40x40 is not divisible by the total stride"):
    jax.eval_shape(make().init, jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
