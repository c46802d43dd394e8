"""RMT: Manhattan self-attention (both forms) against dense references, its decay mask and theta
shift against their definitions, pinned parameter counts, and a tiny model's BatchNorm state.
(Parity with the official code: tests/test_official.py, fixtures rmt_t and rmt_s.)"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import rmt
from vitjax.ops import manhattan as ops

# Parameter counts at 224 px, 1000 classes. Each equals the official model's
# `sum(p.numel() for p in model.parameters())` (qhfan/RMT @32ea214: RMT_T3 from
# classfication_release, RMT_S / RMT_M2 / RMT_L6 from classification_token_label_release, counted
# by experiments/golden/make.py when this was written); the README rounds them to 14M, 27M, 55M,
# 96M. The official models' buffers are not parameters on either side: BatchNorm statistics
# (vitjax `batch_stats`: 4,224 for rmt_t), `num_batches_tracked`, and the `Relpos.angle/decay`
# tables, which vitjax computes from (num_heads, init_values, heads_ranges) instead of storing.
PINNED_COUNTS = {
    "rmt_t": 14_334_216,
    "rmt_s": 27_480_240,
    "rmt_b": 54_667_896,
    "rmt_l": 96_105_864,
}

TOL = dict(atol=1e-5, rtol=1e-5)


def _shapes(model, size=224):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_parameter_counts_equal_the_official_models(name):
  shapes = _shapes(vitjax.create_model(name))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"])) == PINNED_COUNTS[name]
  if name == "rmt_t":
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["batch_stats"])) == 4_224


# ------------------------------------------------------------------------------ ops: definitions

def test_decay_rates_and_masks_follow_their_definitions():
  lg = ops.decay_rates(4, 2.0, 6.0)
  np.testing.assert_allclose(lg, [math.log(1 - 2 ** (-2 - 6 * h / 4)) for h in range(4)], **TOL)
  h, w = 3, 4
  mask = np.asarray(ops.decay_mask(lg, h, w))
  for (r1, c1), (r2, c2) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
    n, m = r1 * w + c1, r2 * w + c2
    # gamma_h ** (Manhattan distance), as an additive log-mask
    np.testing.assert_allclose(np.exp(mask[:, n, m]),
                               (1 - 2.0 ** (-2 - 6 * np.arange(4) / 4)) ** (abs(r1 - r2) + abs(c1 - c2)),
                               rtol=1e-5)
  line = np.asarray(ops.decay_mask_1d(lg, 5))
  np.testing.assert_allclose(line[2], lg[2] * np.abs(np.arange(5)[:, None] - np.arange(5)), **TOL)
  with pytest.raises(ValueError, match="initial_value"):
    ops.decay_rates(4, -1.0, 0.5)


def test_theta_shift_rotates_channel_pairs_by_the_flat_index():
  h, w, d = 2, 3, 6
  x = np.random.default_rng(0).standard_normal((1, h, w, 2, d)).astype(np.float32)
  sin, cos = ops.theta_shift_tables(d, h, w)
  y = np.asarray(ops.theta_shift(jnp.asarray(x), sin, cos))
  theta = 10000.0 ** (-np.arange(d // 2) / (d // 2 - 1))
  for r, c in itertools.product(range(h), range(w)):
    z = x[0, r, c, :, 0::2] + 1j * x[0, r, c, :, 1::2]                 # pairs as complex numbers
    z = z * np.exp(1j * (r * w + c) * theta)
    np.testing.assert_allclose(y[0, r, c, :, 0::2], z.real, atol=1e-5)
    np.testing.assert_allclose(y[0, r, c, :, 1::2], z.imag, atol=1e-5)
  with pytest.raises(ValueError, match="even"):
    ops.theta_shift_tables(5, h, w)


# ------------------------------------------------------------------------------ ops: both forms

def _qkv(seed, b=2, h=3, w=4, nh=2, d=4):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, h, w, nh, d)), jnp.float32) for _ in range(3))


def _coords(h, w):
  rows, cols = np.divmod(np.arange(h * w), w)
  return rows, cols


def _masked_softmax_attention(q, k, v, logits_bias, allowed, scale):
  """Dense (hw x hw) attention on flattened tokens, written plainly: q, k, v (B, N, H, d)."""
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale + logits_bias
  logits = jnp.where(allowed, logits, -jnp.inf)
  return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


def full_reference(q, k, v, lg, scale):
  b, h, w, nh, d = q.shape
  rows, cols = _coords(h, w)
  dist = np.abs(rows[:, None] - rows) + np.abs(cols[:, None] - cols)
  flat = lambda x: x.reshape(b, h * w, nh, -1)  # noqa: E731
  out = _masked_softmax_attention(flat(q), flat(k), flat(v), lg[:, None, None] * dist, True, scale)
  return out.reshape(v.shape)


def decomposed_reference(q, k, v, lg, scale):
  """Two dense masked attentions: A_row (keys of the same row, decay over |dcol|) applied to v,
  then A_col (keys of the same column, decay over |drow|) applied to that."""
  b, h, w, nh, d = q.shape
  rows, cols = _coords(h, w)
  same_row, same_col = rows[:, None] == rows, cols[:, None] == cols
  flat = lambda x: x.reshape(b, h * w, nh, -1)  # noqa: E731
  y = _masked_softmax_attention(flat(q), flat(k), flat(v),
                                lg[:, None, None] * np.abs(cols[:, None] - cols), same_row, scale)
  out = _masked_softmax_attention(flat(q), flat(k), y,
                                  lg[:, None, None] * np.abs(rows[:, None] - rows), same_col, scale)
  return out.reshape(v.shape)


@pytest.mark.parametrize("form,reference", [
    (ops.manhattan_attention, full_reference),
    (ops.decomposed_manhattan_attention, decomposed_reference)], ids=["full", "decomposed"])
def test_masa_matches_dense_reference_forward_and_gradient(form, reference):
  q, k, v = _qkv(1)
  lg = ops.decay_rates(2, 1.0, 3.0)
  wts = jnp.asarray(np.random.default_rng(2).standard_normal(v.shape), jnp.float32)

  @jax.jit
  def value_and_grads(q, k, v):
    out = {}
    for name, f in (("ours", lambda q, k, v: form(q, k, v, lg, scale=0.5)),
                    ("reference", lambda q, k, v: reference(q, k, v, lg, 0.5))):
      out[name] = (f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * wts), (0, 1, 2))(q, k, v))
    return out
  out = value_and_grads(q, k, v)
  np.testing.assert_allclose(out["ours"][0], out["reference"][0], **TOL)
  for a, b in zip(out["ours"][1], out["reference"][1]):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_forms_differ_and_bad_shapes_raise():
  q, k, v = _qkv(3)
  lg = ops.decay_rates(2, 2.0, 4.0)
  full = ops.manhattan_attention(q, k, v, lg, scale=0.5)
  assert float(jnp.abs(full - ops.decomposed_manhattan_attention(q, k, v, lg, scale=0.5)).max()) > 1e-3
  with pytest.raises(ValueError, match="one decay per head"):
    ops.manhattan_attention(q, k, v, lg[:1], scale=0.5)
  with pytest.raises(ValueError, match=r"q, k \(B, h, w, H, d\)"):
    ops.manhattan_attention(q[:, :2], k, v, lg, scale=0.5)


# ------------------------------------------------------------------------------ model

TINY = dict(depths=(1, 1), dims=(16, 24), num_heads=(2, 2), init_values=(2, 2),
            heads_ranges=(4, 4), mlp_ratios=(2, 2), decomposed=(True, False),
            layer_scales=(False, True), projection=32, num_classes=5)


def test_tiny_rmt_trains_batch_stats_and_gives_features():
  model = vitjax.create_model("rmt_t", drop_path=0.1, token_label=True, **TINY)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  # Random values in init's shapes (compiling init's random initialisers would cost more than
  # the model); running variances positive.
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                                  else 0.3 * rng.standard_normal(s.shape), jnp.float32),
      jax.eval_shape(model.init, jax.random.key(0), x))
  assert set(variables) == {"params", "batch_stats"}
  assert "aux_head" in variables["params"] and "gamma1" in variables["params"]["stages_1"]["blocks_0"]
  assert set(variables["params"]["stages_1"]["downsample"]) == {"conv", "bn"}

  @jax.jit
  def run(variables, x):
    (logits, out), state = model.apply(variables, x, train=True, features=True,
                                       mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return logits, {k: v.shape for k, v in out.items()}, state
  logits, shapes, state = run(variables, x)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  assert shapes == {"stem": (2, 8, 8, 16), "stage1": (2, 8, 8, 16), "stage2": (2, 4, 4, 24),
                    "pre_logits": (2, 32)}
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))                    # every running statistic moved
  assert [f.stride for f in model.feature_info()] == [4, 4, 8]


def test_manhattan_attn_is_a_mixer_for_other_backbones():
  model = vitjax.create_model("vit_ti16", mixer="manhattan_attn", pool="gap", depth=1,
                              num_classes=3)
  params = _shapes(model, 32)["params"]
  assert "lepe" in params["Transformer"]["encoderblock_0"]["attn"]
  with pytest.raises(ValueError, match="prefix token"):
    _shapes(vitjax.create_model("vit_ti16", mixer="manhattan_attn", depth=1), 32)


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="num_heads=.* needs one entry per stage"):
    _shapes(vitjax.create_model("rmt_t", num_heads=(4, 4, 8)), 64)
  with pytest.raises(ValueError, match="even integer"):
    _shapes(vitjax.create_model("rmt_t", num_heads=(4, 4, 8, 512)), 64)
  with pytest.raises(ValueError, match="Unknown RMT field"):
    vitjax.create_model("rmt_t", chunkwise=(True,) * 4)
  with pytest.raises(ValueError, match="data.image_size"):
    _shapes(vitjax.create_model("rmt_t"), 48)
  assert rmt.VARIANTS["rmt_b"]["layer_scales"] == (False, False, True, True)


def test_configs_fashion_mnist_and_imagenet():
  from vitjax.configs import rmt as rmt_config  # pylint: disable=g-import-not-at-top
  c = rmt_config.get_config()
  assert c.data.image_size % 32 == 0 and c.total_steps == 2500 and c.batch_size == 128
  c.model.depths = (1, 1, 2, 1)                        # typed placeholders take tuples
  model = vitjax.create_model(c.model_name, num_classes=10, **c.model)
  assert model.depths == (1, 1, 2, 1) and model.dims == (32, 64, 128, 256)
  c = rmt_config.get_config("imagenet")
  assert c.lr == pytest.approx(1e-3) and c.model.drop_path == 0.1 and c.data.image_size == 224
  assert c.min_lr_ratio * c.lr == pytest.approx(1e-5) and c.grad_clip_norm == 0.0
