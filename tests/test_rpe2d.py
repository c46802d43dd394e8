"""posemb='rpe2d' (vitjax.models.rpe2d, vitjax.ops.rpe2d): the real-coordinate sin-cos table
equals `layers.posemb_sincos_2d` at integers; training draws are sorted, distinct, in range,
uniform and differ between rngs and examples; eval positions are the exact mean of the draws
(checked by enumerating every subset); the layer puts them on the right tokens (prefix zero);
a ViT runs at 20, 28 and 36 px from one set of parameters; bad input gets one clear error.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import layers, plugins
from vitjax.models import rpe2d
from vitjax.models.backbone import Tokens
from vitjax.ops import rpe2d as ops


def test_sincos_at_integer_coordinates_is_the_sincos2d_table():
  h, w, dim = 3, 5, 16
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  coords = np.stack([rows, cols], -1).reshape(h * w, 2)
  np.testing.assert_allclose(ops.sincos_2d(coords, dim),
                             layers.posemb_sincos_2d(h, w, dim).reshape(h * w, dim), atol=1e-6)
  np.testing.assert_allclose(ops.grid_coords(np.arange(h)[None], np.arange(w)[None])[0], coords)


def test_training_draws_are_sorted_distinct_uniform_and_random():
  n, length, batch = 5, 12, 4000
  draws = np.asarray(jax.jit(ops.sample_positions, static_argnums=(1, 2, 3))(
      jax.random.key(0), batch, n, length))
  assert draws.shape == (batch, n) and draws.dtype == np.int32
  assert np.all(np.diff(draws, axis=1) > 0)                               # sorted, distinct
  assert draws.min() >= 0 and draws.max() < length
  assert len({tuple(r) for r in draws[:50]}) > 40                         # per example
  other = np.asarray(ops.sample_positions(jax.random.key(1), batch, n, length))
  assert not np.array_equal(draws, other)                                 # per rng
  # Every value is used with probability n / L; the i-th smallest averages to the eval rule.
  np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=length) / batch, n / length,
                             atol=0.04)
  np.testing.assert_allclose(draws.mean(0), ops.eval_positions(n, length), atol=0.15)


@pytest.mark.parametrize("n,length", [(1, 5), (3, 7), (4, 9), (6, 6)])
def test_eval_positions_are_the_mean_sorted_draw(n, length):
  subsets = np.array(list(itertools.combinations(range(length), n)))      # sorted tuples
  np.testing.assert_allclose(ops.eval_positions(n, length), subsets.mean(0), atol=1e-5)
  if n == length:
    np.testing.assert_array_equal(ops.eval_positions(n, length), np.arange(n))


def _tokens(rng, b, grid, dim, num_prefix):
  x = jnp.asarray(rng.standard_normal((b, num_prefix + grid[0] * grid[1], dim)), jnp.float32)
  return Tokens(x, grid=grid, num_prefix=num_prefix)


def test_layer_places_drawn_positions_on_the_grid():
  rng = np.random.default_rng(0)
  grid, dim, length = (3, 4), 16, 9
  tokens = _tokens(rng, 3, grid, dim, num_prefix=1)
  rngs = {"dropout": jax.random.key(5)}

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def apply(kind, train, rngs=rngs):
    return rpe2d.RandomizedPositions2D(range=length, kind=kind).apply({}, tokens, train=train,
                                                                      rngs=rngs)
  coords = np.asarray(apply("rope", True).extra[rpe2d.POSITIONS])          # (B, h*w, 2)
  c = coords.reshape(3, *grid, 2)
  np.testing.assert_array_equal(c[..., 0], np.broadcast_to(c[:, :, :1, 0], c.shape[:3]))
  np.testing.assert_array_equal(c[..., 1], np.broadcast_to(c[:, :1, :, 1], c.shape[:3]))
  rows, cols = c[:, :, 0, 0], c[:, 0, :, 1]
  assert np.all(np.diff(rows, axis=1) > 0) and np.all(np.diff(cols, axis=1) > 0)
  assert rows.max() < length and cols.max() < length and np.all(rows == np.round(rows))
  out = apply("sincos", True)                                             # same rng, same draws
  np.testing.assert_allclose(out.x[:, 0], tokens.x[:, 0])                 # prefix: zeros added
  np.testing.assert_allclose(out.x[:, 1:] - tokens.x[:, 1:], ops.sincos_2d(coords, dim),
                             atol=1e-5)
  other = apply("rope", True, {"dropout": jax.random.key(6)}).extra[rpe2d.POSITIONS]
  assert not np.array_equal(coords, other)
  # Eval: the mean-draw rule; at a grid as large as the range, exactly the 'sincos2d' table.
  ev = np.asarray(apply("rope", False).extra[rpe2d.POSITIONS]).reshape(3, *grid, 2)
  np.testing.assert_allclose(ev[0, :, 0, 0], ops.eval_positions(grid[0], length))
  np.testing.assert_allclose(ev[2, 0, :, 1], ops.eval_positions(grid[1], length))
  full = rpe2d.RandomizedPositions2D(range=grid).apply({}, tokens)
  sincos = plugins.SinCosPositions().apply({}, tokens)
  np.testing.assert_allclose(full.x, sincos.x, atol=1e-5)


def test_vit_runs_at_three_sizes_from_one_set_of_parameters():
  model = vitjax.create_model("vit_nano4", num_classes=5, width=16, depth=1, num_heads=2,
                              mlp_dim=16, posemb="rpe2d", posemb_kwargs=dict(range=12))
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
  apply = jax.jit(model.apply, static_argnames="train")
  for size in (20, 28, 36):
    images = jnp.asarray(rng.standard_normal((2, size, size, 1)), jnp.float32)
    y = apply(variables, images)
    assert y.shape == (2, 5) and bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_array_equal(y, apply(variables, images))            # eval is fixed
  draws = [apply(variables, images, train=True, rngs={"dropout": jax.random.key(s)})
           for s in (1, 2)]
  assert float(jnp.abs(draws[0] - draws[1]).max()) > 1e-4                 # positions differ
  with pytest.raises(ValueError, match=r"posemb_kwargs.range=12 is smaller than the token grid "
                                       r"\(13, 13\)"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 52, 52, 1)))


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 16, 16, 1))
  make = functools.partial(vitjax.create_model, "vit_nano4", num_classes=3, depth=1,
                           posemb="rpe2d")
  cases = [
      (dict(posemb_kwargs=dict(kind="rop")), r"Unknown posemb_kwargs.kind='rop'.*sincos, rope"),
      (dict(posemb_kwargs=dict(range=0)), r"range=0: allowed values are a positive int"),
      (dict(posemb_kwargs=dict(range=(4, 4, 4))), r"range=\(4, 4, 4\)"),
      (dict(posemb_kwargs=dict(range=(8, 3))), r"smaller than the token grid \(4, 4\)"),
      (dict(width=18, num_heads=2), r"width divisible by 4, got width=18"),
      (dict(posemb_kwargs=dict(rnage=8)), r"rnage"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**kwargs).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="2-D grid"):
    rpe2d.RandomizedPositions2D().apply({}, Tokens(jnp.zeros((1, 4, 8))))
