"""Swin: parameter counts equal timm's, logits equal timm's on perturbed weights (a reduced model
with shifted, clipped and merged windows, and swin_tiny at 224 px), the 'window_attn' mixer in
another backbone, the padding path, and clear errors."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import backbone, swin
from vitjax.models.backbone import Tokens

from tests import mixer_checks, torch_compat

# 1000 classes at 224 px; timm's `sum(p.numel() for p in model.parameters())`.
PINNED_COUNTS = {
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_variables(model, x, seed=0):
  """N(0, 0.2) values in the shapes of model.init's (jit-compiling init costs seconds)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes) == PINNED_COUNTS[name]


# A reduced Swin: 32 px, patch 2, window 4 -> stage grids 16, 8, 4: plain then shifted windows
# with masks in stage 1, a 2x2 window grid after patch merging in stage 2, a window clipped to
# the map (no shift) in stage 3.
REDUCED = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 1, 1), num_heads=(2, 2, 4),
               window_size=4, num_classes=5)


def perturb(torch, model, seed):
  """Re-draws every parameter away from its init (bias tables and LayerNorms included)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:                                     # norm weights and biases
        p.add_(0.2 * noise)
      else:
        fan_in = p.numel() // p.shape[0]
        p.add_(max(0.5 * float(p.std()), 0.5 / math.sqrt(fan_in)) * noise)


def _parity(torch, timm_model, size, batch, *, grads=False):
  perturb(torch, timm_model, 1)
  state = timm_model.state_dict()
  model, variables, meta = convert.from_timm(state, "swin_tiny_patch4_window7_224")
  assert meta["image_size"] == [size, size]
  assert _count(variables) == sum(p.numel() for p in timm_model.parameters())
  x = np.random.default_rng(2).standard_normal((batch, size, size, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(grads)
  ref = timm_model(xt)
  if not grads:
    logits = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(logits, ref.detach().numpy(), atol=1e-4, rtol=1e-4)
    return model
  w = np.random.default_rng(3).standard_normal(ref.shape).astype(np.float32)
  (ref * torch.from_numpy(w)).sum().backward()
  def loss(x):
    logits = model.apply(variables, x)
    return jnp.sum(logits * w), logits
  (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  np.testing.assert_allclose(logits, ref.detach().numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(g, xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-3)
  return model


def test_reduced_swin_matches_timm():
  torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.swin_transformer import SwinTransformer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = _parity(torch, SwinTransformer(**REDUCED).eval(), 32, 2, grads=True)
  assert model.depths == (2, 1, 1) and model.num_heads == (2, 2, 4) and model.window == 4


def test_swin_tiny_matches_timm_at_224():
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  with torch.no_grad():
    _parity(torch, timm.create_model("swin_tiny_patch4_window7_224").eval(), 224, 1)


def test_from_timm_is_strict():
  state = {"patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32),
           "layers.0.blocks.0.attn.relative_position_bias_table": np.zeros((9, 2), np.float32),
           "layers.0.blocks.0.attn.qkv.weight": np.zeros((24, 8), np.float32),
           "layers.0.blocks.0.attn.relative_position_index": np.zeros((4, 4), np.int64),
           "layers.0.blocks.0.attn.lepe.weight": np.zeros((8,), np.float32)}
  with pytest.raises(ValueError, match=r"(?s)timm swin.*attn\.lepe\.weight.*missing"):
    convert.from_timm(state, "swin_tiny_patch4_window7_224", num_classes=0)


def test_window_attn_is_a_mixer_for_other_backbones():
  grads = mixer_checks.tiny_vit_block_grads("window_attn", pool="gap",
                                            mixer_kwargs=dict(window=2, shift=1))
  table = grads["attn"]["relative_position_bias_table"]
  assert table.shape[0] == 9 and float(jnp.abs(table).sum()) > 0      # (2*2 - 1)^2 offsets


def test_blocks_alternate_the_shift_within_each_stage():
  """Even blocks of a stage use plain windows, odd ones windows shifted by window // 2 (timm),
  through the stage's block_cycle: a stage equals its blocks applied one by one with those
  shifts, and the shift changes the function."""
  model = vitjax.create_model("swin_tiny_patch4_window7_224", num_classes=3, embed_dim=8,
                              depths=(2,), num_heads=2, window=2)
  spec, = model.stage_specs()
  assert spec.block_cycle == (dict(shift=0), dict(shift=1))
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
  tokens = Tokens.from_map(x)

  class OneStage(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return backbone.run_stages(self, tokens, (spec,))[0]

  variables = random_variables(OneStage(), tokens)
  stage = variables["params"]["stages_0"]
  y = OneStage().apply(variables, tokens).x
  block = functools.partial(swin.SwinBlock, mlp_dim=32, num_heads=2, window=2)
  step = lambda shift, j, t: block(shift=shift).apply(  # noqa: E731
      {"params": stage[f"blocks_{j}"]}, t)
  np.testing.assert_allclose(y, step(1, 1, step(0, 0, tokens)).x, atol=1e-6)
  assert not np.allclose(y, step(0, 1, step(0, 0, tokens)).x, atol=1e-4)


def test_maps_the_windows_do_not_tile_are_padded():
  """40 px: the 10x10 map is padded to 12x12 for 4x4 windows, plain and shifted."""
  model = vitjax.create_model("swin_tiny_patch4_window7_224", num_classes=3, embed_dim=8,
                              depths=(2,), num_heads=2, window=4)
  x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
  variables = random_variables(model, x)
  logits, out = jax.jit(functools.partial(model.apply, features=True))(variables, x)
  assert out["stage1"].shape == (2, 10, 10, 8)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  table = variables["params"]["stages_0"]["blocks_1"]["attn"]["relative_position_bias_table"]
  assert table.shape == (49, 2)                   # a full 4x4 window's table, not clipped


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 64, 64, 3))
  make = functools.partial(vitjax.create_model, "swin_tiny_patch4_window7_224", num_classes=3)
  cases = [
      (dict(num_heads=(3, 6)), r"num_heads=\(3, 6\) needs one entry per stage \(4\)"),
      (dict(embed_dim=8, num_heads=3), r"Swin stage 1: width 8 is not divisible by num_heads=3"),
      (dict(window=0), r"window=0; allowed values are positive integers"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**overrides).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"shift=4; allowed values are 0 <= shift < window=4"):
    jax.eval_shape(swin.WindowAttention(num_heads=1, window=4, shift=4).init, jax.random.key(0),
                   jnp.zeros((1, 16, 8)), grid=(4, 4))
