"""SReT: parameter counts equal the official models', the 'sliced_group_attn' mixer and a whole
recursive unit against plainly written dense references (block-diagonal masks under the same
permutation; forward and gradients), where the permutation comes from (explicit rng streams,
deterministic eval), the mixer in another backbone, the official key layout's shared copies,
and clear errors for group counts that do not divide a stage's tokens.

Logits equal the official code's on the golden fixture tests/golden/sret_t.npz (written by
experiments/golden/sret.py from szq0214/SReT; checked without torch with every other fixture in
tests/test_official.py).
"""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.convert import official
from vitjax.convert.official import sret as official_sret
from vitjax.models import sret
from vitjax.models.backbone import Tokens
from vitjax.ops import sliced


# (image size, count): 1000 classes; the official `sum(p.numel() for p in model.parameters())`
# of SReT_T, SReT_LT and SReT_S (pos_embed is sized for the image).
PINNED_COUNTS = {
    "sret_t": (224, 4_755_979),
    "sret_lt": (224, 4_988_024),
    "sret_s": (224, 20_899_692),
}
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sret_t.npz")


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  size, count = PINNED_COUNTS[name]
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert _count(shapes["params"]) == count
  assert name in official.supported_models()


# ------------------------------------------------------------------------------ dense references

def _random_like(shapes, seed, scale=0.5):
  """Every parameter redrawn (norm scales, biases and residual coefficients included)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _group_mask(n, groups, perm):
  """(N, N): token a may attend to token b iff both land in the same group once the tokens are
  reordered by perm (pos[t] = the place of token t in the permuted order)."""
  pos = np.arange(n) if perm is None else np.argsort(np.asarray(perm))
  size = n // groups
  return np.array([[pos[a] // size == pos[b] // size for b in range(n)] for a in range(n)])


def _dense_attn(p, x, heads, groups, perm):
  """Projections, softmax over all N tokens with the block-diagonal mask, output projection."""
  q, k, v = (jnp.einsum("bnc,chd->bnhd", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
  mask = _group_mask(x.shape[1], groups, perm)
  y = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1), v)
  return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]


def _ln(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _mlp(p, x):
  h = jax.nn.gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], approximate=False)
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _dense_unit(p, x, heads, groups1, groups2):
  """x -> F(G1) -> NLL_0 -> F(G2, the fixed eval permutation) -> NLL_1, F's parameters shared."""
  f, perm2 = p["block"], sliced.fixed_permutation(x.shape[1])
  for groups, perm, nll in ((groups1, None, p["nll_0"]), (groups2, perm2, p["nll_1"])):
    x = f["coefficient1"] * x + f["coefficient2"] * _dense_attn(f["attn"], _ln(f["norm1"], x),
                                                                heads, groups, perm)
    x = f["coefficient3"] * x + f["coefficient4"] * _mlp(f["mlp"], _ln(f["norm2"], x))
    x = nll["coefficient1"] * x + nll["coefficient2"] * _mlp(nll["mlp"], _ln(nll["norm1"], x))
  return x


def _check_value_and_grads(ours, ref, params, x):
  w = jnp.asarray(np.random.default_rng(9).standard_normal(ref(params, x).shape), jnp.float32)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x: (jnp.sum(f(p, x) * w), f(p, x)), argnums=(0, 1), has_aux=True))
  (_, y_ours), g_ours = value_and_grad(ours)(params, x)
  (_, y_ref), g_ref = value_and_grad(ref)(params, x)
  assert float(jnp.std(y_ref)) > 0.1
  np.testing.assert_allclose(y_ours, y_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_ours, g_ref)


