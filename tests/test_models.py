"""Registry, parameter counts and the forward contract of every registered model."""
import fnmatch
import glob
import importlib
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import registry

# Pinned parameter counts (1000 classes, init at the model's reference resolution). Reference figures:
# timm vit_{tiny,small,base,large}_patch16_224 / vit_base_patch32_224 = 5,717,416 / 22,050,664 /
# 86,567,656 / 304,326,632 / 88,224,232.
VIT_COUNTS = {
    "vit_ti16": (224, 5_717_416),
    "vit_s16": (224, 22_050_664),
    "vit_b16": (224, 86_567_656),
    "vit_l16": (224, 304_326_632),
    "vit_b32": (224, 88_224_232),
    "vit_nano4": (28, None),
    "vit_ti4": (32, None),
    "vit_s4": (32, None),
}


def count_params(model, image_size, channels=3, **apply_kw):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, channels)), **apply_kw)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _analytic_vit(patch, width, depth, mlp, n_tokens, classes=1000, channels=3):
  block = 4 * (width * width + width) + 2 * 2 * width + 2 * width * mlp + mlp + width
  return (patch * patch * channels * width + width + width + (n_tokens + 1) * width
          + depth * block + 2 * width + width * classes + classes)


@pytest.mark.parametrize("name", sorted(VIT_COUNTS))
def test_vit_param_counts(name):
  size, pinned = VIT_COUNTS[name]
  model = vitjax.create_model(name)
  got = count_params(model, size)
  v = vitjax.models.vit.VARIANTS[name]
  assert got == _analytic_vit(v["patch_size"], v["width"], v["depth"], v["mlp_dim"],
                              (size // v["patch_size"]) ** 2)
  if pinned is not None:
    assert got == pinned


def test_every_registered_model_has_a_pinned_count():
  """Each family's test file pins its models in a PINNED_COUNTS dict; this guards against a
  registration nobody counts."""
  pinned = set(VIT_COUNTS)
  for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "test_*.py"))):
    name = os.path.basename(path)[:-3]
    with open(path) as f:
      if "\nPINNED_COUNTS" not in f.read():
        continue
    pinned |= set(importlib.import_module(f"tests.{name}").PINNED_COUNTS)
  # Models the library registers (tests register tiny models of their own, e.g. 'test_bn_tiny').
  library = [n for n in vitjax.list_models()
             if getattr(getattr(registry.MODELS[n], "func", registry.MODELS[n]), "__module__",
                        "").startswith("vitjax.")]
  assert "vit_b16" in library and "cvt_13" in library
  missing = [n for n in library if n not in pinned]
  assert not missing, f"registered models without a pinned parameter count: {missing}"


def test_list_models_pattern():
  assert vitjax.list_models("vit_*16") == ["vit_b16", "vit_l16", "vit_s16", "vit_ti16"]
  assert all(fnmatch.fnmatch(n, "vit*") for n in vitjax.list_models("vit*"))


def test_unknown_model_lists_close_names():
  with pytest.raises(ValueError, match=r"model_name='vit_b61'.*vit_b16"):
    vitjax.create_model("vit_b61")


def test_unknown_override_is_rejected():
  with pytest.raises(ValueError, match="widht"):
    vitjax.create_model("vit_ti16", widht=3)


def test_none_overrides_are_dropped():
  assert vitjax.create_model("vit_ti16", num_classes=None).num_classes == 1000


def test_unknown_mixer_lists_allowed():
  model = vitjax.create_model("vit_nano4", mixer="mhsaa", num_classes=3)
  with pytest.raises(ValueError, match=r"mixer='mhsaa'.*mhsa"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_image_size_not_divisible_by_patch():
  model = vitjax.create_model("vit_nano4", num_classes=3)
  with pytest.raises(ValueError, match=r"image_size.*30x30.*patch_size=4"):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 1)))


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_forward_and_dropout(pool):
  model = vitjax.create_model("vit_nano4", num_classes=5, depth=2, width=32, mlp_dim=64,
                              num_heads=2, pool=pool, dropout=0.1, drop_path=0.2)
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
  variables = model.init(jax.random.key(0), x)
  # A random (non-zero) head so the logits depend on the input.
  head = variables["params"]["head"]["kernel"]
  variables["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(3), head.shape)
  eval1 = model.apply(variables, x, train=False)
  eval2 = model.apply(variables, x, train=False)
  chex.assert_shape(eval1, (2, 5))
  chex.assert_tree_all_finite(eval1)
  np.testing.assert_array_equal(eval1, eval2)
  tr1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  tr2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(tr1, tr2), "train=True must use the 'dropout' rng"
  assert not np.allclose(tr1, eval1)


def test_mhsa_matches_flax_attention():
  """The 'mhsa' mixer has Flax's param layout and gives Flax's numbers with the same params."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from vitjax.models.mixers import MultiHeadSelfAttention  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  ours = MultiHeadSelfAttention(num_heads=4)
  params = ours.init(jax.random.key(1), x)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x, x), atol=1e-5)
  g1 = jax.grad(lambda p: ours.apply(p, x).sum())(params)
  g2 = jax.grad(lambda p: ref.apply(p, x, x).sum())(params)
  chex.assert_trees_all_close(g1, g2, atol=1e-5)


def test_param_names_follow_vit_jax():
  shapes = jax.eval_shape(vitjax.create_model("vit_nano4", depth=1).init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 1)))["params"]
  assert set(shapes) == {"embedding", "cls", "Transformer", "head"}
  assert set(shapes["Transformer"]) == {"posembed_input", "encoderblock_0", "encoder_norm"}
  assert set(shapes["Transformer"]["encoderblock_0"]) == {
      "LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"}


def test_registry_rejects_duplicates():
  with pytest.raises(ValueError, match="registered twice"):
    registry.register_model("vit_b16")(lambda **kw: None)
