"""ShiftAddViT: parameter counts equal the official models'; the binary attention against its
N x N matrix definition (KSH and mean codes, 'add' and 'dot' products, forward and gradients); KSH
codes and the hash fit against plain loops; shift weights exactly signed powers of two; every
straight-through gradient against its definition; the MoE layer against a per-token reference
with its LL-loss; the explicit KSH fit in a model; the runner adding the sown balance loss; the
ViT -> ShiftAdd reparameterization.

Logits equal the official code's (GATECH-EIC/ShiftAddViT) with the same weights; that check needs
the official repository and is recorded in the module docstring of vitjax/models/pvt.py.
"""
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vitjax
from vitjax import train
from vitjax.convert import shiftadd as convert
from vitjax.models import shiftadd
from vitjax.models.shiftadd import MoELinear, ShiftAddAttention, ShiftMlpBlock
from vitjax.ops import shiftadd as ops

# 1000 classes; the official `sum(p.numel() for p in model.parameters())` of pvt_v2_b{0,1,2} with
# attn_type='LinAngular' (the configs' KSH attention), with and without --moe_attn --moe_mlp
# (measured by building the official models). The counts do not depend on the image size.
PINNED_COUNTS = {
    "shiftadd_pvt_v2_b0": (224, 6_771_484),
    "shiftadd_pvt_v2_b0_linangular": (224, 3_136_472),
    "shiftadd_pvt_v2_b1": (224, 26_386_812),
    "shiftadd_pvt_v2_b1_linangular": (224, 11_891_512),
    "shiftadd_pvt_v2_b2": (224, 49_519_527),
    "shiftadd_pvt_v2_b2_linangular": (224, 20_367_897),
}
RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _random_variables(module, *args, **kwargs):
  """Variables of `module` drawn at random without running init (no compile): shift exponents
  in [-8, 0], signs in [-1, 1], norms off identity, biases non-zero, KSH anchors unit vectors."""
  shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(
      jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)))
  out = {}
  for path, leaf in shapes.items():
    shape, name = leaf.shape, path[-1]
    if name == "shift":
      value = RNG.uniform(-8.0, 0.0, shape)
    elif name == "sign":
      value = RNG.uniform(-1.0, 1.0, shape)
    elif name == "scale":
      value = 1.0 + 0.2 * RNG.normal(size=shape)
    elif name == "anchor":
      value = RNG.normal(size=shape)
      value /= np.linalg.norm(value, axis=-1, keepdims=True)
    elif name == "mvec":
      value = 0.3 + 0.1 * RNG.normal(size=shape)
    else:
      fan_in = np.prod(shape[:-1])
      value = RNG.normal(size=shape) * (0.3 if len(shape) < 2 else 1.0 / np.sqrt(fan_in))
    out[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  size, pinned = PINNED_COUNTS[name]
  del size   # convolutions and linear layers only: the count is the same at 32 px
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == pinned


# ---------------------------------------------------------------------------------------------
# Straight-through estimators and shift weights against their definitions.

def test_binarizers_and_fixed_point_forward_and_ste_gradients():
  y = jnp.array([-0.5, 0.0, 0.2, 0.99, 1.0, 3.0])
  g = jnp.arange(1.0, 7.0)
  assert ops.binarize_ste(y).tolist() == [0, 0, 1, 1, 1, 1]
  np.testing.assert_array_equal(jax.grad(lambda y: jnp.sum(g * ops.binarize_ste(y)))(y),
                                g * ((y > 0) & (y < 1)))
  x = _normal(2, 3, 4)
  codes = ops.mean_codes(x)
  np.testing.assert_array_equal(codes, x > x.mean(axis=(1, 2), keepdims=True))
  gx = _normal(2, 3, 4)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(gx * ops.mean_codes(x)))(x),
                                gx * ((x > 0) & (x < 1)))
  f = ops.fixed_point(x)
  assert bool(jnp.all((f <= x) & (f > x - 2.0 ** -16)))
  np.testing.assert_array_equal(f * 2 ** 16, jnp.round(f * 2 ** 16))
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(gx * ops.fixed_point(x)))(x), gx)
  assert ops.fixed_point(jnp.array([4e4, -4e4])).tolist() == [2 ** 15 - 1, -2 ** 15]