def test_mixer_matches_dense_block_diagonal_attention():
  """At eval (no rng) a permuted call uses the fixed permutation (the unguarded first pass is
  checked in the unit test below)."""
  heads, n, dim, groups, permute = 2, 12, 8, 4, True
  mixer = sret.SlicedGroupAttention(num_heads=heads, num_groups=groups, permute=permute)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, n, dim)), jnp.float32)
  params = _random_like(jax.eval_shape(mixer.init, jax.random.key(0), x), 1)["params"]
  assert set(params) == {"query", "key", "value", "out"}
  perm = sliced.fixed_permutation(n) if permute and groups > 1 else None
  _check_value_and_grads(lambda p, x: mixer.apply({"params": p}, x),
                         lambda p, x: _dense_attn(p, x, heads, groups, perm), params, x)


def test_recursive_unit_matches_dense_reference():
  """One unit: the shared block appears once in the tree and runs twice (G1 = 4, then G2 = 2
  permuted), each use followed by its own NLL; coefficients redrawn away from 1. (Forward only:
  the mixer's gradients are checked above, the rest is autodiff of standard layers.)"""
  unit = sret.RecursiveUnit(mlp_dim=12, nll_mlp_dim=8, num_heads=2, groups1=4, groups2=2)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 8)), jnp.float32)
  call = lambda p, x: unit.apply({"params": p}, Tokens(x, grid=(4, 4))).x  # noqa: E731
  shapes = jax.eval_shape(lambda x: unit.init(jax.random.key(0), Tokens(x, grid=(4, 4))), x)
  params = _random_like(shapes["params"], 3)
  assert set(params) == {"block", "nll_0", "nll_1"}
  assert set(params["block"]) == {"norm1", "attn", "norm2", "mlp"} | {
      f"coefficient{i}" for i in range(1, 5)}
  assert set(params["nll_1"]) == {"norm1", "mlp", "coefficient1", "coefficient2"}
  y_ref = _dense_unit(params, x, 2, 4, 2)
  assert float(jnp.std(y_ref)) > 0.1
  np.testing.assert_allclose(jax.jit(call)(params, x), y_ref, atol=1e-5, rtol=1e-5)


def test_permutation_rng_streams():
  """'permute' wins when given (train or eval); training otherwise draws from 'dropout'; eval
  without 'permute' is deterministic; no permutation is drawn for permute=False."""
  mixer = sret.SlicedGroupAttention(num_heads=2, num_groups=4, permute=True)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 16, 8)), jnp.float32)
  variables = _random_like(jax.eval_shape(mixer.init, jax.random.key(0), x), 5)
  apply = jax.jit(functools.partial(mixer.apply, variables), static_argnames=("train", "permute"))
  keys = [jax.random.key(i) for i in range(3)]
  fixed = apply(x)
  np.testing.assert_array_equal(fixed, apply(x))
  differs = lambda a, b: float(jnp.abs(a - b).max()) > 1e-3  # noqa: E731
  assert differs(apply(x, rngs={"permute": keys[0]}), fixed)                 # stochastic eval
  np.testing.assert_array_equal(apply(x, rngs={"permute": keys[0]}),
                                apply(x, rngs={"permute": keys[0]}))
  assert differs(apply(x, train=True, rngs={"dropout": keys[0]}),
                 apply(x, train=True, rngs={"dropout": keys[1]}))
  np.testing.assert_array_equal(apply(x, train=True, rngs={"dropout": keys[0], "permute": keys[2]}),
                                apply(x, train=True, rngs={"dropout": keys[1], "permute": keys[2]}))
  np.testing.assert_array_equal(apply(x, train=True, permute=False, rngs={"dropout": keys[0]}),
                                apply(x, train=True, permute=False, rngs={"dropout": keys[1]}))


