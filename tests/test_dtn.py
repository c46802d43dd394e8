"""DTN (`norm='dtn'`): the op against a plainly written reference (loops over heads and token
pairs; forward and gradients, with a class token, pooling on a large grid and a token mask), its
LayerNorm limit (lambda = 1) and `only_var`, the pooled layer against the official code's
output, the norm in a ViT, the official ViT-T* count and conversion, and clear errors.

Logits of vit_ti16_star_dtn equal the official code's on tests/golden/dtn_vit_ti16_star.npz
(written by experiments/golden/dtn.py from wqshao126/DTN; checked without torch with every other
fixture in tests/test_official.py); the same fixture holds the official pooled layer used here.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.convert.official import dtn as dtn_convert
from vitjax.models import dtn
from vitjax.models.backbone import Tokens
from vitjax.ops import dtn as ops

# 1000 classes at 224 px: the official `sum(p.numel() for p in model.parameters())` of
# vit_norm_ti_star(norm_type='dtn') (wqshao126/DTN, timm 1.0.31 and 0.4.12).
PINNED_COUNTS = {"vit_ti16_star_dtn": (224, 5_710_792)}

FIXTURE = os.path.join(os.path.dirname(__file__), "golden", "dtn_vit_ti16_star.npz")


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_param_count_equals_the_official_ti_star():
  size, count = PINNED_COUNTS["vit_ti16_star_dtn"]
  model = vitjax.create_model("vit_ti16_star_dtn")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  assert _count(shapes) == count
  params = shapes["params"]["Transformer"]
  dtn_norm = params["encoderblock_9"]["LayerNorm_1"]
  assert {k: v.shape for k, v in dtn_norm.items() if k != "pos_proj"} == {
      "scale": (192,), "bias": (192,), "lambda_mean": (4,), "lambda_var": (4,)}
  assert set(params["encoderblock_10"]["LayerNorm_0"]) == {"scale", "bias"}   # LN after the CLS
  assert params["cls_token"].shape == (1, 1, 192)
  assert params["posembed_input"]["pos_embedding"].shape == (1, 196, 192)  # patch tokens only


# ---------------------------------------------------------------------------------------------
# The op against a plainly written reference.

def _reference(x, p, *, grid, heads, prefix=0, eps=1e-5, pool=1, ddof=1, mask=None):
  """DTN written out: the (dx, dy, dx^2 + dy^2) table filled pair by pair, then per head h and
  destination cell j the softmax over the source cells i of w_h . features + b_h and the
  weighted sums; cells are the p x p blocks of the grid (their kept tokens averaged), prefix
  tokens take the LN statistics."""
  b, t, c = x.shape
  d = c // heads
  parts = [x[..., k * d:(k + 1) * d] for k in range(heads)]
  x = jnp.concatenate([v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + eps) for v in parts], -1)
  mu_ln = jnp.mean(x, -1, keepdims=True)
  var_ln = jnp.sum((x - mu_ln) ** 2, -1, keepdims=True) / (c - ddof)
  m = jnp.ones((b, t)) if mask is None else mask.astype(jnp.float32)
  members = {}                                     # cell (row, column) -> its token indices
  for tok in range(grid[0] * grid[1]):
    row, col = divmod(tok, grid[1])
    members.setdefault((row // pool, col // pool), []).append(prefix + tok)
  cells = sorted(members)
  count = {cl: sum(m[:, i] for i in members[cl]) for cl in cells}
  value = {cl: sum(x[:, i] * m[:, i, None] for i in members[cl])
               / jnp.maximum(count[cl], 1)[:, None] for cl in cells}
  n = len(cells)
  feats = np.zeros((n, n, 3), np.float32)          # [i, j]: from source cell i to cell j
  for i, (ri, qi) in enumerate(cells):
    for j, (rj, qj) in enumerate(cells):
      dx, dy = qj - qi, rj - ri
      feats[i, j] = (dx, dy, dx * dx + dy * dy)
  values = jnp.stack([value[cl] for cl in cells], 1)                        # (B, n, C)
  valid = jnp.stack([count[cl] > 0 for cl in cells], 1)                     # (B, n)
  stats = {}
  for k in range(heads):
    v = values[:, :, k * d:(k + 1) * d]
    for j, cl in enumerate(cells):
      s = feats[:, j] @ p["pos_kernel"][:, k] + p["pos_bias"][k]            # scores of each i
      s = jnp.where(valid, s, -1e30)
      e = jnp.exp(s - s.max(1, keepdims=True))
      wts = e / e.sum(1, keepdims=True)                                     # softmax over i
      mean = jnp.einsum("bi,bic->bc", wts, v)
      stats[cl, k] = (mean, jnp.einsum("bi,bic->bc", wts, v * v) - mean ** 2)
  cell_of = []                                     # each patch token takes its cell's statistics
  for tok in range(grid[0] * grid[1]):
    row, col = divmod(tok, grid[1])
    cell_of.append(cells.index((row // pool, col // pool)))
  def per_token(s):                                # (B, h*w, C)
    return jnp.stack([jnp.concatenate([stats[cl, k][s] for k in range(heads)], -1)
                      for cl in cells], 1)[:, np.array(cell_of)]
  def mix(logit, ln, inst):                        # prefix tokens: the LN statistic
    if logit is None:
      return ln * jnp.ones(c)
    a = jnp.repeat(1 / (1 + jnp.exp(-logit)), d)
    patches = a * ln[:, prefix:] + (1 - a) * inst
    return jnp.concatenate([ln[:, :prefix] * jnp.ones(c), patches], 1)
  mu = mix(p["lambda_mean"], mu_ln, per_token(0))
  var = mix(p["lambda_var"], var_ln, per_token(1))
  return p["scale"] * (x - mu) / jnp.sqrt(var + eps) + p["bias"]


def _random_params(rng, c, heads):
  p = {"scale": 1 + 0.3 * rng.standard_normal(c), "bias": 0.3 * rng.standard_normal(c),
       "lambda_mean": 1.5 * rng.standard_normal(heads),
       "lambda_var": 1.5 * rng.standard_normal(heads),
       "pos_kernel": 0.5 * rng.standard_normal((3, heads)), "pos_bias": rng.standard_normal(heads)}
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


CASES = {   # grid, heads, prefix, pool_size (-> p), masked
    "cls_token": ((2, 3), 2, 1, 14, False),
    "pooled_masked": ((4, 6), 3, 1, 3, True),     # p = 6 // 3 = 2: 2 x 3 cells
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_reference_forward_and_gradient(case):
  grid, heads, prefix, pool_size, masked = CASES[case]
  rng = np.random.default_rng(0)
  c, t = 6 * heads, prefix + grid[0] * grid[1]
  x = jnp.asarray(1.5 * rng.standard_normal((2, t, c)) + 0.5, jnp.float32)
  p = _random_params(rng, c, heads)
  mask = None
  if masked:       # the whole first cell (patch tokens 0, 1, 6, 7) dropped in example 0
    keep = rng.random((2, t)) > 0.3
    keep[0, prefix + np.array([0, 1, 6, 7])] = False
    keep[:, :prefix] = keep[1, :] = True
    mask = jnp.asarray(keep)
  pool = ops.pool_factor(grid, pool_size)
  def ours(p, x):
    return ops.dtn(x, p["scale"], p["bias"], p["lambda_mean"], p["lambda_var"], p["pos_kernel"],
                   p["pos_bias"], grid=grid, num_heads=heads, num_prefix=prefix,
                   pool_size=pool_size, mask=mask)

  def ref(p, x):
    return _reference(x, p, grid=grid, heads=heads, prefix=prefix, pool=pool, mask=mask)

  w = jnp.asarray(rng.standard_normal((2, t, c)), jnp.float32)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x: (jnp.sum(f(p, x) * w), f(p, x)), argnums=(0, 1), has_aux=True))
  ours_vg = value_and_grad(ours)
  (_, y_ours), g_ours = ours_vg(p, x)
  (_, y_ref), g_ref = value_and_grad(ref)(p, x)
  np.testing.assert_allclose(y_ours, y_ref, atol=2e-5, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4), g_ours, g_ref)
  assert float(jnp.abs(g_ours[0]["pos_kernel"]).max()) > 1e-3      # positions matter
  if masked:   # dropped tokens leave every kept token's output alone
    (_, y_moved), _ = ours_vg(p, jnp.where(mask[..., None], x, x + 3.0))
    np.testing.assert_allclose(jnp.where(mask[..., None], y_moved, 0),
                               jnp.where(mask[..., None], y_ours, 0), atol=1e-5)


def test_lambda_one_is_layernorm():
  """lambda = lambda' = 1 (saturated sigmoid): one head, ddof 0 -> LayerNorm; several heads and
  the official ddof 1 -> sqrt((C-1)/C) LayerNorm(eps (C-1)/C) of the head-wise RMS-prenormalised
  tokens. Prefix tokens always get that, whatever lambda. `only_var` is lambda = 1 for the
  mean."""
  rng = np.random.default_rng(1)
  c, heads, eps = 12, 3, 1e-5
  x = jnp.asarray(2.0 * rng.standard_normal((2, 1 + 12, c)) + 1.0, jnp.float32)
  p = _random_params(rng, c, heads)
  ln = lambda y, e: nn.LayerNorm(epsilon=e).apply(  # noqa: E731
      {"params": {"scale": p["scale"], "bias": p["bias"]}}, y)

  @jax.jit
  def outputs(x, p):
    run = lambda p, h, **kw: ops.dtn(x, p["scale"], p["bias"], p["lambda_mean"],  # noqa: E731
                                     p["lambda_var"], p["pos_kernel"], p["pos_bias"],
                                     grid=(3, 4), num_heads=h, num_prefix=1, **kw)
    one = dict(p, lambda_mean=jnp.full((1,), 100.0), lambda_var=jnp.full((1,), 100.0),
               pos_kernel=p["pos_kernel"][:, :1], pos_bias=p["pos_bias"][:1])
    sat = dict(p, lambda_mean=jnp.full((heads,), 100.0), lambda_var=jnp.full((heads,), 100.0))
    xh = x.reshape(2, 13, heads, c // heads)
    pre = (xh / jnp.sqrt(jnp.mean(xh * xh, -1, keepdims=True) + eps)).reshape(x.shape)
    expected = p["bias"] + (ln(pre, eps * (c - 1) / c) - p["bias"]) * np.sqrt((c - 1) / c)
    mean_ln = dict(p, lambda_mean=jnp.full((heads,), 100.0))
    return (run(one, 1, ddof=0, eps=1e-12), ln(x, 1e-12), run(sat, heads), expected,
            run(p, heads), run(dict(p, lambda_mean=None), heads), run(mean_ln, heads))

  one_head, layernorm, saturated, expected, mixed, only_var, mean_ln = outputs(x, p)
  np.testing.assert_allclose(one_head, layernorm, atol=2e-5)
  np.testing.assert_allclose(saturated, expected, atol=2e-5)
  np.testing.assert_allclose(mixed[:, 0], expected[:, 0], atol=2e-5)        # the class token
  assert float(jnp.abs(mixed[:, 1:] - expected[:, 1:]).max()) > 1e-2        # patches: not LN
  np.testing.assert_allclose(only_var, mean_ln, atol=1e-6)     # only_var: mu = mu_LN (lambda = 1)


def test_pool_factor_and_relative_features():
  assert [ops.pool_factor(g) for g in [(14, 14), (7, 7), (16, 16), (28, 28), (56, 56),
                                      (28, 56)]] == [1, 1, 1, 2, 4, 4]
  f = ops.relative_features(2, 3)
  # token 1 = (column 1, row 0), token 5 = (column 2, row 1): from 1 to 5 is (dx, dy) = (1, 1)
  np.testing.assert_array_equal(f[1, 5], [1, 1, 2])
  np.testing.assert_array_equal(f[5, 1], [-1, -1, 2])
  kernel, covered = ops.locality_init(5)            # k = 2: heads 0..3, head 4 keeps its init
  np.testing.assert_array_equal(covered, [True] * 4 + [False])
  np.testing.assert_array_equal(kernel[:, 2], [1, -1, -1])   # a = 0, b = 1: peak at (.5, -.5)


def test_pooled_layer_matches_the_official_code():
  """The official DTN(8, group_num=2, resolution=(28, 28)) ('dtn_pool': statistics on the
  2x2-pooled grid), perturbed weights, stored in the golden fixture."""
  with np.load(FIXTURE) as f:
    data = {k: f[k] for k in f.files if k.startswith("pool/")}
  state = {k[len("pool/state/"):]: v for k, v in data.items() if k.startswith("pool/state/")}
  layer, variables = dtn_convert.layer_from_official(state)
  x = data["pool/input"].astype(np.float32)
  y = jax.jit(lambda v, x: layer.apply(v, x, tokens=Tokens(x, grid=(28, 28))))(variables, x)
  np.testing.assert_allclose(np.asarray(y), data["pool/output"], atol=1e-4, rtol=1e-4)
  assert float(np.abs(variables["params"]["lambda_var"]).max()) > 0.5      # perturbed mixing


def test_dtn_norm_in_any_vit_trains_and_takes_the_blocks_heads():
  model = vitjax.create_model("vit_nano4", norm="dtn", num_classes=3, depth=1, width=12,
                              mlp_dim=24, num_heads=3, head_zero_init=False,
                              norm_kwargs=dict(pool_size=2))           # 4x4 grid -> 2x2 cells
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  norm = variables["params"]["Transformer"]["encoderblock_0"]["LayerNorm_0"]
  assert norm["lambda_var"].shape == (3,) and norm["pos_proj"]["kernel"].shape == (3, 3)
  # the official locality init: k = floor(sqrt(3)) = 1 local head, w = (0, 0, -1); zero mixing
  np.testing.assert_array_equal(norm["pos_proj"]["kernel"][:, 0], [0, 0, -1])
  assert float(jnp.abs(norm["lambda_mean"]).max()) == 0 and float(norm["scale"].min()) == 1
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(
      variables["params"])
  g = grads["Transformer"]["encoderblock_0"]["LayerNorm_0"]   # (LayerNorm_1 reaches the logits
  # only through the class token, which takes the LN statistics alone)
  assert all(float(jnp.abs(g[k]).max()) > 0 for k in ("lambda_mean", "lambda_var"))
  assert float(jnp.abs(g["pos_proj"]["kernel"]).max()) > 0


def test_only_var_state_dict_converts():
  """An official 'dtn_var' model (no mean_norm_weight) converts into norm_kwargs only_var."""
  with np.load(FIXTURE) as f:
    state = {k[len("state/"):]: f[k] for k in f.files if k.startswith("state/")
             and not k.endswith("mean_norm_weight")}
  model, variables, meta = convert.from_official(state, "vit_norm_ti_star")
  assert meta["model_overrides"]["norm_kwargs"] == {"only_var": True}
  assert model.depth == 3 and model.cls_blocks == 1 and model.num_heads == 4 and not model.qkv_bias
  norm = variables["params"]["Transformer"]["encoderblock_0"]["LayerNorm_0"]
  assert "lambda_mean" not in norm and "lambda_var" in norm


def test_bad_input_gets_one_clear_error():
  nano = functools.partial(vitjax.create_model, "vit_nano4", norm="dtn", depth=1, width=12,
                           mlp_dim=24, num_heads=3, num_classes=2)
  cases = [   # model, image size, message
      (nano(token_reduction="random", reduction_blocks=(0,), keep_ratio=0.5), 16,
       "norm 'dtn' needs the tokens on a 2-D grid"),
      (nano(norm_kwargs=dict(num_heads=5)), 16, "num_heads=5 must divide the width 12"),
      (nano(norm_kwargs=dict(ddof=2)), 16, r"ddof=2; allowed values are 0 and 1"),
      (nano(norm_kwargs=dict(pool_size=2)), 20,
       r"5x5 token grid is pooled by p = 5 // pool_size=2 = 2 .* does not divide both sides"),
      (nano(norm_kwargs=dict(pool=3)), 16, r"Unknown norm 'dtn' field\(s\) \['pool'\]"),
      (vitjax.create_model("vit_ti16_star_dtn", cls_blocks=0), 32,
       r"cls_blocks=0: allowed values are 1..12"),
  ]
  for model, size, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 1)))
  layer = dtn.DynamicTokenNorm(num_heads=2)
  with pytest.raises(ValueError, match="needs the tokens on a 2-D grid"):
    jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 4, 4)),
                   tokens=Tokens(jnp.zeros((1, 4, 4))))
  with pytest.raises(ValueError, match=r"norm 'dtn' needs num_heads"):    # no block to take it from
    jax.eval_shape(dtn.DynamicTokenNorm().init, jax.random.key(0), jnp.zeros((1, 4, 4)),
                   tokens=Tokens(jnp.zeros((1, 4, 4)), grid=(2, 2)))
