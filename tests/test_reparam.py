"""Structural reparameterization (vitjax.models.reparam): the 'vit_parallel' block against a
plainly written sum of independent branches (forward and gradients, with a key mask), the merge
into a plain ViT exact to float rounding on perturbed weights (class token, gap, other switches),
the merged tree equal to the plain model's, parameter counts, and clear errors.

No registered model of its own (the block is a switch of every ViT), so no PINNED_COUNTS.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import reparam
from vitjax.models.backbone import Tokens


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _perturbed(shapes, seed):
  """Every leaf redrawn: N(0, 0.2^2), norm scales 1 + N(0, 0.2^2) (init would leave biases at 0,
  norms at identity and the head at 0, hiding errors)."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    x = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(x + 1.0 if path[-1].key == "scale" else x)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------------
# The block against the definition.

def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _mhsa(p, y, mask):
  """One attention branch written out: softmax(q k^T / sqrt(d)) v per head, masked keys out."""
  q, k, v = (jnp.einsum("bnd,dhe->bnhe", y, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = jnp.einsum("bihe,bjhe->bhij", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  o = jnp.einsum("bhij,bjhe->bihe", jax.nn.softmax(logits, -1), v)
  return jnp.einsum("bihe,hed->bid", o, p["out"]["kernel"]) + p["out"]["bias"]


def _ffn(p, y):
  h = jax.nn.gelu(y @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], approximate=False)
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _parallel_reference(p, x, mask, branches):
  """x + sum_b MHSA_b(LN_0(x)), then x + sum_b FFN_b(LN_1(x)), each branch on its own."""
  y = _layer_norm(x, p["LayerNorm_0"])
  x = x + sum(_mhsa(p[f"MultiHeadDotProductAttention_{b}"], y, mask) for b in range(branches))
  y = _layer_norm(x, p["LayerNorm_1"])
  return x + sum(_ffn(p[f"MlpBlock_{b}"], y) for b in range(branches))


def test_block_is_the_sum_of_independent_branches():
  """Forward and gradients (params and input) against the written-out sum, with tokens masked
  out as keys (as a masking token reducer leaves them); one key mask per example."""
  branches, heads, width, hidden = 3, 2, 8, 12
  block = reparam.ParallelBlock(mlp_dim=hidden, num_heads=heads, branches=branches)
  x = jax.random.normal(jax.random.key(0), (2, 5, width))
  mask = jnp.array([[True] * 5, [True, False, True, True, False]])
  run = lambda p, x: block.apply({"params": p}, Tokens(x, mask=mask)).x  # noqa: E731
  shapes = jax.eval_shape(block.init, jax.random.key(0), Tokens(x, mask=mask))["params"]
  assert sorted(shapes) == sorted(
      ["LayerNorm_0", "LayerNorm_1"] + [f"MultiHeadDotProductAttention_{b}" for b in range(3)]
      + [f"MlpBlock_{b}" for b in range(3)])
  assert shapes["MultiHeadDotProductAttention_2"]["query"]["kernel"].shape == (width, heads, 4)
  params = _perturbed(shapes, 1)
  w = jax.random.normal(jax.random.key(2), (2, 5, width))
  def value_and_grads(f):   # one compile per side
    return jax.jit(lambda p, x: (f(p, x), jax.grad(lambda p, x: jnp.sum(w * f(p, x)),
                                                   argnums=(0, 1))(p, x)))(params, x)
  out, got = value_and_grads(run)
  want_out, want = value_and_grads(lambda p, x: _parallel_reference(p, x, mask, branches))
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Each branch gets its own gradient (no branch is a copy of another's).
  assert not np.allclose(got[0]["MlpBlock_0"]["Dense_0"]["kernel"],
                         got[0]["MlpBlock_1"]["Dense_0"]["kernel"])


def test_one_branch_is_the_plain_block():
  kw = dict(depth=2, width=16, mlp_dim=24, num_heads=2, num_classes=3)
  x = jnp.zeros((1, 8, 8, 1))
  tree = lambda m: jax.tree.map(  # noqa: E731
      lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert tree(vitjax.create_model("vit_nano4", block="vit_parallel",
                                  block_kwargs=dict(branches=1), **kw)) == \
      tree(vitjax.create_model("vit_nano4", **kw))


def test_param_counts_before_and_after_merge():
  """ViT-Ti/16 at depth 6 with 3 branches: the analytic count; the merge drops only the B-1
  redundant output biases of each sub-block (2 (B-1) D per block)."""
  branches, depth = 3, 6
  model = vitjax.create_model("vit_ti16", depth=depth, block="vit_parallel",
                              block_kwargs=dict(branches=branches))
  x = jnp.zeros((1, 224, 224, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  d, f, n = 192, 768, 14 * 14 + 1
  block = 4 * d + branches * (4 * (d * d + d) + 2 * d * f + f + d)
  assert _count(shapes) == (16 * 16 * 3 * d + d + d + n * d + depth * block + 2 * d
                            + d * 1000 + 1000)
  merged = jax.eval_shape(lambda v: reparam.merge(model, v)[1], shapes)
  plain = reparam.merged_model(model)
  assert _count(merged) == _count(shapes) - depth * 2 * (branches - 1) * d
  assert (plain.num_heads, plain.mlp_dim, plain.mixer_kwargs) == (9, 2304, {"head_dim": 64})


# ---------------------------------------------------------------------------------------------
# The merge.

CASES = {
    # name: (create_model overrides, branches, apply kwargs)
    "cls_token": (dict(pool="tok"), 3, {}),
    "gap_sincos_no_qkv_bias": (dict(pool="gap", posemb="sincos2d",
                                    mixer_kwargs=dict(qkv_bias=False)), 2, {}),
    # Features tapped before the gather (after it the tokens have no grid, so no feature map).
    "token_reduction_train": (dict(pool="tok", token_reduction="random", reduction_blocks=(1,),
                                   keep_ratio=0.5, feature_blocks=(0,)), 2,
                              dict(train=True, rngs={"dropout": jax.random.key(7)})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_is_exact(case):
  """Merged vs unmerged logits and every feature map within 1e-5 (float32, every weight
  perturbed); the merged params have exactly the tree of create_model(same name, wider)."""
  overrides, branches, apply_kw = CASES[case]
  base = dict(depth=2, width=24, mlp_dim=32, num_heads=2, num_classes=5, **overrides)
  model = vitjax.create_model("vit_nano4", block="vit_parallel",
                              block_kwargs=dict(branches=branches), **base)
  x = jax.random.normal(jax.random.key(3), (2, 12, 12, 1))
  variables = _perturbed(jax.eval_shape(model.init, jax.random.key(0), x), 4)
  plain, merged = reparam.merge(model, variables)
  mixer_kwargs = {**overrides.get("mixer_kwargs", {}), "head_dim": 12}
  expected = vitjax.create_model("vit_nano4", **{**base, "num_heads": 2 * branches,
                                                 "mlp_dim": 32 * branches,
                                                 "mixer_kwargs": mixer_kwargs})
  assert plain == expected
  tree = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert tree(merged) == tree(jax.eval_shape(expected.init, jax.random.key(0), x))
  logits, out = model.apply(variables, x, features=True, **apply_kw)
  logits_m, out_m = plain.apply(merged, x, features=True, **apply_kw)
  assert np.abs(logits).max() > 0.1   # perturbed: the logits depend on every weight
  np.testing.assert_allclose(logits_m, logits, atol=1e-5, rtol=0)
  assert sorted(out) == sorted(out_m)
  for key in out:
    np.testing.assert_allclose(out_m[key], out[key], atol=1e-5, rtol=0, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Errors.

def _init(model):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_kwargs=dict(branches=0)), r"branches=0.*integer >= 1"),
    (dict(block_kwargs=None), r"branches=None.*integer >= 1"),
    (dict(block_kwargs=dict(branches=2.0)), r"branches=2.0.*integer >= 1"),
    (dict(block_kwargs=dict(branches=2), mixer="urpe"), r"mixer='urpe'.*allowed values: mhsa"),
])
def test_bad_block_fields(kwargs, match):
  model = vitjax.create_model("vit_nano4", depth=1, width=16, mlp_dim=16, num_heads=2,
                              block="vit_parallel", **kwargs)
  with pytest.raises(ValueError, match=match):
    _init(model)
  with pytest.raises(ValueError, match=match):
    reparam.merge(model, {"params": {}})


def test_merge_refuses_other_models():
  plain = vitjax.create_model("vit_nano4", depth=1, width=16, mlp_dim=16, num_heads=2)
  with pytest.raises(ValueError, match=r"block='vit'.*allowed values: vit_parallel"):
    reparam.merge(plain, _init(plain))
  with pytest.raises(ValueError, match=r"merge takes a VisionTransformer.*got CvT"):
    reparam.merge(vitjax.create_model("cvt_13"), {"params": {}})
  deeper = plain.clone(depth=2, block="vit_parallel", block_kwargs=dict(branches=2))
  shallow = _init(plain.clone(block="vit_parallel", block_kwargs=dict(branches=2)))
  with pytest.raises(ValueError, match=r"no 'encoderblock_1'.*depth 2"):
    reparam.merge(deeper, shallow)
  wrong = _init(plain.clone(block="vit_parallel", block_kwargs=dict(branches=3)))
  with pytest.raises(ValueError, match=r"encoderblock_0.*branches=2"):
    reparam.merge(plain.clone(block="vit_parallel", block_kwargs=dict(branches=2)), wrong)