@pytest.mark.parametrize("impl", ["shift", "xla"])
def test_pooling_conv_matches_a_direct_loop(impl):
  """conv_head_pool's grouped conv (one group per input channel, 2 outputs each, 3x3, stride 2,
  padding 1): out[i, j, c*m + q] = b + sum_{di, dj} xpad[2i + di, 2j + dj, c] K[di, dj, c*m + q]."""
  layer = sret.ChannelMultiplierConv(6, impl=impl)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 6, 5, 3)), jnp.float32)
  params = _random_like(jax.eval_shape(layer.init, jax.random.key(0), x), 7)["params"]

  def ref(p, x):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for i in range(3):
      cols = []
      for j in range(3):
        patch = jnp.repeat(xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], 2, axis=-1)   # (B, 3, 3, 6)
        cols.append(jnp.einsum("bijo,ijo->bo", patch, p["kernel"][:, :, 0]) + p["bias"])
      rows.append(jnp.stack(cols, 1))
    return jnp.stack(rows, 1)                                                      # (B, 3, 3, 6)

  _check_value_and_grads(lambda p, x: layer.apply({"params": p}, x), ref, params, x)


def test_sliced_group_attn_is_a_mixer_for_other_backbones():
  """By registered name in an isotropic ViT (shapes only: the math is checked above)."""
  model = vitjax.create_model("vit_nano4", mixer="sliced_group_attn", pool="gap", num_classes=3,
                              depth=1, mixer_kwargs=dict(num_groups=4, permute=True))
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  block = variables["params"]["Transformer"]["encoderblock_0"]
  assert set(block["attn"]) == {"query", "key", "value", "out"}
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)


# ------------------------------------------------------------------------------ official layout

def _golden_state():
  with np.load(GOLDEN) as f:
    return {k[len("state/"):]: f[k] for k in f.files if k.startswith("state/")}


def test_official_layout_second_copies_and_ratios():
  """Shared blocks sit at list positions 4r and 4r + 2 (identical copies); the converter skips
  the second after checking it equals the first; MLP ratios are read from every stage."""
  pattern = r"transformers\.\d+\.blocks\." + official_sret.SECOND_USE + r"\.x"
  assert [i for i in range(400) if re.fullmatch(pattern, f"transformers.0.blocks.{i}.x")] == list(
      range(2, 400, 4))
  assert official_sret.mlp_ratio_of([230, 460, 921], [64, 128, 256]) == 3.6
  assert official_sret.mlp_ratio_of([378, 756, 1512], [126, 252, 504]) == 3
  state = _golden_state()
  np.testing.assert_array_equal(state["transformers.1.blocks.4.attn.qkv.weight"],
                                state["transformers.1.blocks.6.attn.qkv.weight"])
  state["transformers.1.blocks.6.attn.qkv.weight"] = (
      state["transformers.1.blocks.6.attn.qkv.weight"] + np.float16(1))
  with pytest.raises(ValueError, match=r"transformers\.1\.blocks\.4\.attn\.qkv\.weight != "
                                       r"transformers\.1\.blocks\.6\.attn\.qkv\.weight"):
    convert.from_official(state, "SReT_T")
  with pytest.raises(ValueError, match=r"looks like an official sret \(szq0214/SReT\)"):
    convert.from_official(_golden_state(), "cswin_tiny_224")


def test_bad_input_gets_one_clear_error():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  make = functools.partial(vitjax.create_model, "sret_t", num_classes=3, depths=(2, 2, 2))
  cases = [
      (dict(groups2=(3, 1, 1)), r"SReT stage 1 \(groups2\[0\]=3, a 8x8 map at 64x64 px\): "
                                r"num_groups=3 does not divide the 64 tokens; allowed group "
                                r"counts: 1, 2, 4, 8, 16, 32, 64"),
      (dict(groups1=(8, 4, 3)), r"SReT stage 3 \(groups1\[2\]=3, a 2x2 map.*does not divide the "
                                r"4 tokens"),
      (dict(depths=(2, 3, 2)), r"SReT stage 2: depths\[1\]=3; allowed values are even"),
      (dict(groups1=(8, 4)), r"groups1=\(8, 4\) needs one entry per stage \(3"),
      (dict(num_heads=(3, 4, 8)), r"SReT stage 1: dims\[0\]=64 is not divisible by num_heads"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**overrides).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"sliced_group_attn: num_groups=5 does not divide the 12"):
    mixer = sret.SlicedGroupAttention(num_heads=2, num_groups=5)
    jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, 12, 8)))
