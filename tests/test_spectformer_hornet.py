"""SpectFormer and HorNet backbones: pinned parameter counts, block structure, tiny forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models import create_model, list_models
from vitjax.models.backbone import Tokens
from vitjax.models.hornet import HorNetBlock
from vitjax.models.spectformer import SpectralBlock
from vitjax.models.spectral_mixers import GnConv
from vitjax.ops import spectral

TOL = dict(rtol=1e-4, atol=1e-4)


def _num_params(name, **overrides):
  model = create_model(name, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def _official_spectformer_count(width, depth, alpha, patch=16, image=224, classes=1000):
  """Parameters of the official vanilla SpectFormer module list (badripatro/SpectFormers,
  vanilla_architecture/spectformer.py; 'spectformer-s' in main_spectformer.py), counted by hand."""
  n_tok, mlp = (image // patch) ** 2, 4 * width
  grid = image // patch
  mlp_params = width * mlp + mlp + mlp * width + width
  spectral_block = 2 * width + grid * (grid // 2 + 1) * width * 2 + 2 * width + mlp_params
  qkv_proj = 3 * (width * width + width) + width * width + width
  attn_block = 2 * width + qkv_proj + 2 * width + mlp_params
  return (3 * patch * patch * width + width + n_tok * width + alpha * spectral_block
          + (depth - alpha) * attn_block + 2 * width + width * classes + classes)


def _official_hornet_count(base, gf, depths=(2, 3, 18, 2), classes=1000):
  """Parameters of the official HorNet module list (raoyongming/HorNet, hornet.py), by hand."""
  def gnconv(dim, order, gf_layer, fh, fw):
    dims = [dim // 2 ** i for i in range(order)][::-1]
    s = sum(dims)
    n = 2 * dim * dim + 2 * dim + dim * dim + dim                       # proj_in, proj_out
    n += sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(order - 1))  # pws
    if gf_layer:  # dw 3x3 (no bias) on s/2, complex weight on s/2, pre/post LayerNorm on s
      return n + s // 2 * 9 + s // 2 * fh * fw * 2 + 4 * s
    return n + 49 * s + s                                               # dwconv 7x7
  dims = [base * 2 ** i for i in range(4)]
  filters = [(0, 0), (0, 0), (14, 8), (7, 4)]                           # official h, w at 224 px
  n = 3 * dims[0] * 16 + dims[0] + 2 * dims[0]                          # stem conv + LN
  n += sum(2 * dims[i] + 4 * dims[i] * dims[i + 1] + dims[i + 1] for i in range(3))
  for i in range(4):
    d = dims[i]
    block = 4 * d + 2 * d + 8 * d * d + 5 * d + gnconv(d, i + 2, gf and i >= 2, *filters[i])
    n += depths[i] * block
  return n + 2 * dims[3] + dims[3] * classes + classes


# name: (pinned count, count of the official module structure, README figure in millions).
# README figures: badripatro/SpectFormers vanilla_architecture/README.md ("SpectFormer-S 32M", the
# vanilla 19-layer model of main_spectformer.py's 'spectformer-s'; the hierarchical SpectFormer-H-S
# is a different model) and raoyongming/HorNet README.md's ImageNet-1K model zoo. They are rounded
# to whole millions; the pinned counts equal the official code's, counted by hand above and, when
# this was written, by instantiating the official PyTorch modules (not a test dependency).
PINNED_COUNTS = {
    "spectformer_s": (32_449_768, _official_spectformer_count(384, 19, 4), 32),
    "hornet_t": (22_409_512, _official_hornet_count(64, False), 22),
    "hornet_t_gf": (22_991_848, _official_hornet_count(64, True), 23),
    "hornet_s": (49_528_264, _official_hornet_count(96, False), 50),
    "hornet_s_gf": (50_401_768, _official_hornet_count(96, True), 50),
    "hornet_b": (87_256_680, _official_hornet_count(128, False), 87),
    "hornet_b_gf": (88_421_352, _official_hornet_count(128, True), 88),
}


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_parameter_counts_match_official(name):
  pinned, official, readme_m = PINNED_COUNTS[name]
  assert name in list_models()
  assert official == pinned
  assert round(pinned / 1e6) == readme_m
  assert _num_params(name) == pinned


def _random_params(module, *args, seed, **kwargs):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _mlp(x, p):
  h = jax.nn.gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], approximate=False)
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def test_spectral_block_is_one_residual_around_filter_and_mlp():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  tokens = Tokens(x, grid=(3, 4), num_prefix=0)
  block = SpectralBlock(mlp_dim=16)
  p = _random_params(block, tokens, seed=1)
  y = block.apply({"params": p}, tokens).x
  u = _ln(x, p["LayerNorm_0"], 1e-6).reshape(2, 3, 4, 8)
  u = spectral.spectral_gating(u, spectral.filter_for_grid(p["mixer"]["complex_weight"], (3, 4)))
  expect = x + _mlp(_ln(u.reshape(2, 12, 8), p["LayerNorm_1"], 1e-6), p["MlpBlock_0"])
  np.testing.assert_allclose(y, expect, **TOL)


def test_hornet_block_residuals_and_layer_scale():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  tokens = Tokens(x, grid=(3, 4), num_prefix=0)
  block = HorNetBlock(mlp_dim=32, mixer_kwargs=dict(order=2))
  p = _random_params(block, tokens, seed=3)
  y = block.apply({"params": p}, tokens).x
  g = GnConv(order=2).apply({"params": p["mixer"]}, _ln(x, p["norm1"], 1e-6), grid=(3, 4))
  x1 = x + p["gamma1"] * g
  expect = x1 + p["gamma2"] * _mlp(_ln(x1, p["norm2"], 1e-6), p["mlp"])
  np.testing.assert_allclose(y, expect, **TOL)


def test_spectformer_layout():
  model = create_model("spectformer_s", width=32, depth=3, num_spectral=2, mlp_dim=64,
                       num_heads=2, patch_size=4, num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  blocks = shapes["params"]["Transformer"]
  assert blocks["posembed_input"]["pos_embedding"].shape == (1, 16, 32)  # no CLS token
  assert blocks["encoderblock_1"]["mixer"]["complex_weight"].shape == (4, 3, 32, 2)
  assert "MultiHeadDotProductAttention_0" in blocks["encoderblock_2"]


@pytest.mark.parametrize("name,overrides,image", [
    ("spectformer_s", dict(width=32, depth=3, num_spectral=2, mlp_dim=64, num_heads=2,
                           patch_size=4), 16),
    ("hornet_t", dict(base_dim=16, depths=(1, 1, 1, 1)), 32),
    ("hornet_t_gf", dict(base_dim=16, depths=(1, 1, 1, 1)), 64),
])
def test_tiny_forward(name, overrides, image):
  # Random values for every parameter (init's shapes via eval_shape): one compile per model, and
  # no zero-initialised head or 1e-6 layer scale hiding a broken path.
  model = create_model(name, num_classes=10, **overrides)
  images = jnp.asarray(np.random.default_rng(4).normal(size=(2, image, image, 3)), jnp.float32)
  params = _random_params(model, images, seed=5)
  logits = jax.jit(model.apply)({"params": params}, images)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 0


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="data.image_size"):
    create_model("hornet_t").init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 3)))
  with pytest.raises(ValueError, match="variants"):
    create_model("hornet_t", variants=("dwconv", "gf", "fft", "gf")).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="num_spectral"):
    create_model("spectformer_s", num_spectral=20).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="Unknown HorNet field"):
    create_model("hornet_t", widths=3)
