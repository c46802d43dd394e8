"""The multi-stage backbone: stage specs, the drop-path rule, blocks by name or class, features
for every registered model, stable parameter trees, and the Flax NNX recipe of the README."""
import functools
import json
import os
from typing import ClassVar

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vitjax
from vitjax.models import backbone, layers, registry
from vitjax.models.backbone import MultiStageModel, StageSpec, Tokens

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _shapes(model, size, **kw):
  return jax.eval_shape(functools.partial(model.init, **kw), jax.random.key(0),
                        jnp.zeros((1, size, size, 3)))


def test_drop_path_rates_follow_timms_linear_rule():
  rates = backbone.drop_path_rates((3, 3, 9, 3), 0.2)
  assert [len(r) for r in rates] == [3, 3, 9, 3]
  flat = np.concatenate(rates)
  np.testing.assert_allclose(flat, np.linspace(0.0, 0.2, 18), atol=1e-7)
  assert backbone.drop_path_rates((1,), 0.3) == [[0.0]]


def test_spaced_feature_blocks():
  assert backbone.spaced_blocks(12) == (2, 5, 8, 11)
  assert backbone.spaced_blocks(3) == (0, 1, 2)
  assert backbone.spaced_blocks(19) == (4, 9, 13, 18)
  with pytest.raises(ValueError, match=r"feature_blocks=\(7,\).*0\.\.5"):
    backbone.check_feature_blocks((7,), 6)


# Parameter trees saved before HorNet, SpectFormer, ViT and LookupViT moved onto the stages
# (paths and shapes at 224 px, 1000 classes): checkpoints written before the change still load.
@pytest.mark.parametrize("name", ["hornet_t", "hornet_t_gf", "spectformer_s", "vit_b16",
                                  "lookupvit_ti16"])
def test_parameter_trees_are_unchanged(name):
  with open(os.path.join(GOLDEN, "param_trees.json")) as f:
    before = json.load(f)[name]
  flat = flax.traverse_util.flatten_dict(_shapes(vitjax.create_model(name), 224), sep="/")
  now = {k: list(v.shape) for k, v in flat.items()}
  assert sorted(set(before) - set(now)) == [] and sorted(set(now) - set(before)) == []
  assert now == before


# --------------------------------------------------------------------------------------------
# Features: every registered model, two input sizes, shapes from feature_info.
#
# Tracing cost grows with depth, and the feature taps and strides do not depend on it: each model is
# traced with every stage capped at two blocks and isotropic models at four (`_shallow`), and models that are then the same
# module (convnext_tiny and convnext_small, ...) are traced once. Every model's feature_info is
# still checked on its own, at full depth (`test_feature_info_of_every_model`).

def _cap(value, most: int):
  if isinstance(value, int):
    return min(value, most)
  if isinstance(value, (tuple, list)) and value:
    capped = [_cap(v, 2) for v in value]
    return None if any(c is None for c in capped) else tuple(capped)
  return None


def _shallow(name) -> dict:
  """create_model overrides that cap 'depths' (per stage, nested tuples too) at 2 blocks and an
  isotropic 'depth' at 4 (its features are up to four taps spread over the depth)."""
  model = vitjax.create_model(name)
  caps = {f: _cap(getattr(model, f), 4) for f in ("depth", "depths") if hasattr(model, f)}
  return {f: v for f, v in caps.items() if v is not None}


def _feature_case(name, overrides):
  """Two input sizes that keep the model cheap to trace."""
  info = vitjax.feature_info(name, **overrides)
  stride = max(f.stride for f in info)
  if name.startswith("lookupvit"):
    model = vitjax.create_model(name, **overrides)
    size = model.table_grid[0] * model.patch_size
    return size, size + 2 * model.patch_size
  return (2 * stride, 3 * stride) if stride >= 16 else (4 * stride, 6 * stride)


def _library_models():
  """Registered models of the library (tests register tiny models of their own)."""
  factory = lambda n: registry.MODELS[n]  # noqa: E731
  return [n for n in vitjax.list_models()
          if getattr(getattr(factory(n), "func", factory(n)), "__module__", "").startswith("vitjax.")]


def _distinct_shallow_models():
  """One name per distinct shallow module, with the names it stands for."""
  seen = {}
  for name in _library_models():
    seen.setdefault(repr(vitjax.create_model(name, num_classes=7, **_shallow(name))), []).append(name)
  return [pytest.param(names[0], id="=".join(names)) for names in seen.values()]


def test_feature_info_of_every_model():
  for name in _library_models():
    info = vitjax.create_model(name).feature_info()
    assert info == vitjax.feature_info(name), name
    assert info[0].name == "stem" and [f.name for f in info[1:]] == [
        f"stage{i + 1}" for i in range(len(info) - 1)], name
    assert all(f.channels > 0 and f.stride >= 1 for f in info), (name, info)


