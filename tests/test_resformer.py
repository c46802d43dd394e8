"""ResFormer: the global PE's sin-cos table against the DETR formula evaluated in a loop, both
position convolutions against a direct convolution loop (forward and gradients), the local-PE
'mhsa' against attention written out with einsums, the switches on a plain ViT at three
resolutions from one set of weights, clear errors, parameter counts equal the official ones.

Logits equal the official code's (ruitian12/resformer) at two resolutions on the golden fixture
tests/golden/resformer_tiny_patch16.npz, written by experiments/golden/resformer.py
(tests/test_official.py checks its first resolution with every other fixture; this file both).
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import mixers
from vitjax.ops import resformer as ops

# 1000 classes at 224 px: the official `sum(p.numel() for p in model.parameters())`.
PINNED_COUNTS = {
    "resformer_tiny_patch16": (224, 5_689_192),
    "resformer_small_patch16": (224, 21_986_536),
    "resformer_base_patch16": (224, 86_431_720),
}
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "resformer_tiny_patch16.npz")


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_param_counts_and_the_models_are_vit_with_switches():
  for name, (size, count) in PINNED_COUNTS.items():
    model = vitjax.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    assert _count(shapes) == count, name
  vit = dict(posemb="resformer", mixer_kwargs=dict(local_pe=True))
  assert vitjax.create_model("resformer_small_patch16") == vitjax.create_model("vit_s16", **vit)
  assert vitjax.create_model("resformer_tiny_patch16", mixer_kwargs=dict(
      qkv_bias=False)).mixer_kwargs == dict(local_pe=True, qkv_bias=False)


# ---------------------------------------------------------------------------------------------
# The ops against loops.

def _sincos_loop(h, w, dim, temperature=10_000.0):
  """DETR's normalized sine table, entry by entry in float64 (eps left out)."""
  half = dim // 2
  out = np.zeros((h, w, dim))
  for i in range(h):
    for j in range(w):
      for axis, (p, n) in enumerate(((i + 1, h), (j + 1, w))):
        pos = p / n * 2 * math.pi
        for k in range(half):
          a = pos / temperature ** (2 * (k // 2) / half)
          out[i, j, axis * half + k] = math.sin(a) if k % 2 == 0 else math.cos(a)
  return out


@pytest.mark.parametrize("grid,dim", [((3, 5), 16), ((14, 14), 8)])
def test_global_sincos_matches_the_formula(grid, dim):
  np.testing.assert_allclose(ops.global_sincos(*grid, dim), _sincos_loop(*grid, dim), atol=3e-6)


def _dwconv_loop(x, kernel, bias):
  """3x3 zero-padded depthwise convolution of (B, h, w, C), one output position at a time."""
  _, h, w, _ = x.shape
  rows = []
  for i in range(h):
    row = []
    for j in range(w):
      acc = bias
      for di in range(3):
        for dj in range(3):
          a, b = i + di - 1, j + dj - 1
          if 0 <= a < h and 0 <= b < w:
            acc = acc + x[:, a, b] * kernel[di, dj, 0]
      row.append(acc)
    rows.append(jnp.stack(row, axis=1))
  return jnp.stack(rows, axis=1)


def _local_pe_loop(v, grid, num_prefix, kernel, bias):
  """Each head's patch values convolved on their own; zeros at the prefix tokens."""
  b, _, heads, d = v.shape
  outs = [_dwconv_loop(v[:, num_prefix:, n].reshape(b, *grid, d), kernel, bias).reshape(b, -1, d)
          for n in range(heads)]
  y = jnp.stack(outs, axis=2)
  return jnp.concatenate([jnp.zeros((b, num_prefix, heads, d)), y], axis=1)


def _randn(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _check_value_and_grad(ours, ref, args, atol=1e-5):
  """ours(*args) == ref(*args), and the gradients of a random projection of both agree (one
  compiled function each)."""
  w = _randn(np.random.default_rng(9), *jax.eval_shape(ours, *args).shape)
  def value_and_grad(f):
    loss = lambda *a: (jnp.sum(f(*a) * w), f(*a))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
  (_, y_ours), g_ours = value_and_grad(ours)(*args)
  (_, y_ref), g_ref = value_and_grad(ref)(*args)
  np.testing.assert_allclose(y_ours, y_ref, atol=atol, rtol=atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=10 * atol, rtol=10 * atol),
               g_ours, g_ref)


def test_global_pe_is_a_depthwise_conv_of_the_table():
  rng = np.random.default_rng(0)
  grid, d = (3, 5), 8
  table = jnp.asarray(_sincos_loop(*grid, d), jnp.float32)[None]
  ours = lambda k, b: ops.global_pe(grid, k, b)  # noqa: E731
  ref = lambda k, b: _dwconv_loop(table, k, b).reshape(-1, d)  # noqa: E731
  _check_value_and_grad(ours, ref, (_randn(rng, 3, 3, 1, d), _randn(rng, d)))


def test_local_pe_is_a_per_head_conv_of_the_values():
  rng = np.random.default_rng(1)
  grid, heads, d, num_prefix = (2, 3), 2, 3, 1
  mask = jnp.asarray(rng.random((2, 7)) < 0.7)
  ours = lambda v, k, b: ops.local_pe(v, grid, num_prefix, k, b, mask=mask)  # noqa: E731
  ref = lambda v, k, b: _local_pe_loop(  # noqa: E731
      jnp.where(mask[:, :, None, None], v, 0.0), grid, num_prefix, k, b)
  _check_value_and_grad(ours, ref, (_randn(rng, 2, 7, heads, d), _randn(rng, 3, 3, 1, d),
                                    _randn(rng, d)))
  y = ops.local_pe(_randn(rng, 2, 7, heads, d), grid, num_prefix, _randn(rng, 3, 3, 1, d),
                   _randn(rng, d))
  assert float(jnp.abs(y[:, 0]).max()) == 0.0 and float(jnp.abs(y[:, 1:]).min()) > 0.0


def _taps(grid, num_prefix):
  """(N, N) index of the 3x3 tap linking token i to token j (-1: none; prefix tokens: none)."""
  h, w = grid
  n = num_prefix + h * w
  tap = np.full((n, n), -1)
  for i in range(h * w):
    for j in range(h * w):
      dy, dx = j // w - i // w, j % w - i % w
      if abs(dy) <= 1 and abs(dx) <= 1:
        tap[num_prefix + i, num_prefix + j] = (dy + 1) * 3 + (dx + 1)
  return tap


def test_mhsa_with_local_pe_matches_attention_written_out():
  rng = np.random.default_rng(2)
  grid, heads, dim = (3, 4), 2, 8
  x = _randn(rng, 2, 13, dim)
  mixer = mixers.MultiHeadSelfAttention(num_heads=heads, local_pe=True)
  assert mixer.needs_grid and not mixers.MultiHeadSelfAttention(num_heads=heads).needs_grid
  shapes = jax.eval_shape(functools.partial(mixer.init, grid=grid, num_prefix=1),
                          jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda s: _randn(rng, *s.shape), shapes)     # local_pe is 0 at init
  assert params["local_pe"]["kernel"].shape == (3, 3, 1, 4)
  ours = lambda p, x: mixer.apply({"params": p}, x, grid=grid, num_prefix=1)  # noqa: E731

  def ref(p, x):
    q, k, v = (jnp.einsum("bnc,chd->bnhd", x, p[n]["kernel"]) + p[n]["bias"]
               for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim // heads), axis=-1)
    tap = _taps(grid, 1)                                   # the local PE as an (N, N, d) matrix
    kern = p["local_pe"]["kernel"].reshape(9, -1)
    taps = jnp.where((tap >= 0)[..., None], kern[np.maximum(tap, 0)], 0.0)
    bias = jnp.where(np.arange(13)[:, None, None] >= 1, p["local_pe"]["bias"], 0.0)
    y = jnp.einsum("bhij,bjhd->bihd", att, v) + jnp.einsum("ijd,bjhd->bihd", taps, v) + bias
    return jnp.einsum("bnhd,hdc->bnc", y, p["out"]["kernel"]) + p["out"]["bias"]
  _check_value_and_grad(ours, ref, (params, x))


# ---------------------------------------------------------------------------------------------
# The switches in a model.

def test_default_mhsa_is_unchanged():
  x = jnp.zeros((1, 5, 8))
  params = jax.eval_shape(mixers.MultiHeadSelfAttention(num_heads=2).init, jax.random.key(0), x)
  assert set(params["params"]) == {"query", "key", "value", "out"}


def test_switches_run_any_vit_at_three_resolutions_from_one_set_of_weights():
  """vit_nano4 with both switches, initialised at 28 px, runs at 20 and 36 px and trains at 28
  (the local PE's kernel, zero at init, gets a gradient). CLS pooling: the golden test."""
  model = vitjax.create_model("vit_nano4", posemb="resformer", num_classes=5, depth=1,
                              pool="gap", mixer_kwargs=dict(local_pe=True), head_zero_init=False)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert set(variables["params"]["Transformer"]["posembed_input"]) == {"kernel", "bias"}
  rng = np.random.default_rng(3)
  apply = jax.jit(model.apply)
  logits = {size: apply(variables, _randn(rng, 2, size, size, 1)) for size in (20, 36)}
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"], _randn(rng, 2, 28, 28, 1))
  for y in logits.values():
    assert y.shape == (2, 5) and bool(jnp.all(jnp.isfinite(y)))
  assert np.isfinite(float(value)) and not np.allclose(logits[20], logits[36])
  attn = grads["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert float(jnp.abs(attn["local_pe"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["Transformer"]["posembed_input"]["kernel"]).sum()) > 0


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 16, 16, 3))
  init = lambda **kw: jax.eval_shape(  # noqa: E731
      vitjax.create_model("vit_nano4", num_classes=3, depth=1, **kw).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"posemb='resformr'.*Did you mean: resformer"):
    init(posemb="resformr")
  with pytest.raises(ValueError, match=r"posemb='resformer' needs a width divisible by 4.*"
                                       r"width=126"):
    init(posemb="resformer", width=126, num_heads=2)
  with pytest.raises(ValueError, match=r"MultiHeadSelfAttention needs a 2-D token grid"):
    init(mixer_kwargs=dict(local_pe=True), token_reduction="random", reduction_blocks=(0,),
         keep_ratio=0.5)
  with pytest.raises(ValueError, match=r"local_pe=True needs the token grid"):
    mixer = mixers.MultiHeadSelfAttention(num_heads=2, local_pe=True)
    jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, 5, 8)))
  with pytest.raises(ValueError, match=r"Unknown mixer 'mhsa'.*locl_pe.*local_pe"):
    init(mixer_kwargs=dict(locl_pe=True))


# ---------------------------------------------------------------------------------------------
# The official code, through the golden fixture.

def test_golden_logits_match_the_official_code_at_two_resolutions():
  with np.load(GOLDEN) as f:
    data = {k: f[k] for k in f.files}
  state = {k[len("state/"):]: v for k, v in data.items() if k.startswith("state/")}
  assert str(data["repository"]) == "ruitian12/resformer"
  model, variables, meta = convert.from_official(state, str(data["model"]),
                                                 **json.loads(str(data["overrides"])))
  assert meta["model_overrides"]["num_heads"] == 2        # read off the local PE's kernel
  assert _count(variables) == sum(v.size for v in state.values())
  apply = jax.jit(model.apply)
  grids = set()
  for images, logits in ((data["images"], data["logits"]), (data["images_2"], data["logits_2"])):
    grids.add(images.shape[1] // model.patch_size)
    assert float(np.std(logits, axis=0).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(apply(variables, images.astype(np.float32))), logits,
                               atol=1e-4, rtol=1e-4)
  assert len(grids) == 2