def test_shift_weights_are_signed_powers_of_two_with_deepshift_gradients():
  shift, sign = _normal(6, 5, scale=8.0) - 6.0, _normal(6, 5)
  w = ops.shift_weight(shift, sign)
  nonzero = np.asarray(w)[np.asarray(w) != 0]
  mantissa, exponent = np.frexp(np.abs(nonzero))
  np.testing.assert_array_equal(mantissa, 0.5)                 # exactly 2^p
  assert exponent.min() - 1 >= -14 and exponent.max() - 1 <= 0
  np.testing.assert_array_equal(w, np.exp2(np.round(np.clip(shift, -14, 0)))
                                * np.sign(np.round(sign)))
  G = _normal(6, 5)
  g_shift, g_sign = jax.grad(lambda p, s: jnp.sum(G * ops.shift_weight(p, s)), (0, 1))(shift, sign)
  np.testing.assert_allclose(g_shift, G * np.sign(np.round(sign))
                             * np.exp2(np.round(np.clip(shift, -14, 0))) * math.log(2), rtol=1e-6)
  np.testing.assert_array_equal(g_sign, G)
  # The reparameterization rounds |w| to the nearest power of two in log2.
  rng = np.random.default_rng(1)
  dense = jnp.asarray(rng.uniform(1e-3, 1.0, 40) * rng.choice([-1.0, 1.0], 40), jnp.float32)
  back = ops.shift_weight(*ops.shift_from_weight(dense))
  ratio = np.log2(np.abs(back) / np.abs(dense))
  assert np.all(np.abs(ratio) <= 0.5 + 1e-6) and np.all(np.sign(back) == np.sign(dense))


# ---------------------------------------------------------------------------------------------
# KSH codes and the hash fit.

def _ksh_state(h, d, m=5, nbits=4):
  return dict(A=_normal(h, nbits, m), mvec=0.3 + _normal(1, h, 1, m, scale=0.1),
              anchor=_unit(_normal(1, h, m, d)))


def test_ksh_projection_matches_a_direct_loop():
  x = _unit(_normal(2, 2, 7, 4))
  state = _ksh_state(2, 4)
  got = ops.ksh_project(x, **state)
  xs, anchor = np.asarray(x), np.asarray(state["anchor"])
  sq = np.zeros((2, 2, 7, 5))
  for b, h, n, j in np.ndindex(sq.shape):
    sq[b, h, n, j] = np.sum((xs[b, h, n] - anchor[0, h, j]) ** 2)
  kern = np.exp(-sq / (2 * sq.mean(axis=(2, 3), keepdims=True))) - np.asarray(state["mvec"])
  want = np.einsum("bhnm,hkm->bhnk", kern, np.asarray(state["A"]))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(ops.ksh_codes(x, **state), want > 0)


def _ksh_fit_reference(x, A0, anchor_index, topk, lr, momentum, iterations):
  """The official KernelSH.train_hashing_weight_woeig in float64 numpy, with the smooth loss's
  gradient written out and torch's Nesterov SGD step."""
  x, A = np.asarray(x, np.float64), np.array(A0, np.float64)
  b, h, n, _ = x.shape
  nbits = A.shape[1]
  s = np.zeros((b, h, n, n))
  cos = np.einsum("bhnd,bhld->bhnl", x, x)
  for i in np.ndindex(b, h, n):
    s[i][np.argsort(-cos[i])[:topk]] = 1.0
    s[i][np.argsort(cos[i])[:topk]] = -1.0
  anchor = x[:1, :, anchor_index]
  sq = ((x[:, :, :, None] - anchor[:, :, None]) ** 2).sum(-1)
  kern = np.exp(-sq / (2 * sq.mean(axis=(2, 3), keepdims=True)))
  mvec = kern.mean(axis=(0, 2), keepdims=True)
  kk = kern - mvec
  s = s * nbits
  loss = lambda y: np.mean(-np.einsum("bhn,bhnl,bhl->bh", y, s, y) / (n * nbits))  # noqa: E731
  for r in range(nbits):
    a0 = A[:, r].copy()
    a, buf = a0.copy(), np.zeros_like(a0)
    for _ in range(iterations):
      y = np.tanh(np.einsum("bhnm,hm->bhn", kk, a) / 2)            # 2 sigmoid(z) - 1
      dy = -np.einsum("bhnl,bhl->bhn", s + np.swapaxes(s, 2, 3), y) / (n * nbits * b * h)
      g = np.einsum("bhnm,bhn->hm", kk, dy * (1 - y ** 2) / 2)
      buf = momentum * buf + g
      a = a - lr * (g + momentum * buf)
    sign = lambda a: np.where(np.einsum("bhnm,hm->bhn", kk, a) > 0, 1.0, -1.0)  # noqa: E731
    keep = loss(sign(a)) < loss(sign(a0))
    A[:, r], y = (a, sign(a)) if keep else (a0, sign(a0))
    s = s - np.einsum("bhn,bhl->bhnl", y, y)
  return A, mvec, anchor