@pytest.mark.parametrize("name", _distinct_shallow_models())
def test_features_agree_with_feature_info(name):
  overrides = _shallow(name)
  model = vitjax.create_model(name, num_classes=7, **overrides)
  info = model.feature_info()
  assert info == vitjax.feature_info(name, num_classes=7, **overrides)
  assert info[0].name == "stem" and [f.name for f in info[1:]] == [
      f"stage{i + 1}" for i in range(len(info) - 1)]
  full = vitjax.feature_info(name, num_classes=7)
  assert [(f.name, f.stride, f.channels) for f in info] == [
      (f.name, f.stride, f.channels) for f in full], "capping the depth changed the features"
  for size in _feature_case(name, overrides):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    logits, out = jax.eval_shape(functools.partial(model.apply, train=False, features=True),
                                 variables, x)
    assert logits.shape == (2, 7)
    assert set(out) == {f.name for f in info} | {"pre_logits"}, sorted(out)
    for f in info:
      assert out[f.name].shape == (2, size // f.stride, size // f.stride, f.channels), (
          name, size, f)
    assert out["pre_logits"].shape[0] == 2 and out["pre_logits"].ndim == 2


@pytest.mark.parametrize("name", ["vit_nano4", "hornet_t"])
def test_headless_model_returns_pre_logits(name):
  small = dict(depth=2, width=32, mlp_dim=64, num_heads=2) if name.startswith("vit") else dict(
      depths=(1, 1, 1, 1), base_dim=8)
  size = 8 if name.startswith("vit") else 32
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  with_head = vitjax.create_model(name, num_classes=5, **small)
  headless = vitjax.create_model(name, num_classes=0, **small)
  variables = with_head.init(jax.random.key(0), x)
  params = dict(variables["params"])
  assert "head" in params
  del params["head"]
  v0 = headless.init(jax.random.key(0), x)
  assert "head" not in v0["params"]
  chex.assert_trees_all_equal_shapes(v0["params"], params)
  pre = headless.apply({"params": params}, x)
  logits, out = with_head.apply(variables, x, features=True)
  np.testing.assert_allclose(pre, out["pre_logits"], atol=1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, pre @ head["kernel"] + head["bias"], atol=1e-5)


def test_vit_features_are_the_tokens_of_the_requested_blocks():
  model = vitjax.create_model("vit_nano4", num_classes=3, depth=3, width=16, mlp_dim=32,
                              num_heads=2, feature_blocks=(0, 2))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  _, out = model.apply(variables, x, features=True)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]["Transformer"]
  for stage, block in (("stage1", 0), ("stage2", 2)):
    tokens = inter[f"encoderblock_{block}"]["__call__"][0]
    np.testing.assert_allclose(out[stage], tokens.x[:, 1:].reshape(2, 2, 2, 16), atol=1e-6)


def test_image_size_not_divisible_by_total_stride():
  model = vitjax.create_model("hornet_t", depths=(1, 1, 1, 1), base_dim=8)
  with pytest.raises(ValueError, match=r"data.image_size: image size 48x48 .*total stride=32"):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))


# --------------------------------------------------------------------------------------------
# Stages, blocks and mixers by name, class or partial.

class _Toy(MultiStageModel):
  """A two-stage model used to exercise StageSpec: conv stem, 'norm_conv' downsampling."""
  widths: tuple[int, int] = (8, 16)
  block: object = "vit"
  block_kwargs: object = None

  def stem_stride(self):
    return 2

  def stem(self, images, *, train):
    return nn.Conv(self.widths[0], (2, 2), strides=(2, 2), name="stem")(images)

  def stage_specs(self):
    kwargs = dict(self.block_kwargs or dict(mlp_dim=16))
    return (StageSpec(1, self.widths[0], self.block, kwargs, shared=dict(num_heads=2)),
            StageSpec(2, self.widths[1], self.block, kwargs, shared=dict(num_heads=2),
                      downsample="norm_conv"))

  def pool(self, tokens, *, train):
    return tokens.x.mean(axis=1)


def test_nested_stage_names_and_feature_info():
  model = _Toy(num_classes=3)
  params = _shapes(model, 8)["params"]
  assert set(params) == {"stem", "stages_0", "stages_1", "head"}
  assert set(params["stages_1"]) == {"downsample", "blocks_0", "blocks_1"}
  assert set(params["stages_1"]["downsample"]) == {"norm", "conv"}
  assert [tuple(f) for f in model.feature_info()] == [
      ("stem", 8, 2), ("stage1", 8, 2), ("stage2", 16, 4)]


def test_blocks_by_name_class_or_partial_give_the_same_model():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  by_name = _Toy(num_classes=3)
  by_class = _Toy(num_classes=3, block=backbone.EncoderBlock)
  by_partial = _Toy(num_classes=3, block=functools.partial(backbone.EncoderBlock, mlp_dim=16),
                    block_kwargs=dict(mixer="mhsa"))
  variables = by_name.init(jax.random.key(1), x)
  ref = by_name.apply(variables, x)
  for model in (by_class, by_partial):
    np.testing.assert_allclose(model.apply(variables, x), ref, atol=1e-6)


