"""ConvNeXt (vitjax.models.convnext) and its timm converter family.

  * pinned parameter counts (equal to timm's, which the torch test also checks directly);
  * without torch: a timm-layout state dict of random numpy arrays (both MLP forms, Linear and
    timm's conv_mlp 1x1 convolutions), converted, gives the logits, stage features and input
    gradient of a plainly written forward pass over timm's layout (lax convolutions in NCHW/OIHW),
    with both depthwise-convolution implementations; a headless state dict gives a headless model;
  * the features contract, drop path, field validation, and the one clear error for a state dict
    of another family;
  * with torch + timm (skipped otherwise): timm models with EVERY parameter re-drawn (layer-scale
    gammas far from their 1e-6 init, LayerNorm scales and biases included) and their converted
    twins agree on logits within 1e-4, and convnext_atto on the input gradient and on
    `forward_features` (= out['stage4']).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import backbone
from vitjax.models import convnext

from tests import torch_compat

# 1000 classes, 224 px; equal to timm 1.0.31's `sum(p.numel() for p in model.parameters())`.
PINNED_COUNTS = {
    "convnext_atto": 3_695_520,
    "convnext_femto": 5_217_784,
    "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
}

# A small ConvNeXt: at 32 px its stages see 8x8, 4x4, 2x2 and 1x1 maps, so the 7x7 depthwise
# kernel is used whole, cropped to 3x3 and cropped to its centre tap.
DEPTHS, DIMS, CLASSES, SIZE = (1, 1, 2, 1), (8, 16, 24, 32), 5, 32


def _num_params(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  model = vitjax.create_model(name, dwconv_impl="xla")   # the count does not depend on it
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert _num_params(shapes) == PINNED_COUNTS[name]
  assert name in convert.supported_models()


# ---------------------------------------------------------------------------- timm layout, no torch


def fake_timm_convnext(seed=0, *, depths=DEPTHS, dims=DIMS, classes=CLASSES, conv_mlp=False,
                       head=True):
  """A timm ConvNeXt state dict (timm's key names and layouts) of random float32 arrays, every
  entry re-drawn: unit-gain weights, LayerNorm scales near 1, layer scale near 0.5."""
  shapes = {"stem.0.weight": (dims[0], 3, 4, 4), "stem.0.bias": (dims[0],),
            "stem.1.weight": (dims[0],), "stem.1.bias": (dims[0],)}
  for i, (depth, dim) in enumerate(zip(depths, dims)):
    if i:
      shapes.update({f"stages.{i}.downsample.0.weight": (dims[i - 1],),
                     f"stages.{i}.downsample.0.bias": (dims[i - 1],),
                     f"stages.{i}.downsample.1.weight": (dim, dims[i - 1], 2, 2),
                     f"stages.{i}.downsample.1.bias": (dim,)})
    pw = (1, 1) if conv_mlp else ()
    for j in range(depth):
      b = f"stages.{i}.blocks.{j}."
      shapes.update({b + "gamma": (dim,), b + "conv_dw.weight": (dim, 1, 7, 7),
                     b + "conv_dw.bias": (dim,), b + "norm.weight": (dim,), b + "norm.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim, *pw), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim, *pw), b + "mlp.fc2.bias": (dim,)})
  shapes.update({"head.norm.weight": (dims[-1],), "head.norm.bias": (dims[-1],)})
  if head:
    shapes.update({"head.fc.weight": (classes, dims[-1]), "head.fc.bias": (classes,)})
  rng = np.random.default_rng(seed)
  return {k: _redraw(k, rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _redraw(name, r):
  """The re-draw rule for one parameter (numpy or torch `r` ~ N(0, 1) of its shape)."""
  if r.ndim > 1:
    return r / math.sqrt(r[0].numel() if hasattr(r[0], "numel") else r[0].size)  # conv / linear
  if name.endswith("gamma"):
    return 0.5 + 0.2 * r                                      # layer scale, far from its 1e-6
  if name.endswith("weight"):
    return 1.0 + 0.2 * r                                      # LayerNorm scales (1-D weights)
  return 0.2 * r                                              # biases


def _conv(x, w, b, *, stride=1, pad=0, groups=1):
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                   feature_group_count=groups)
  return y + b[None, :, None, None]


def _ln(x, w, b, axis=-1, eps=1e-6):
  mu = x.mean(axis, keepdims=True)
  var = ((x - mu) ** 2).mean(axis, keepdims=True)
  shape = [1] * x.ndim
  shape[axis] = -1
  return (x - mu) / jnp.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


def timm_convnext_reference(sd, x):
  """timm's ConvNeXt forward written out on timm's own layout, NCHW: (logits or pre_logits,
  forward_features)."""
  g = lambda k: sd[k]  # noqa: E731
  x = _ln(_conv(x, g("stem.0.weight"), g("stem.0.bias"), stride=4), g("stem.1.weight"),
          g("stem.1.bias"), axis=1)
  i = 0
  while f"stages.{i}.blocks.0.gamma" in sd:
    d = f"stages.{i}.downsample."
    if d + "0.weight" in sd:
      x = _ln(x, g(d + "0.weight"), g(d + "0.bias"), axis=1)
      x = _conv(x, g(d + "1.weight"), g(d + "1.bias"), stride=2)
    j = 0
    while f"stages.{i}.blocks.{j}.gamma" in sd:
      b = f"stages.{i}.blocks.{j}."
      c = x.shape[1]
      y = _conv(x, g(b + "conv_dw.weight"), g(b + "conv_dw.bias"), pad=3, groups=c)
      y = _ln(y, g(b + "norm.weight"), g(b + "norm.bias"), axis=1)
      w1 = g(b + "mlp.fc1.weight").reshape(4 * c, c)
      w2 = g(b + "mlp.fc2.weight").reshape(c, 4 * c)
      h = jnp.einsum("bchw,oc->bohw", y, w1) + g(b + "mlp.fc1.bias")[None, :, None, None]
      h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / math.sqrt(2.0)))
      y = jnp.einsum("bchw,oc->bohw", h, w2) + g(b + "mlp.fc2.bias")[None, :, None, None]
      x = x + g(b + "gamma")[None, :, None, None] * y
      j += 1
    i += 1
  pooled = _ln(x.mean((2, 3)), g("head.norm.weight"), g("head.norm.bias"))
  if "head.fc.weight" not in sd:
    return pooled, x
  return pooled @ g("head.fc.weight").T + g("head.fc.bias"), x


def _images(seed, b=2, size=SIZE):
  return np.random.default_rng(seed).standard_normal((b, size, size, 3)).astype(np.float32)


def test_timm_layout_matches_reference_forward_features_and_gradient():
  sd = fake_timm_convnext(conv_mlp=True)
  model, variables, meta = convert.from_timm(sd, "convnext_atto", dims=DIMS)
  assert meta["model_overrides"] == {"depths": DEPTHS, "num_classes": CLASSES, "dims": DIMS}
  assert _num_params(variables) == sum(v.size for v in sd.values())
  # timm's Linear MLP form (convnext_tiny and up) holds the same weights without the 1x1 axes.
  linear = {k: v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) else v
            for k, v in sd.items()}
  jax.tree.map(np.testing.assert_array_equal, variables,
               convert.from_timm(linear, "convnext_atto", dims=DIMS).variables)

  x = _images(1)
  w = np.random.default_rng(2).standard_normal((2, CLASSES)).astype(np.float32)
  sd_j = {k: jnp.asarray(v) for k, v in sd.items()}

  def ref(x):
    logits, feats = timm_convnext_reference(sd_j, x.transpose(0, 3, 1, 2))
    return jnp.sum(logits * w), (logits, feats.transpose(0, 2, 3, 1))
  (_, (logits_r, feats_r)), grad_r = jax.jit(jax.value_and_grad(ref, has_aux=True))(x)

  for impl in convnext.DWCONV_IMPLS[1:]:
    m = model.clone(dwconv_impl=impl)

    def ours(x, m=m):
      logits, out = m.apply(variables, x, features=True)
      return jnp.sum(logits * w), (logits, out)
    (_, (logits, out)), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(x)
    np.testing.assert_allclose(logits, logits_r, atol=1e-4, rtol=1e-4, err_msg=impl)
    np.testing.assert_allclose(out["stage4"], feats_r, atol=1e-4, rtol=1e-4, err_msg=impl)
    np.testing.assert_allclose(grad, grad_r, atol=1e-4 * np.abs(grad_r).max(), err_msg=impl)
    assert {k: v.shape for k, v in out.items()} == {
        "stem": (2, 8, 8, 8), "stage1": (2, 8, 8, 8), "stage2": (2, 4, 4, 16),
        "stage3": (2, 2, 2, 24), "stage4": (2, 1, 1, 32), "pre_logits": (2, 32)}


def test_headless_state_dict_gives_a_headless_model():
  sd = fake_timm_convnext(head=False)
  # Both depthwise-convolution forms are checked above; the cheaper compile suffices here.
  model, variables, meta = convert.from_timm(sd, "convnext_atto", dims=DIMS, dwconv_impl="xla")
  assert model.num_classes == 0 and meta["model_overrides"]["num_classes"] == 0
  x = _images(3)
  pre_logits, _ = timm_convnext_reference(sd, x.transpose(0, 3, 1, 2))
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), pre_logits, atol=1e-4, rtol=1e-4)


def test_vit_state_dict_for_convnext_is_one_clear_error():
  rng = np.random.default_rng(0)
  vit = {k: rng.standard_normal(s).astype(np.float32) for k, s in {
      "cls_token": (1, 1, 16), "pos_embed": (1, 5, 16), "patch_embed.proj.weight": (16, 3, 4, 4),
      "blocks.0.attn.qkv.weight": (48, 16), "blocks.0.mlp.fc1.weight": (32, 16),
      "norm.weight": (16,), "head.weight": (10, 16), "head.bias": (10,)}.items()}
  with pytest.raises(ValueError) as e:
    convert.from_timm(vit, "convnext_tiny")
  msg = str(e.value)
  assert "timm convnext 'convnext_tiny'" in msg and "nothing was loaded" in msg
  assert "8 source key(s) match no conversion rule" in msg
  for key in vit:
    assert key in msg
  assert "vitjax parameter(s) are missing" in msg
  assert "head_norm/scale (768,)" in msg and "stages_0/blocks_0/conv_dw/kernel (7, 7, 1, 96)" in msg


def test_timm_state_dict_of_another_size_reports_shapes():
  with pytest.raises(ValueError, match=r"stem\.0\.weight .* expects \(4, 4, 3, 96\)"):
    convert.from_timm(fake_timm_convnext(), "convnext_tiny")   # dims (8, ...) vs tiny's 96


# ---------------------------------------------------------------------------- the model contract


def test_feature_info_and_headless_apply():
  model = vitjax.create_model("convnext_atto", depths=DEPTHS, dims=DIMS, num_classes=0)
  assert model.feature_info() == [
      backbone.FeatureInfo("stem", 8, 4), backbone.FeatureInfo("stage1", 8, 4),
      backbone.FeatureInfo("stage2", 16, 8), backbone.FeatureInfo("stage3", 24, 16),
      backbone.FeatureInfo("stage4", 32, 32)]
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables["params"]) == {"stem_conv", "stem_norm", "stages_0", "stages_1",
                                      "stages_2", "stages_3", "head_norm"}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
  assert out[0].shape == (2, 32) and out[1]["stage4"].shape == (2, 2, 2, 32)
  no_gamma = vitjax.create_model("convnext_atto", depths=DEPTHS, dims=DIMS, layer_scale_init=0)
  shapes = jax.eval_shape(no_gamma.init, jax.random.key(0), x)["params"]["stages_0"]["blocks_0"]
  assert set(shapes) == {"conv_dw", "norm", "mlp"}


def test_drop_path_uses_the_dropout_rng():
  model = vitjax.create_model("convnext_atto", depths=DEPTHS, dims=DIMS, num_classes=CLASSES,
                              drop_path=0.5, layer_scale_init=1.0, dwconv_impl="xla")
  x = _images(4, b=4)
  variables = model.init(jax.random.key(0), x)
  f = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
  a, b = f(variables, x, jax.random.key(1)), f(variables, x, jax.random.key(2))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)


@pytest.mark.parametrize("overrides,match", [
    (dict(depths=(1, 1), dims=(8, 16, 24)), r"depths=\(1, 1\) and dims=\(8, 16, 24\)"),
    (dict(depths=(1, 0, 1, 1)), r"depths=\(1, 0, 1, 1\): allowed values are positive"),
    (dict(kernel_size=4), r"kernel_size=4: allowed values are odd"),
    (dict(dwconv_impl="fft"), r"dwconv_impl='fft'.* Allowed values: auto, shift, xla"),
])
def test_bad_fields_are_named(overrides, match):
  model = vitjax.create_model("convnext_atto", **overrides)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                                       jnp.float32))
  with pytest.raises(ValueError, match="Unknown ConvNeXt field"):
    vitjax.create_model("convnext_atto", width=3)


def test_block_rejects_prefix_tokens():
  tokens = backbone.Tokens(jnp.zeros((1, 5, 8)), grid=(2, 2), num_prefix=1)
  with pytest.raises(ValueError, match="prefix token"):
    convnext.ConvNeXtBlock(mlp_dim=32).init(jax.random.key(0), tokens)


# ---------------------------------------------------------------------------- timm + torch parity


def test_timm_counts_equal_pinned():
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  for name, count in PINNED_COUNTS.items():
    with torch.device("meta"):   # shapes only
      assert sum(p.numel() for p in timm.create_model(name).parameters()) == count, name


@pytest.mark.parametrize("name,grad", [("convnext_atto", True), ("convnext_tiny", False)])
def test_timm_parity(name, grad):
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  tm = timm.create_model(name, pretrained=False, num_classes=7).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for pname, p in tm.named_parameters():
      p.copy_(_redraw(pname, torch.randn(p.shape, generator=gen)))
  assert all(float(p.detach().abs().mean()) > 0.1 for n, p in tm.named_parameters()
             if n.endswith("gamma"))
  model, variables, meta = convert.from_timm(tm.state_dict(), name)
  assert meta["model_overrides"]["num_classes"] == 7
  assert _num_params(variables) == sum(p.numel() for p in tm.parameters())

  x = _images(0, size=64)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(grad)
  feats_t = tm.forward_features(xt)
  logits_t = tm.forward_head(feats_t)
  w = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)
  if not grad:
    logits = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), atol=1e-4, rtol=1e-4)
    return
  (logits_t * torch.from_numpy(w)).sum().backward()
  grad_t = xt.grad.numpy().transpose(0, 2, 3, 1)

  def f(x):
    logits, out = model.apply(variables, x, features=True)
    return jnp.sum(logits * w), (logits, out["stage4"])
  (_, (logits, stage4)), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
  np.testing.assert_allclose(logits, logits_t.detach().numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(stage4, feats_t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4,
                             rtol=1e-4)
  scale = np.abs(grad_t).max()
  np.testing.assert_allclose(grad / scale, grad_t / scale, atol=1e-4)