def test_ksh_fit_matches_the_official_algorithm():
  x = _unit(_normal(2, 2, 12, 4))
  A0 = _normal(2, 3, 5)
  idx = jnp.array([3, 0, 7, 11, 5])
  kw = dict(topk=2, lr=2.0, momentum=0.9, iterations=8)
  got = jax.jit(functools.partial(ops.ksh_fit, **kw))(x, jax.random.key(0), A0, anchor_index=idx)
  A, mvec, anchor = _ksh_fit_reference(x, A0, np.asarray(idx), **kw)
  assert not np.allclose(A, A0), "the fit should move some rows (else this test tests nothing)"
  np.testing.assert_allclose(got["A"], A, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["mvec"], mvec, atol=1e-6)
  np.testing.assert_allclose(got["anchor"], anchor, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The attention against its matrix definition.

def _dense_attention(params, state, x, heads, qk_quant):
  """unit(0.5 v + (1/pi) (Q_b K_b^T) v) + T v per head, with the N x N code-agreement matrix
  Q_b K_b^T and the (N, N) Toeplitz matrix T of the 9x1 token convolution, then proj."""
  b, n, c = x.shape
  d = c // heads
  lin = lambda name, x: x @ params[name]["kernel"] + params[name]["bias"]  # noqa: E731
  split = lambda t: t.reshape(b, n, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
  if qk_quant == "ksh":
    v = split(lin("to_v", x))
    qb = kb = ops.ksh_codes(_unit(split(lin("to_qk", x))), **state)
  else:
    q, k, v = (split(t) for t in jnp.split(lin("qkv", x), 3, axis=-1))
    qb, kb = ops.mean_codes(_unit(q)), ops.mean_codes(_unit(k))
  agree = jnp.einsum("bhnk,bhlk->bhnl", qb, kb)                     # (B, H, N, N)
  y = _unit(0.5 * v + jnp.einsum("bhnl,bhld->bhnd", agree, v) / math.pi)
  kernel = params["dconv"]                                          # (K, H)
  r = kernel.shape[0] // 2
  offset = np.arange(n)[None, :] - np.arange(n)[:, None]            # l - n
  toeplitz = jnp.where(np.abs(offset)[None] <= r,
                       kernel.T[:, np.clip(offset + r, 0, 2 * r)], 0.0)   # (H, N, N)
  y = y + jnp.einsum("hnl,bhld->bhnd", toeplitz, v)
  return lin("proj", y.transpose(0, 2, 1, 3).reshape(b, n, c))


@pytest.mark.parametrize("qk_quant,impl", [("ksh", "add"), ("mean", "dot")])
def test_attention_matches_its_matrix_definition(qk_quant, impl):
  heads, x = 2, _normal(2, 11, 8)
  mixer = ShiftAddAttention(num_heads=heads, qk_quant=qk_quant, matmul_impl=impl, nbits=6,
                            num_anchors=5)
  variables = _random_variables(mixer, x)
  params = variables["params"]
  state = variables.get("ksh", {})
  extra = {"ksh": state} if state else {}

  def ours(params, x):
    return mixer.apply({"params": params, **extra}, x)

  def loss(fn, params, x):
    y = fn(params, x)
    return jnp.sum(jnp.sin(3 * y)), y

  def value_and_grad(fn):
    return jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1), has_aux=True))(
        params, x)

  ref = functools.partial(_dense_attention, state=state, heads=heads, qk_quant=qk_quant)
  (_, y_ours), g_ours = value_and_grad(ours)
  (_, y_ref), g_ref = value_and_grad(lambda p, x: ref(p, x=x))
  np.testing.assert_allclose(y_ours, y_ref, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), g_ours, g_ref)
  assert float(jnp.abs(g_ours[0]["to_qk" if qk_quant == "ksh" else "qkv"]["kernel"]).max()) > 0