def test_unknown_block_field_names_the_block_and_allowed_fields():
  model = _Toy(num_classes=3, block_kwargs=dict(mlp_dim=16, heads=3))
  with pytest.raises(ValueError, match=r"block 'vit' field\(s\) \['heads'\].*num_heads"):
    _shapes(model, 8)
  with pytest.raises(ValueError, match=r"Unknown block block='vitt'.*Did you mean: vit"):
    _shapes(_Toy(num_classes=3, block="vitt"), 8)


def test_blocks_declare_only_the_fields_they_use():
  """A block without attention has no placeholder num_heads; the model's shared fields reach
  only the blocks (and mixers) that declare them."""
  for name in ("hornet", "spectral"):
    assert "num_heads" not in layers.module_fields(registry.get_block(name)), name
  model = vitjax.create_model("vit_nano4", num_classes=3, depth=1, width=16, mlp_dim=32,
                              num_heads=2, block="hornet", mixer="gnconv", pool="gap")
  block = _shapes(model, 8)["params"]["Transformer"]["encoderblock_0"]
  assert {"gamma1", "gamma2", "mixer"} <= set(block) and "proj_in" in block["mixer"]


def test_user_registered_mixer_is_usable_by_name_and_as_a_class():

  class Doubler(nn.Module):
    """Scales its input by a learned per-channel factor (a toy mixer)."""
    needs_grid: ClassVar[bool] = False
    init_value: float = 2.0

    @nn.compact
    def __call__(self, x, *, train=False):
      return x * self.param("factor", nn.initializers.constant(self.init_value), x.shape[-1:])

  if "test_doubler" not in registry.MIXERS:
    vitjax.register_mixer("test_doubler")(Doubler)
  assert "test_doubler" in vitjax.list_mixers()
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  kw = dict(num_classes=3, depth=1, width=16, mlp_dim=32, num_heads=2, pool="gap")
  by_name = vitjax.create_model("vit_nano4", mixer="test_doubler", **kw)
  by_class = vitjax.create_model("vit_nano4", mixer=functools.partial(Doubler, init_value=2.0),
                                 **kw)
  variables = by_name.init(jax.random.key(1), x)
  assert "factor" in variables["params"]["Transformer"]["encoderblock_0"]["mixer"]
  np.testing.assert_allclose(by_class.apply(variables, x), by_name.apply(variables, x))


def test_register_decorators_are_exported():
  for name in ("register_model", "register_block", "register_mixer", "register_downsample"):
    assert getattr(vitjax, name) is getattr(registry, name)


def test_downsampling_layers():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  merge = layers.PatchMerging(6)
  v = merge.init(jax.random.key(1), x)
  y = merge.apply(v, x)
  # Swin's order: x0 = (0, 0), x1 = (1, 0), x2 = (0, 1), x3 = (1, 1) of each 2x2 cell.
  cat = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        -1)
  ref = nn.LayerNorm(epsilon=1e-5).apply({"params": v["params"]["norm"]}, cat)
  np.testing.assert_allclose(y, ref @ v["params"]["reduction"]["kernel"], atol=1e-5)
  conv = layers.ConvNorm(5, stride=2, kernel_size=3, padding=1)
  assert conv.apply(conv.init(jax.random.key(1), x), x).shape == (2, 4, 4, 5)
  assert layers.downsample_stride(layers.ConvNorm, dict(stride=4)) == 4
  assert layers.downsample_stride(registry.get_downsample("patch_merge"), None) == 2


def test_stage_cls_token_becomes_a_prefix():
  spec = StageSpec(1, 8, "vit", dict(mlp_dim=16), shared=dict(num_heads=2), cls_token=True)

  class OneStage(nn.Module):
    @nn.compact
    def __call__(self, x):
      tokens, _ = backbone.run_stages(self, Tokens.from_map(x), (spec,))
      return tokens

  x = jnp.zeros((2, 3, 3, 8))
  tokens, variables = OneStage().init_with_output(jax.random.key(0), x)
  assert tokens.x.shape == (2, 10, 8) and tokens.num_prefix == 1
  assert variables["params"]["stages_0"]["cls_token"].shape == (1, 1, 8)


# --------------------------------------------------------------------------------------------
# Flax NNX: the README's recipe.

def test_nnx_bridge_recipe_trains_and_reads_features():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  linen_model = vitjax.create_model("hornet_t", depths=(1, 1, 1, 1), base_dim=8, num_classes=5,
                                    drop_path=0.1)
  model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, dropout=1))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.array([0, 1, 2, 3])
  nnx.bridge.lazy_init(model, x)
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(8)]
  assert losses[-1] < losses[0], losses
  after = nnx.state(model, nnx.Param)
  assert not np.allclose(before["head"]["kernel"][...], after["head"]["kernel"][...])
  logits, out = model(x, train=False, features=True)
  assert logits.shape == (4, 5)
  assert [out[f"stage{i}"].shape for i in range(1, 5)] == [
      (4, 8, 8, 8), (4, 4, 4, 16), (4, 2, 2, 32), (4, 1, 1, 64)]
