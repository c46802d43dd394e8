"""CSWin: parameter counts equal the official models', the 'cswin' mixer against dense masked
attention + LePE written out token by token (forward and gradients), the mixer in another
backbone, and clear errors for stripes that do not tile.

Logits equal the official code's on the golden fixture tests/golden/cswin_tiny_224.npz (written
by experiments/golden/cswin.py from microsoft/CSWin-Transformer; checked without torch with every
other fixture in tests/test_official.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import cswin

from tests import mixer_checks

# 1000 classes at 224 px; the official `sum(p.numel() for p in model.parameters())` of
# CSWin_64_12211_tiny_224, CSWin_64_24322_small_224 and CSWin_96_24322_base_224.
PINNED_COUNTS = {
    "cswin_tiny_224": 22_320_552,
    "cswin_small_224": 34_643_304,
    "cswin_base_224": 77_382_184,
}
def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes) == PINNED_COUNTS[name]


def _dense_cswin(params, x, grid, heads, split_size):
  """The 'cswin' mixer written out over all tokens: per branch an (N, N) stripe mask for the
  softmax, and LePE as an (N, N, C) tensor of 3x3 taps between neighbours in the same stripe."""
  h, w = grid
  b, n, dim = x.shape
  d = dim // heads
  def proj(name):
    return jnp.einsum("bnc,chd->bnhd", x, params[name]["kernel"]) + params[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")                # (B, N, heads, d)
  ys, xs = np.divmod(np.arange(n), w)
  if split_size == 0:
    branches = [(range(heads), lambda y, x: 0)]
  else:
    sv, sh = min(split_size, w), min(split_size, h)
    branches = [(range(heads // 2), lambda y, x: x // sv),               # vertical stripes
                (range(heads // 2, heads), lambda y, x: y // sh)]        # horizontal stripes
  outs = []
  for i, (hs, stripe) in enumerate(branches):
    hs = list(hs)
    same = np.array([[stripe(ys[a], xs[a]) == stripe(ys[c], xs[c]) for c in range(n)]
                     for a in range(n)])
    logits = jnp.einsum("bihd,bjhd->bhij", q[:, :, hs], k[:, :, hs]) * d ** -0.5
    att = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    y = jnp.einsum("bhij,bjhd->bihd", att, v[:, :, hs])
    tap = np.full((n, n), -1)
    for a in range(n):
      for c in range(n):
        dy, dx = ys[c] - ys[a], xs[c] - xs[a]
        if abs(dy) <= 1 and abs(dx) <= 1 and same[a, c]:
          tap[a, c] = (dy + 1) * 3 + (dx + 1)
    kern = params[f"lepe_{i}"]["kernel"].reshape(9, -1)                  # (9, C_branch)
    taps = jnp.where((tap >= 0)[..., None], kern[np.maximum(tap, 0)], 0.0)   # (N, N, C)
    vb = v[:, :, hs].reshape(b, n, -1)
    lepe = jnp.einsum("ijc,bjc->bic", taps, vb) + params[f"lepe_{i}"]["bias"]
    outs.append(y + lepe.reshape(y.shape))
  y = jnp.concatenate(outs, axis=2)
  return jnp.einsum("bnhd,hdc->bnc", y, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("split_size", [2, 8])   # 8: stripes clipped to the 4x6 map
def test_mixer_matches_dense_stripe_attention_with_lepe(split_size):
  grid, heads, dim = (4, 6), 4, 8
  mixer = cswin.CrossShapedWindowAttention(num_heads=heads, split_size=split_size)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, dim)), jnp.float32)
  shapes = jax.eval_shape(functools.partial(mixer.init, grid=grid), jax.random.key(0), x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
                        shapes)["params"]
  assert set(params) == {"query", "key", "value", "out", "lepe_0"} | (
      {"lepe_1"} if split_size else set())
  w = jnp.asarray(rng.standard_normal((2, 24, dim)), jnp.float32)
  ours = lambda p, x: mixer.apply({"params": p}, x, grid=grid)  # noqa: E731
  ref = lambda p, x: _dense_cswin(p, x, grid, heads, split_size)  # noqa: E731
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x: (jnp.sum(f(p, x) * w), f(p, x)), argnums=(0, 1), has_aux=True))
  (_, y_ours), g_ours = value_and_grad(ours)(params, x)
  (_, y_ref), g_ref = value_and_grad(ref)(params, x)
  np.testing.assert_allclose(y_ours, y_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_ours, g_ref)


def test_cswin_is_a_mixer_for_other_backbones():
  grads = mixer_checks.tiny_vit_block_grads("cswin", pool="gap", mixer_kwargs=dict(split_size=2))
  for name in ("lepe_0", "lepe_1"):
    assert float(jnp.abs(grads["attn"][name]["kernel"]).sum()) > 0


def test_last_stage_is_one_branch_and_wide_stripes_are_clipped():
  """At 64 px the stage grids are 16, 8, 4, 2: stage 3's 7-wide stripes cover its 4x4 map (two
  branches over the whole map), stage 4 has one branch of all heads."""
  model = vitjax.create_model("cswin_tiny_224", num_classes=3, depths=(1, 1, 1, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert model.stage_grids((64, 64)) == [(16, 16), (8, 8), (4, 4), (2, 2)]
  stage3, stage4 = (params[f"stages_{i}"]["blocks_0"]["attn"] for i in (2, 3))
  assert stage3["lepe_0"]["kernel"].shape == (3, 3, 1, 128) and "lepe_1" in stage3
  assert stage4["lepe_0"]["kernel"].shape == (3, 3, 1, 512) and "lepe_1" not in stage4


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 224, 224, 3))
  make = functools.partial(vitjax.create_model, "cswin_tiny_224", num_classes=3)
  cases = [
      (dict(split_size=(1, 3, 7, 7)), r"CSWin stage 2 \(split_size\[1\]\) at 224x224 px: stripes "
                                      r"of split_size=3 do not tile the 28x28 token grid"),
      (dict(num_heads=(1, 4, 8, 16)), r"CSWin stage 1: num_heads=1 must be even"),
      (dict(split_size=(1, 2, 7)), r"split_size=\(1, 2, 7\) needs one entry per stage \(4\)"),
      (dict(split_size=(0, 2, 7, 7)), r"split_size=\(0, 2, 7\); allowed values are positive"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**overrides).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"cswin: stripes of split_size=2 do not tile the 5x4"):
    mixer = cswin.CrossShapedWindowAttention(num_heads=2, split_size=2)
    jax.eval_shape(functools.partial(mixer.init, grid=(5, 4)), jax.random.key(0),
                   jnp.zeros((1, 20, 8)))