def test_attention_rejects_bad_fields():
  x = _normal(1, 4, 8)
  for field, value, match in [("qk_quant", "kshh", r"qk_quant='kshh'.*ksh, mean"),
                              ("linear", "shfit", r"linear='shfit'.*dense, shift, moe"),
                              ("matmul_impl", "mul", r"matmul_impl='mul'.*add, dot"),
                              ("res_kernel_size", 4, r"res_kernel_size=4"),
                              ("num_heads", 3, r"width 8 is not divisible by num_heads=3")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(ShiftAddAttention(**{"num_heads": 2, field: value}).init,
                     jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"4 tokens do not fit grid=\(3, 3\)"):
    jax.eval_shape(functools.partial(ShiftAddAttention(num_heads=2).init, grid=(3, 3)),
                   jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# The multiply/shift mixture of experts.

def test_moe_matches_per_token_experts_with_ll_loss_and_ste_gate():
  x = _normal(2, 9, 6)
  layer = MoELinear(5, moe_loss_weight=0.5)
  params = _random_variables(layer, x)["params"]
  y, sown = jax.jit(lambda p: layer.apply({"params": p}, x, mutable=["aux_loss"]))(params)
  p = jax.tree.map(np.asarray, params)
  logits = np.asarray(x) @ p["gate"]["kernel"] + p["gate"]["bias"]
  multiply = (logits[..., 0] >= logits[..., 1])[..., None]
  y0 = np.asarray(x) @ p["experts_0"]["kernel"] + p["experts_0"]["bias"]
  w1 = np.exp2(np.round(np.clip(p["experts_1"]["shift"], -14, 0))) * np.sign(
      np.round(p["experts_1"]["sign"]))
  fixed = lambda t: np.floor(t * 2.0 ** 16) / 2.0 ** 16  # noqa: E731
  y1 = fixed(np.asarray(x)) @ w1 + fixed(p["experts_1"]["bias"])
  np.testing.assert_allclose(y, np.where(multiply, y0, y1), atol=1e-5)
  assert 0 < multiply.mean() < 1, "both experts should be used"
  # LL-loss: cv^2 of the latency-weighted importance and smooth load (sigma = 1/2).
  flat = logits.reshape(-1, 2)
  probs = np.exp(flat) / np.exp(flat).sum(-1, keepdims=True)
  alpha = np.array([6.0, 4.0])
  importance = alpha * probs.sum(0)
  phi = np.vectorize(lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0))))
  load = alpha * phi((flat - flat[:, ::-1]) / 0.5).sum(0)
  cv2 = lambda t: np.var(t, ddof=1) / (np.mean(t) ** 2 + 1e-10)  # noqa: E731
  np.testing.assert_allclose(sown["aux_loss"]["balance"][0], 0.5 * (cv2(importance) + cv2(load)),
                             rtol=1e-5)
  # The gate passes weight 1 forward and the chosen probability's gradient backward.
  c = _normal(2, 9, 5)

  def chosen(gate):
    probs = jax.nn.softmax(x @ gate["kernel"] + gate["bias"], -1)
    return jnp.max(probs, -1, keepdims=True)

  def out(gate):
    return layer.apply({"params": {**params, "gate": gate}}, x)

  g_ste = jax.jit(jax.grad(lambda gate: jnp.sum(c * out(gate))))(params["gate"])
  g_def = jax.jit(jax.grad(
      lambda gate: jnp.sum(c * jax.lax.stop_gradient(out(gate)) * chosen(gate))))(params["gate"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_ste, g_def)
  assert float(jnp.abs(g_ste["kernel"]).max()) > 0


# ---------------------------------------------------------------------------------------------
# Models: the explicit KSH fit, the runner's aux loss, the ViT reparameterization.

def _tiny_vit(**kw):
  return vitjax.create_model("vit_nano4", num_classes=3, depth=1, width=16, mlp_dim=32,
                             num_heads=2, head_zero_init=False, **kw)


@pytest.fixture(scope="module")
def vit():
  """A tiny ViT, its random params, images and logits; its MoE-MLP form (with standard
  attention, no hash state: the runner can train it) and its full ShiftAdd form (KSH, MoE
  everywhere), each with its reparameterized variables (`from_vit`)."""
  x = _normal(4, 8, 8, 1)
  model = _tiny_vit()
  params = _random_variables(model, x)["params"]
  moe = _tiny_vit(block=ShiftMlpBlock, mixer="mhsa")
  full = _tiny_vit(**convert.vit_overrides(num_anchors=4, topk=2))
  return dict(x=x, params=params, logits=jax.jit(model.apply)({"params": params}, x), moe=moe,
              moe_variables=convert.from_vit(params, _random_variables(moe, x)), full=full,
              full_variables=convert.from_vit(params, _random_variables(full, x)))


def test_vit_reparameterization(vit):
  # The multiply experts hold the ViT's MLP: routed there, the model is the ViT.
  variables = jax.tree.map(lambda a: a, vit["moe_variables"])
  mlp = variables["params"]["Transformer"]["encoderblock_0"]["mlp"]
  for fc in ("fc1", "fc2"):
    mlp[fc]["gate"]["bias"] = jnp.array([50.0, -50.0])
  np.testing.assert_allclose(jax.jit(vit["moe"].apply)(variables, vit["x"]), vit["logits"],
                             atol=1e-5)
  # The full form: to_qk / to_v / proj from query / value / out, experts as above.
  attn = vit["full_variables"]["params"]["Transformer"]["encoderblock_0"]["attn"]
  src = vit["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  np.testing.assert_array_equal(attn["to_qk"]["experts_0"]["kernel"],
                                src["query"]["kernel"].reshape(16, 16))
  np.testing.assert_array_equal(attn["to_v"]["experts_0"]["bias"], src["value"]["bias"].ravel())
  shifted = ops.shift_weight(attn["proj"]["experts_1"]["shift"], attn["proj"]["experts_1"]["sign"])
  dense = src["out"]["kernel"].reshape(16, 16)
  assert np.all(np.abs(np.log2(np.abs(shifted) / np.abs(dense))) <= 0.5 + 1e-6)
  np.testing.assert_array_equal(attn["proj"]["experts_1"]["bias"], src["out"]["bias"])
  deeper = vitjax.create_model("vit_nano4", num_classes=3, depth=2, width=16, mlp_dim=32,
                               num_heads=2, **convert.vit_overrides())
  with pytest.raises(ValueError, match="1 blocks; the target model has 2"):
    convert.from_vit(vit["params"], _random_variables(deeper, vit["x"]))


def test_fit_ksh_fits_each_layer_to_its_input(vit):
  model, variables, x = vit["full"], vit["full_variables"], vit["x"]
  fitted = jax.jit(functools.partial(shiftadd.fit_ksh, model))(variables, x, jax.random.key(1))
  before = variables["ksh"]["Transformer"]["encoderblock_0"]["attn"]
  after = fitted["ksh"]["Transformer"]["encoderblock_0"]["attn"]
  # The layer's input: its `to_qk` output as unit vectors per head.
  _, inter = jax.jit(lambda v: model.apply(
      v, x, capture_intermediates=lambda m, _: m.name == "to_qk", mutable=["intermediates"]))(
          variables)
  qk = inter["intermediates"]["Transformer"]["encoderblock_0"]["attn"]["to_qk"]["__call__"][0]
  qk = _unit(qk.reshape(4, 5, 2, 8).transpose(0, 2, 1, 3))          # (B, H, N, d)
  index = [int(jnp.argmin(jnp.sum((qk[0, 0] - a) ** 2, -1))) for a in after["anchor"][0, 0]]
  want = jax.jit(functools.partial(ops.ksh_fit, topk=2))(qk, None, before["A"],
                                                         anchor_index=jnp.array(index))
  for name in ("anchor", "mvec", "A"):
    np.testing.assert_allclose(after[name], want[name], atol=1e-5)
  assert not np.allclose(after["mvec"], before["mvec"])
  with pytest.raises(ValueError, match="'ksh' collection"):
    jax.eval_shape(model.apply, {"params": variables["params"]}, x)
  with pytest.raises(ValueError, match="no 'ksh' collection"):
    shiftadd.fit_ksh(vit["moe"], vit["moe_variables"], x, jax.random.key(1))


class _MoEClassifier(nn.Module):
  """Flattened images -> one MoE layer -> 3 logits: the smallest model that sows a balance loss."""

  @nn.compact
  def __call__(self, images, *, train=False):
    return MoELinear(3, moe_loss_weight=0.5)(images.reshape(images.shape[0], -1))


def test_runner_adds_the_sown_balance_loss():
  model, x = _MoEClassifier(), _normal(4, 4, 4, 1)
  variables = _random_variables(model, x)
  state = dict(params=variables["params"], opt_state=optax.sgd(0.0).init(variables["params"]),
               step=jnp.zeros((), jnp.int32))
  batch = dict(image=x, label=jnp.array([0, 2, 1, 1]))
  _, (loss, _) = jax.jit(train.make_train_step(model, optax.sgd(0.0)))(state, batch,
                                                                       jax.random.key(3))
  logits, sown = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["aux_loss"]))(variables)
  aux = sown["aux_loss"]["MoELinear_0"]["balance"][0]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  assert float(aux) > 0
  np.testing.assert_allclose(loss, ce + aux, rtol=1e-6)


def test_pvt_rejects_bad_fields():
  x = jnp.zeros((1, 32, 32, 3))
  for fields, match in [(dict(num_heads=(1, 2, 5)), r"num_heads=\(1, 2, 5\) needs one entry per"),
                        (dict(num_heads=(1, 2, 5, 7)), r"embed_dims\[3\]=256 is not divisible"),
                        (dict(mlp_linear="add"), r"mlp_linear='add'"),
                        (dict(qk_quant="sign"), r"qk_quant='sign'")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(vitjax.create_model("shiftadd_pvt_v2_b0", **fields).init,
                     jax.random.key(0), x)
