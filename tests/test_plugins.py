"""The plug-in switches of vitjax.models.plugins on the ViT: positions, norms, token reducers.

The members themselves (ResFormer, RPE-2D, DTN, LTM, IA-RED², ...) have their own test files; this
file checks the plug points: the learned table resampled to other grids, the fixed sin-cos table,
the stage cuts around reducers, the errors, and that the README's switch table lists exactly what
is registered.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

import vitjax
from vitjax.models import backbone, layers, plugins
from vitjax.ops import crossvit as crossvit_ops

SMALL = dict(num_classes=5, width=16, depth=3, num_heads=2, mlp_dim=32)
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _init(model, side=12, key=0):
  x = jax.random.normal(jax.random.key(key), (2, side, side, 1))
  return model.init(jax.random.key(1), x), x


def test_learned_table_resamples_to_other_grids():
  model = vitjax.create_model("vit_nano4", **SMALL, pool="tok")
  variables, _ = _init(model)
  table = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]    # (1, 1 + 9, D)
  assert table.shape == (1, 10, 16)
  tokens = backbone.Tokens(jnp.zeros((1, 1 + 25, 16)), grid=(5, 5), num_prefix=1)
  out = plugins.LearnedPositions().apply({"params": {"pos_embedding": table}}, tokens)
  # Plainly: the CLS row as is, the 3x3 patch rows through torch's bicubic matrix per axis.
  m = crossvit_ops.bicubic_matrix(3, 5)
  patches = np.einsum("ph,qw,hwd->pqd", m, m, np.asarray(table[0, 1:]).reshape(3, 3, 16))
  want = np.concatenate([np.asarray(table[0, :1]), patches.reshape(25, 16)])
  np.testing.assert_allclose(out.x[0], want, atol=1e-6)
  # The model runs at 20 px from params made at 12 px (3x3 -> 5x5 grid).
  x20 = jax.random.normal(jax.random.key(2), (2, 20, 20, 1))
  assert model.apply(variables, x20).shape == (2, 5)


def test_sincos_table_and_none():
  tokens = backbone.Tokens(jnp.zeros((1, 1 + 6, 8)), grid=(2, 3), num_prefix=1)
  out = plugins.SinCosPositions().apply({}, tokens).x[0]
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_allclose(out[1:], layers.posemb_sincos_2d(2, 3, 8).reshape(6, 8), atol=1e-7)
  assert plugins.NoPositions().apply({}, tokens) is tokens
  model = vitjax.create_model("vit_nano4", **SMALL, posemb="none")
  variables, _ = _init(model)
  assert "posembed_input" not in variables["params"]["Transformer"]


def test_split_stages_cuts_at_reduction_blocks():
  spec = backbone.StageSpec(depth=6, width=8)
  specs = backbone.split_stages([spec], (2, 4), "random", {"keep_ratio": 0.5})
  assert [s.depth for s in specs] == [2, 2, 2]
  assert [s.reducer for s in specs] == [None, "random", "random"]
  specs = backbone.split_stages([spec], (0,), "random", {"keep_ratio": 0.5})
  assert [(s.depth, s.reducer) for s in specs] == [(6, "random")]
  with pytest.raises(ValueError, match=r"reduction_blocks=\(6,\): allowed values are block "
                                       r"indices 0\.\.5"):
    backbone.split_stages([spec], (6,), "random", {"keep_ratio": 0.5})


def test_reducer_keeps_block_names_and_token_counts():
  model = vitjax.create_model("vit_nano4", **SMALL, token_reduction="random",
                              reduction_blocks=(1,), keep_ratio=0.5, pool="tok")
  variables, x = _init(model)
  plain = vitjax.create_model("vit_nano4", **SMALL, pool="tok")
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, plain.init(jax.random.key(1), x)))
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, backbone.EncoderBlock) and context.method_name == "__call__":
      seen[context.module.name] = out.x.shape
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  # 12 px / patch 4: 9 patch tokens + CLS; keep 0.5 -> ceil(4.5) = 5 patch tokens after block 0.
  assert seen == {"encoderblock_0": (2, 10, 16), "encoderblock_1": (2, 6, 16),
                  "encoderblock_2": (2, 6, 16)}


def test_features_after_a_reducer_are_refused():
  model = vitjax.create_model("vit_nano4", **SMALL, token_reduction="random",
                              reduction_blocks=(1,), keep_ratio=0.5)
  variables, x = _init(model)
  with pytest.raises(ValueError, match=r"blocks \[1, 2\] run after a token reducer"):
    model.apply(variables, x, features=True)
  model = model.clone(feature_blocks=(0,))
  _, out = model.apply(variables, x, features=True)
  assert out["stage1"].shape == (2, 3, 3, 16)


@pytest.mark.parametrize("field, value, allowed", [
    ("posemb", "lerned", "learn"),
    ("norm", "layernorm", "ln"),
    ("token_reduction", "drop", "none"),
])
def test_unknown_switch_values_list_the_allowed_ones(field, value, allowed):
  model = vitjax.create_model("vit_nano4", **SMALL, **{field: value})
  with pytest.raises(ValueError, match=rf"Unknown {field}='{value}'.*Allowed values: .*{allowed}"):
    _init(model)


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_keep_ratio_outside_0_1(keep):
  model = vitjax.create_model("vit_nano4", **SMALL, token_reduction="random",
                              reduction_blocks=(1,), keep_ratio=keep)
  with pytest.raises(ValueError, match=rf"keep_ratio={keep}: allowed values are in \(0, 1\]"):
    _init(model)


def test_reducer_needs_blocks():
  model = vitjax.create_model("vit_nano4", **SMALL, token_reduction="random")
  with pytest.raises(ValueError, match="needs reduction_blocks"):
    _init(model)


def test_readme_switch_table_lists_the_registries():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Plug-ins", 1)[1].split("\n## ", 1)[0]
  for field, values in plugins.registered().items():
    row = re.search(rf"^\| `{field}` \|(.*)$", section, flags=re.M)
    assert row, f"README's plug-in table has no row for {field}"
    listed = set(re.findall(r"`'([a-z0-9_]+)'`", row.group(1)))
    assert listed == set(values), (field, listed, values)
