"""LookupViT: resize, block, model. Dense references are written out plainly below.

Covers the invariants of the reference notes (lookupvit.md §8.3): 1 softmax axes (also in
test_mhbc.py), 2 logit reuse, 3 grid flexibility, 4 identity resize, 5 linearity, 6 block
permutation equivariance, 7 no N^2 term, 8 the analytic FLOPs formula against XLA at small
shapes, 9 pinned parameter counts.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import layers
from vitjax.models import lookupvit as lv
from vitjax.models.backbone import Tokens
from vitjax.ops import resize

KEY = jax.random.key(0)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


# ----------------------------------------------------------------------------- resize (4, 5)

def _bilinear_loop(x, out_h, out_w):
  """Half-pixel bilinear without anti-aliasing, per output pixel (PyTorch align_corners=False)."""
  x = np.asarray(x, np.float64)
  h, w = x.shape[1:3]
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))

  def src(o, n_in, n_out):
    c = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)   # clamp like PyTorch
    i0 = int(np.floor(c))
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, c - i0

  for i in range(out_h):
    y0, y1, fy = src(i, h, out_h)
    for j in range(out_w):
      x0, x1, fx = src(j, w, out_w)
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("out_hw", [(1, 1), (3, 2), (5, 7), (9, 6), (12, 10)])
def test_bilinear_matches_per_pixel_loop(out_hw):
  x = _normal(1, (2, 7, 6, 3))
  np.testing.assert_allclose(resize.resize_2d(x, out_hw, "bilinear"),
                             _bilinear_loop(x, *out_hw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_hw", [(2, 3), (5, 5), (11, 9)])
def test_bilinear_aa_matches_jax_image_resize(out_hw):
  x = _normal(2, (2, 7, 6, 3))
  want = jax.image.resize(x, (2, *out_hw, 3), "bilinear", antialias=True)
  np.testing.assert_allclose(resize.resize_2d(x, out_hw, "bilinear_aa"), want, atol=1e-5)


@pytest.mark.parametrize("method", resize.METHODS)
def test_identity_resize_is_exact(method):
  x = _normal(3, (2, 7, 5, 4))
  np.testing.assert_array_equal(resize.resize_2d(x, (7, 5), method), x)
  np.testing.assert_array_equal(resize.interpolation_matrix(6, 6, method), np.eye(6))


@pytest.mark.parametrize("method", resize.METHODS)
def test_resize_is_linear(method):
  x, pos = _normal(4, (2, 14, 14, 8)), _normal(5, (1, 14, 14, 8))
  lhs = resize.resize_2d(x + pos, (5, 3), method)
  rhs = resize.resize_2d(x, (5, 3), method) + resize.resize_2d(pos, (5, 3), method)
  np.testing.assert_allclose(lhs, rhs, atol=1e-6)
  rows = resize.interpolation_matrix(14, 3, method).sum(axis=1)
  np.testing.assert_allclose(rows, 1.0, atol=1e-12)


def test_resize_bad_method():
  with pytest.raises(ValueError, match="method.*bilinear, bilinear_aa"):
    resize.resize_2d(jnp.zeros((1, 4, 4, 1)), (2, 2), "bicubic")


# ------------------------------------------------------------------ block: dense reference

def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _proj(x, p):     # (B, T, D) -> (B, T, H, d)
  return jnp.einsum("btc,chd->bthd", x, p["kernel"]) + p["bias"]


def _out(y, p):      # (B, T, H, d) -> (B, T, D)
  return jnp.einsum("bthd,hdc->btc", y, p["kernel"]) + p["bias"]


def _softmax(s, axis):
  e = jnp.exp(s - s.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _mlp(x, p):
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / math.sqrt(2.0)))
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _reference_block(p, x_p, x_l, postnorm):
  g = p["gather"]
  head_dim = g["query"]["kernel"].shape[-1]
  q = _proj(_ln(x_p, p["gather_norm_compressed"]), g["query"])
  lk = _ln(x_l, p["gather_norm_lookup"])
  s = jnp.einsum("bmhd,bnhd->bhmn", q, _proj(lk, g["key"])) / math.sqrt(head_dim)
  x_p = x_p + _out(jnp.einsum("bhmn,bnhd->bmhd", _softmax(s, 3), _proj(lk, g["value"])), g["out"])
  c = p["compressed_block"]
  a = c["MultiHeadDotProductAttention_0"]
  h = _ln(x_p, c["LayerNorm_0"])
  qq, kk, vv = (_proj(h, a[n]) for n in ("query", "key", "value"))
  s2 = jnp.einsum("bmhd,bkhd->bhmk", qq, kk) / math.sqrt(qq.shape[-1])
  x_p = x_p + _out(jnp.einsum("bhmk,bkhd->bmhd", _softmax(s2, 3), vv), a["out"])
  x_p = x_p + _mlp(_ln(x_p, c["LayerNorm_1"]), c["MlpBlock_0"])
  v_p = _proj(_ln(x_p, p["propagate_norm"]), p["propagate"]["value"])
  x_l = x_l + _out(jnp.einsum("bhmn,bmhd->bnhd", _softmax(s, 2), v_p), p["propagate"]["out"])
  if postnorm:
    x_l = _ln(x_l, p["lookup_postnorm"])
  x_l = x_l + _mlp(_ln(x_l, p["lookup_mlp_norm"]), p["lookup_mlp"])
  return x_p, x_l


def _block_setup(postnorm=False, m=4, n=10, d=16, impl="auto"):
  block = lv.LookupViTBlock(mlp_dim=32, num_heads=2, lookup_postnorm=postnorm, mhbc_impl=impl)
  x_p, x_l = _normal(10, (2, m, d)), _normal(11, (2, n, d))
  params = block.init(KEY, Tokens(x_p, extra={"lookup": x_l}, grid=(1, m)))["params"]
  # Non-trivial norms and biases, so a misplaced LayerNorm or bias cannot go unnoticed.
  leaves, tree = jax.tree.flatten(params)
  leaves = [l + 0.1 * _normal(100 + i, l.shape) for i, l in enumerate(leaves)]
  return block, jax.tree.unflatten(tree, leaves), x_p, x_l


def _run_block(block, params, x_p, x_l, **kw):
  out = block.apply({"params": params}, Tokens(x_p, extra={"lookup": x_l}, grid=(1, x_p.shape[1])),
                    **kw)
  return out.x, out.extra["lookup"]


@pytest.mark.parametrize("postnorm,impl", [(False, "project"), (True, "project"), (False, "absorb")])
def test_block_matches_dense_reference_forward_and_grad(postnorm, impl):
  block, params, x_p, x_l = _block_setup(postnorm, impl=impl)
  got = _run_block(block, params, x_p, x_l)
  want = _reference_block(params, x_p, x_l, postnorm)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)

  w_p, w_l = _normal(20, x_p.shape), _normal(21, x_l.shape)
  def loss(fn):
    return lambda prm, a, b: sum(jnp.sum(w * o) for w, o in zip((w_p, w_l), fn(prm, a, b)))
  g_got = jax.grad(loss(lambda prm, a, b: _run_block(block, prm, a, b)), (0, 1, 2))(
      params, x_p, x_l)
  g_want = jax.grad(loss(lambda prm, a, b: _reference_block(prm, a, b, postnorm)), (0, 1, 2))(
      params, x_p, x_l)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4), g_got, g_want)


@pytest.mark.parametrize("impl", ["project", "absorb"])
def test_logit_reuse_hook_and_param_tree(impl):
  """Propagate gets the very logits gather returned, re-softmaxed over M; owns only V_p, W_ol."""
  block, params, x_p, x_l = _block_setup(impl=impl)
  calls = {}

  def hook(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module,
                                                         (lv.MHBCGather, lv.MHBCPropagate)):
      calls[type(context.module).__name__] = (args, out)
    return out

  with nn.intercept_methods(hook):
    _run_block(block, params, x_p, x_l)
  (g_args, (_, g_logits)), (p_args, p_out) = calls["MHBCGather"], calls["MHBCPropagate"]
  np.testing.assert_array_equal(p_args[0], g_logits)
  q = _proj(g_args[0], params["gather"]["query"])
  k = _proj(g_args[1], params["gather"]["key"])
  np.testing.assert_allclose(g_logits, jnp.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(8),
                             rtol=1e-5, atol=1e-5)
  v_p = _proj(p_args[1], params["propagate"]["value"])
  want = _out(jnp.einsum("bhmn,bmhd->bnhd", _softmax(g_logits, 2), v_p), params["propagate"]["out"])
  np.testing.assert_allclose(p_out, want, rtol=1e-5, atol=1e-5)

  assert jax.tree.map(jnp.shape, params["propagate"]) == {
      "value": {"kernel": (16, 2, 8), "bias": (2, 8)},
      "out": {"kernel": (2, 8, 16), "bias": (16,)}}
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  qk_owners = {p.split("]")[0] for p in paths if "'query'" in p or "'key'" in p}
  assert qk_owners == {"['gather'", "['compressed_block'"}


def test_auto_mhbc_impl_absorbs_only_where_it_pays():
  """'auto' follows the multiply-add ratio, decided per grid; both forms give the same block."""
  assert lv.use_absorbed("auto", 25, 196, 768, 12)            # B/16 at 5x5: ratio 0.50
  assert not lv.use_absorbed("auto", 49, 196, 768, 12)        # B/16 at 7x7: ratio 0.95
  assert lv.use_absorbed("auto", 9, 49, 96, 3)                # the main job at 3x3: 0.43
  assert not lv.use_absorbed("auto", 16, 49, 96, 3)           # the main job at 4x4: 0.71
  assert lv.use_absorbed("absorb", 49, 196, 768, 12)
  assert not lv.use_absorbed("project", 1, 196, 768, 12)
  for m in (1, 4):                                            # ratios 0.21 and 0.72 here
    block, params, x_p, x_l = _block_setup(m=m)
    assert lv.use_absorbed("auto", m, 10, 16, 2) == (m == 1)
    outs = [_run_block(block.clone(mhbc_impl=impl), params, x_p, x_l)
            for impl in ("project", "absorb", "auto")]
    for other in outs[1:]:
      for g, w in zip(other, outs[0]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_block_sows_logits():
  block, params, x_p, x_l = _block_setup()
  _, state = block.apply({"params": params}, Tokens(x_p, extra={"lookup": x_l}, grid=(1, 4)),
                         mutable=["intermediates"])
  (logits,) = state["intermediates"]["mhbc_logits"]
  assert logits.shape == (2, 2, 4, 10)                      # (B, H, M, N)


def test_block_permutation_equivariance():
  block, params, x_p, x_l = _block_setup()
  perm = np.random.default_rng(0).permutation(x_l.shape[1])
  out_p, out_l = _run_block(block, params, x_p, x_l)
  perm_p, perm_l = _run_block(block, params, x_p, x_l[:, perm])
  np.testing.assert_allclose(perm_p, out_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(perm_l, out_l[:, perm], rtol=1e-5, atol=1e-5)


def test_block_needs_lookup_stream():
  block, params, x_p, _ = _block_setup()
  with pytest.raises(ValueError, match=r"tokens.extra\['lookup'\]"):
    block.apply({"params": params}, Tokens(x_p, grid=(1, 4)))


def _block_flops(n, m=4, d=32, impl="project"):
  block = lv.LookupViTBlock(mlp_dim=4 * d, num_heads=2, mhbc_impl=impl)
  tokens = Tokens(jnp.zeros((1, m, d)), extra={"lookup": jnp.zeros((1, n, d))}, grid=(1, m))
  params = jax.eval_shape(block.init, KEY, tokens)
  return jax.jit(block.apply).lower(params, tokens).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("impl", ["project", "absorb"])
def test_no_quadratic_term_in_lookup_tokens(impl):
  """With M fixed, block FLOPs are affine in N: going 2N -> 4N adds twice what N -> 2N adds."""
  n, d = 64, 32
  f1, f2, f4 = (_block_flops(k * n, d=d, impl=impl) for k in (1, 2, 4))
  # A lookup self-attention would add 2 N^2 D MACs = c N^2 FLOPs with c = 4 D, which makes
  # (f4 - f2) - 2 (f2 - f1) = 6 c N^2; the measured gap must be a tiny fraction of that.
  assert abs((f4 - f2) - 2 * (f2 - f1)) < 0.02 * 6 * (4 * d) * n * n
  assert 1.95 < (f4 - f2) / (f2 - f1) < 2.05
  assert 1.5 < f2 / f1 <= 2.0      # doubling N at most doubles the block (the M part is fixed)


# ---------------------------------------------------------------------------------- model

def _tiny(**kw):
  cfg = dict(num_classes=5, image_size=16, patch_size=4, width=32, depth=2, mlp_dim=64,
             num_heads=2, head_zero_init=False)
  cfg.update(kw)
  return lv.LookupViT(**cfg)


# Model-level tests run eagerly on one tiny model (lookup grid 4x4, default grid 2x2): eager ops
# share their compiled kernels across calls, which is far cheaper here than one jit per test.
IMAGES = _normal(30, (2, 16, 16, 3))
MODEL = _tiny()


@functools.lru_cache(maxsize=None)
def _variables():
  return MODEL.init(KEY, IMAGES)


@functools.lru_cache(maxsize=None)
def _run(grid):
  """(logits, intermediates) of the shared tiny model at `grid`."""
  logits, state = MODEL.apply(_variables(), IMAGES, grid=grid, mutable=["intermediates"])
  return logits, state["intermediates"]


def test_grid_flexibility_one_param_tree():
  v_full = MODEL.init(KEY, IMAGES, grid=(4, 4))
  jax.tree.map(np.testing.assert_array_equal, _variables(), v_full)  # byte-identical
  for grid in [(1, 1), (2, 3), (4, 4)]:                              # (2, 3): never initialised
    logits, _ = _run(grid)
    assert logits.shape == (2, 5)
    assert bool(jnp.isfinite(logits).all())
  assert float(jnp.abs(_run((1, 1))[0] - _run((4, 4))[0]).max()) > 1e-4
  # The `grid` field is the default budget; a call's `grid` overrides it.
  np.testing.assert_array_equal(_tiny(grid=(2, 3)).apply(_variables(), IMAGES), _run((2, 3))[0])
  np.testing.assert_array_equal(MODEL.apply(_variables(), IMAGES), _run((2, 2))[0])


def test_grid_is_static_under_jit():
  apply = jax.jit(MODEL.apply, static_argnames="grid")
  np.testing.assert_allclose(apply(_variables(), IMAGES, grid=(1, 1)), _run((1, 1))[0],
                             rtol=1e-5, atol=1e-5)


def test_model_shapes_and_identity_compression():
  for grid, m in [((4, 4), 16), ((2, 3), 6)]:
    _, inter = _run(grid)
    (x_p,), (x_l,) = inter["compressed_tokens"], inter["lookup_tokens"]
    assert x_p.shape == (2, m, 32) and x_l.shape == (2, 16, 32)
    logits = inter["Transformer"]["encoderblock_0"]["mhbc_logits"][0]
    assert logits.shape == (2, 2, m, 16)
    if grid == (4, 4):
      np.testing.assert_array_equal(x_p, x_l)                        # invariant 4
  # A smaller grid is the bilinear resize of the same (position-augmented) lookup map.
  (x_l,), (x_p,) = _run((2, 3))[1]["lookup_tokens"], _run((2, 3))[1]["compressed_tokens"]
  want = _bilinear_loop(x_l.reshape(2, 4, 4, 32), 2, 3).reshape(2, 6, 32)
  np.testing.assert_allclose(x_p, want, rtol=1e-5, atol=1e-5)


def _patch_embed_reference(images, kernel, bias, p):
  b, h, w, c = images.shape
  patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return jnp.einsum("bijuvc,uvcd->bijd", patches, kernel) + bias    # (B, h/p, w/p, D)


def test_position_table_is_resized_for_other_image_sizes():
  variables = _variables()
  table = variables["params"]["pos_embedding"]
  assert table.shape == (1, 4, 4, 32)
  emb = variables["params"]["embedding"]
  want = _patch_embed_reference(IMAGES, emb["kernel"], emb["bias"], 4) + table
  np.testing.assert_allclose(_run((2, 2))[1]["lookup_tokens"][0].reshape(2, 4, 4, 32), want,
                             rtol=1e-4, atol=1e-4)
  images = _normal(31, (1, 20, 20, 3))                               # lookup grid 5x5
  _, state = MODEL.apply(variables, images, grid=(2, 2), mutable=["intermediates"])
  x_l = state["intermediates"]["lookup_tokens"][0].reshape(1, 5, 5, 32)
  want = _patch_embed_reference(images, emb["kernel"], emb["bias"], 4) + _bilinear_loop(table, 5, 5)
  np.testing.assert_allclose(x_l, want, rtol=1e-4, atol=1e-4)


def test_sincos_positions_have_no_parameters():
  model = _tiny(posemb="sincos2d")
  variables = jax.eval_shape(model.init, KEY, IMAGES)
  assert "pos_embedding" not in variables["params"]
  pe = layers.posemb_sincos_2d(3, 4, 8)
  # Channel 0 is sin(x * 1), channel 4 is sin(y * 1).
  np.testing.assert_allclose(pe[0, 2, 3, 0], np.sin(3.0), rtol=1e-6)
  np.testing.assert_allclose(pe[0, 2, 3, 4], np.sin(2.0), rtol=1e-6)


def _with_head_source(head_source):
  """The shared variables adapted to `head_source`: final norms of the streams the head reads."""
  params = dict(_variables()["params"])
  params["Transformer"] = dict(params["Transformer"])
  norm = params["Transformer"].pop("encoder_norm")
  if head_source != "lookup":
    params["Transformer"]["encoder_norm"] = norm
  if head_source != "compressed":
    params["lookup_norm"] = jax.tree.map(lambda a: a * 0.5 + 0.1, norm)
  return _tiny(head_source=head_source), {"params": params}


@pytest.mark.parametrize("head_source", lv.HEAD_SOURCES)
def test_head_source(head_source):
  """The head reads the stream it is told to: the last lookup update matters iff it is read."""
  model, variables = _with_head_source(head_source)
  shapes = jax.eval_shape(model.init, KEY, IMAGES)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  params = variables["params"]
  last = dict(params["Transformer"]["encoderblock_1"])
  last["propagate"] = jax.tree.map(lambda a: a + 1.0, last["propagate"])
  last["lookup_mlp"] = jax.tree.map(lambda a: a + 1.0, last["lookup_mlp"])
  changed = {**params, "Transformer": {**params["Transformer"], "encoderblock_1": last}}
  out = model.apply(variables, IMAGES)
  delta = float(jnp.abs(model.apply({"params": changed}, IMAGES) - out).max())
  assert (delta > 1e-4) == (head_source != "compressed")
  if head_source == "compressed":
    np.testing.assert_array_equal(out, _run((2, 2))[0])


def test_train_mode_uses_dropout_rng():
  model = _tiny(dropout=0.5, drop_path=0.5)
  a = model.apply(_variables(), IMAGES, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply(_variables(), IMAGES, train=True, rngs={"dropout": jax.random.key(2)})
  assert a.shape == (2, 5) and float(jnp.abs(a - b).max()) > 0
  np.testing.assert_array_equal(model.apply(_variables(), IMAGES), _run((2, 2))[0])


def _tree(model, images=IMAGES, **kw):
  shapes = jax.eval_shape(functools.partial(model.init, **kw), KEY, images)
  return jax.tree.map(lambda a: (a.shape, a.dtype), shapes)


def test_param_tree_changes_only_when_parameters_differ():
  base = _tree(_tiny())
  same = [dict(attn_impl="auto"), dict(dropout=0.1), dict(drop_path=0.2),
          dict(compress_resize="bilinear_aa"), dict(grid=(1, 3)), dict(mhbc_heads=2),
          dict(lookup_mlp_ratio=0.5), dict(mhbc_impl="absorb"), dict(mhbc_impl="project")]
  for kw in same:
    assert _tree(_tiny(**kw)) == base, kw
  assert _tree(_tiny(), grid=(3, 3)) == base
  post = _tree(_tiny(lookup_postnorm=True))["params"]["Transformer"]["encoderblock_0"]
  assert set(post) - set(base["params"]["Transformer"]["encoderblock_0"]) == {"lookup_postnorm"}
  heads4 = _tree(_tiny(mhbc_heads=4))["params"]["Transformer"]["encoderblock_0"]["gather"]
  assert heads4["query"]["kernel"][0] == (32, 4, 8)
  wide = _tree(_tiny(lookup_mlp_ratio=2.0))["params"]["Transformer"]["encoderblock_0"]
  assert wide["lookup_mlp"]["Dense_0"]["kernel"][0] == (32, 64)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("grid", [(0, 1), (5, 5), (4, 5), (1, 2, 3), "ab", True, -1, (2.5, 2)])
def test_bad_grid(grid):
  model = _tiny()
  variables = jax.eval_shape(model.init, KEY, IMAGES)               # the check precedes any math
  with pytest.raises(ValueError, match="grid"):
    model.apply(variables, IMAGES, grid=grid)


@pytest.mark.parametrize("field,value,allowed", [
    ("head_source", "cls", "compressed, lookup, both_sum"),
    ("posemb", "fixed", "learned, sincos2d"),
    ("compress_resize", "nearest", "bilinear, bilinear_aa"),
    ("lookup_mlp_ratio", 0.0, "> 0"),
    ("mhbc_heads", 3, "divisor"),
    ("lookup_postnorm", "yes", "True or False"),
    ("mhbc_impl", "fast", "auto, project, absorb"),
    ("image_size", 18, "divisible"),
    ("grid", (0, 2), "positive"),
])
def test_bad_config_fields(field, value, allowed):
  with pytest.raises(ValueError, match=field) as err:
    vitjax.create_model("lookupvit_nano4", **{field: value})
  assert allowed in str(err.value)


def test_unknown_field_and_bad_images():
  with pytest.raises(ValueError, match="lookup_ratio"):
    vitjax.create_model("lookupvit_nano4", lookup_ratio=1.0)
  model = _tiny()
  with pytest.raises(ValueError, match="image_size"):
    model.init(KEY, jnp.zeros((1, 18, 18, 3)))


# ---------------------------------------------------------------------- params and FLOPs (8, 9)

def _count(model, size):
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, size, size, 3)))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


def _formula_params(patch, d, depth, mlp_dim, image_size, r_l=0.5, classes=1000):
  """Reference-notes counting: 6 LayerNorms, 10 D x D projections per block, biases everywhere."""
  hidden = round(r_l * d)
  block = (10 * (d * d + d) + (2 * mlp_dim * d + mlp_dim + d) + (2 * hidden * d + hidden + d)
           + 12 * d)
  table = (image_size // patch) ** 2 * d
  return depth * block + (3 * patch * patch * d + d) + table + 2 * d + d * classes + classes


PINNED_COUNTS = {  # name: (count, image_size, spec); worked out by hand with _formula_params
    "lookupvit_ti16": (8_849_320, 224, (16, 192, 12, 768)),
    "lookupvit_s16": (34_507_624, 224, (16, 384, 12, 1536)),
    "lookupvit_b16": (136_254_184, 224, (16, 768, 12, 3072)),   # the reference notes' table
    "lookupvit_l16": (480_866_280, 224, (16, 1024, 24, 4096)),
    "lookupvit_nano4": (2_031_464, 28, (4, 128, 6, 512)),
    "lookupvit_nano2": (2_045_672, 28, (2, 128, 6, 512)),
    "lookupvit_ti4": (8_682_856, 28, (4, 192, 12, 768)),
    "lookupvit_s4": (34_174_696, 28, (4, 384, 12, 1536)),
}


def test_every_registered_lookupvit_is_pinned():
  assert set(vitjax.list_models("lookupvit*")) == set(PINNED_COUNTS)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_count(name):
  count, size, spec = PINNED_COUNTS[name]
  assert _formula_params(*spec, size) == count
  model = vitjax.create_model(name)
  assert _count(model, size) == count


def test_param_count_does_not_depend_on_grid():
  counts = {_count(vitjax.create_model("lookupvit_nano4", grid=g), 28) for g in [(1, 1), (3, 5)]}
  assert counts == {PINNED_COUNTS["lookupvit_nano4"][0]}


def test_same_counting_gives_vit_b16():
  assert _count(vitjax.create_model("vit_b16"), 224) == 86_567_656
  b16 = vitjax.create_model("lookupvit_b16", lookup_mlp_ratio=1.0)
  assert _count(b16, 224) == 143_336_680                             # r_l = 1 column


@pytest.mark.parametrize("impl", ["project", "absorb"])
def test_analytic_formula_against_xla(impl):
  """At width 768 elementwise work is ~1% of the matmuls, so the MAC formula and XLA agree."""
  for head_source, dead in [("compressed", False), ("lookup", True)]:
    model = lv.LookupViT(num_classes=10, image_size=64, patch_size=8, width=768, depth=1,
                         mlp_dim=3072, num_heads=12, grid=(4, 4), head_source=head_source,
                         mhbc_impl=impl)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(model.init, KEY, x)
    macs = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()["flops"] / 2 / 2
    want = lv.analytic_macs(model, include_dead=dead)
    assert 1.0 <= macs / want < 1.025, (head_source, macs, want)


def test_analytic_formula_matches_reference_table():
  """The reference notes' B/16 GMACs (their own derivation) at grids 3, 5, 7, 10, 224 px.

  They count MHBC's projected form, as the paper describes it."""
  b16 = vitjax.create_model("lookupvit_b16", mhbc_impl="project")
  for g, full, live in [(3, 6.67, 6.43), (5, 8.47, 8.22), (7, 11.18, 10.91), (10, 17.01, 16.70)]:
    assert round(lv.analytic_macs(b16, grid=(g, g)) / 1e9, 2) == pytest.approx(full, abs=0.011)
    assert round(lv.analytic_macs(b16, grid=(g, g), include_dead=False) / 1e9, 2) == (
        pytest.approx(live, abs=0.011))
