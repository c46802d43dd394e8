"""Tests for CvT (vitjax/models/cvt.py), its mixer 'conv_proj_attn' (vitjax/ops/conv_attention.py)
and `vitjax.convert.from_transformers`.

  * without torch: the depthwise convolution against a direct loop over kernel offsets, and the
    whole mixer (conv -> BatchNorm -> linear, class token around the conv, multi-head softmax
    attention, output projection) against a plainly written dense reference, forward and
    gradients; BatchNorm's train-mode statistics; parameter counts; features; bad fields;
  * with torch + transformers (skipped otherwise): randomly initialised `CvtForImageClassification`
    models with every weight and BatchNorm statistic perturbed agree with their converted twins
    (logits within 1e-4, eval mode), at a tiny config and at the full CvT-13 config, and count
    the same parameters.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import cvt as cvt_lib
from vitjax.ops import conv_attention as ops

from tests import torch_compat

# `params` only, 1000 classes. They equal the official models' `sum(p.numel() for p in
# model.parameters())` (CvT-13: 19,997,480 in reference/official_code.md) and transformers'
# CvtForImageClassification of the same config: both count Parameters, not the BatchNorm running
# mean / var buffers, which vitjax keeps in `batch_stats` (BATCH_STATS_COUNTS).
PINNED_COUNTS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392}
BATCH_STATS_COUNTS = {"cvt_13": 25_728, "cvt_21": 41_856, "cvt_w24": 134_400}

TINY = dict(depths=(1, 1, 1), dims=(8, 16, 24), num_heads=(1, 2, 3), num_classes=5)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------- dense references


def depthwise_conv_reference(x, kernel, stride, padding):
  """Direct convolution from explicit patches: patch[b, i, j] = xpad[b, s*i : s*i + k,
  s*j : s*j + k, :] for every output position, then out[b, i, j, c] = sum_pq patch[..., p, q, c]
  w[p, q, c] (an einsum)."""
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (x.shape[1] + 2 * padding - k) // stride + 1
  wo = (x.shape[2] + 2 * padding - k) // stride + 1
  patches = jnp.stack([jnp.stack([xp[:, stride * i:stride * i + k, stride * j:stride * j + k]
                                  for j in range(wo)], 1) for i in range(ho)], 1)
  return jnp.einsum("bijpqc,pqc->bijc", patches, kernel[:, :, 0])   # (B, ho, wo, C)


def mixer_reference(p, s, x, *, grid, num_prefix, num_heads, stride_kv=2, eps=1e-5):
  """CvT's attention written out on the Flax parameter tree p and batch stats s (eval mode)."""
  b, n, d = x.shape
  prefix, xm = x[:, :num_prefix], x[:, num_prefix:].reshape(b, *grid, d)

  def branch(name, stride):
    y = depthwise_conv_reference(xm, p[f"conv_proj_{name}"]["conv"]["kernel"], stride, 1)
    bn, st = p[f"conv_proj_{name}"]["bn"], s[f"conv_proj_{name}"]["bn"]
    y = (y - st["mean"]) / jnp.sqrt(st["var"] + eps) * bn["scale"] + bn["bias"]
    y = jnp.concatenate([prefix, y.reshape(b, -1, d)], axis=1)
    dense = p[f"proj_{name}"]
    return (y @ dense["kernel"] + dense["bias"]).reshape(b, -1, num_heads, d // num_heads)

  q, k, v = branch("q", 1), branch("k", stride_kv), branch("v", stride_kv)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * d ** -0.5      # official scale: width ** -0.5
  logits = logits - logits.max(-1, keepdims=True)
  w = jnp.exp(logits) / jnp.exp(logits).sum(-1, keepdims=True)
  y = jnp.einsum("bhts,bshd->bthd", w, v).reshape(b, n, d)
  return y @ p["proj"]["kernel"] + p["proj"]["bias"]


# --------------------------------------------------------------------------- ops and mixer


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 5), (2, 1, 5), (2, 1, 6), (2, 0, 7)])
def test_depthwise_conv2d_matches_direct_convolution(stride, padding, size):
  rng = np.random.default_rng(0)
  x, w = _rand(rng, (2, size, size, 3)), _rand(rng, (3, 3, 1, 3))
  out = ops.depthwise_conv2d(x, w, stride=stride, padding=padding)
  assert out.shape[1] == ops.conv_output_size(size, 3, stride, padding)
  np.testing.assert_allclose(out, depthwise_conv_reference(x, w, stride, padding), atol=1e-5)
  grouped = jax.lax.conv_general_dilated(   # XLA's grouped convolution, a second oracle
      x, w, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  np.testing.assert_allclose(out, grouped, atol=1e-5)
  cot = _rand(rng, out.shape)
  g = jax.grad(lambda x, w: jnp.sum(ops.depthwise_conv2d(x, w, stride=stride, padding=padding)
                                    * cot), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(depthwise_conv_reference(x, w, stride, padding) * cot),
                   (0, 1))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_depthwise_conv2d_rejects_a_wrong_kernel():
  with pytest.raises(ValueError, match=r"\(k, k, 1, 4\)"):
    ops.depthwise_conv2d(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 4, 4)))


def _perturbed_mixer(num_prefix, grid=(4, 5), d=8, heads=2, seed=0):
  mixer = cvt_lib.ConvProjectionAttention(num_heads=heads)
  rng = np.random.default_rng(seed)
  x = _rand(rng, (2, num_prefix + grid[0] * grid[1], d))
  variables = mixer.init(jax.random.key(0), x, grid=grid, num_prefix=num_prefix)
  # Every parameter and statistic re-drawn, so no part of the reference is trivially 0 or 1.
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  for key, value in flat.items():
    if key.endswith("var"):
      flat[key] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape), jnp.float32)
    elif key.endswith("scale"):
      flat[key] = 1.0 + _rand(rng, value.shape, 0.2)
    else:
      flat[key] = _rand(rng, value.shape, 0.3)
  return mixer, flax.traverse_util.unflatten_dict(flat, sep="/"), x


@pytest.mark.parametrize("num_prefix", [1, 0])
def test_conv_proj_attn_matches_dense_reference_forward_and_gradients(num_prefix):
  grid, heads = (4, 5), 2
  mixer, variables, x = _perturbed_mixer(num_prefix, grid, heads=heads)
  stats = variables["batch_stats"]

  def ours(p, x):
    return mixer.apply({"params": p, "batch_stats": stats}, x, grid=grid, num_prefix=num_prefix)

  def ref(p, x):
    return mixer_reference(p, stats, x, grid=grid, num_prefix=num_prefix, num_heads=heads)

  np.testing.assert_allclose(ours(variables["params"], x), ref(variables["params"], x),
                             atol=1e-5, rtol=1e-5)
  w = _rand(np.random.default_rng(3), x.shape)
  g = jax.grad(lambda p, x: jnp.sum(ours(p, x) * w), (0, 1))(variables["params"], x)
  g_ref = jax.grad(lambda p, x: jnp.sum(ref(p, x) * w), (0, 1))(variables["params"], x)
  np.testing.assert_allclose(g[1], g_ref[1], atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g[0], g_ref[0])


def test_conv_proj_attn_train_mode_uses_and_updates_batch_statistics():
  mixer, variables, x = _perturbed_mixer(1)
  _, updates = mixer.apply(variables, x, grid=(4, 5), num_prefix=1, train=True,
                           mutable=["batch_stats"])
  xm = x[:, 1:].reshape(2, 4, 5, 8)
  y = ops.depthwise_conv2d(xm, variables["params"]["conv_proj_k"]["conv"]["kernel"], stride=2,
                           padding=1)
  old = variables["batch_stats"]["conv_proj_k"]["bn"]
  new = updates["batch_stats"]["conv_proj_k"]["bn"]
  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 old + 0.1 batch statistic.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * y.mean((0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * y.var((0, 1, 2)), atol=1e-5)


def test_conv_proj_attn_rejects_a_padding_that_empties_the_map():
  mixer = cvt_lib.ConvProjectionAttention(num_heads=1, padding_kv=0, kernel_size=3)
  with pytest.raises(ValueError, match="padding_kv=0"):
    mixer.init(jax.random.key(0), jnp.zeros((1, 4, 4)), grid=(2, 2))


@pytest.mark.parametrize("pool", ["gap", "tok"])
def test_isotropic_vit_runs_the_conv_projection_mixer(pool):
  model = vitjax.create_model("vit_nano4", mixer="conv_proj_attn", pool=pool, depth=1, width=16,
                              num_heads=2, mlp_dim=32, num_classes=3)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert "conv_proj_q" in variables["params"]["Transformer"]["encoderblock_0"]["attn"]
  assert "batch_stats" in variables
  logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(1)})
  assert logits.shape == (2, 3)


def test_quick_gelu():
  x = jnp.linspace(-4.0, 4.0, 9)
  np.testing.assert_allclose(ops.quick_gelu(x), x / (1.0 + np.exp(-1.702 * np.asarray(x))),
                             rtol=1e-6)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts_equal_the_official_models(name):
  model = vitjax.create_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert _count(shapes["params"]) == PINNED_COUNTS[name]
  assert _count(shapes["batch_stats"]) == BATCH_STATS_COUNTS[name]


def test_features_feature_info_and_headless_model():
  model = vitjax.create_model("cvt_13", **TINY)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["stages_2"]["cls_token"].shape == (1, 1, 24)
  logits, out = model.apply(variables, x, features=True)
  assert logits.shape == (2, 5) and out["pre_logits"].shape == (2, 24)
  info = vitjax.feature_info("cvt_13", **TINY)
  assert [(f.name, f.channels, f.stride) for f in info] == [
      ("stem", 8, 4), ("stage1", 8, 4), ("stage2", 16, 8), ("stage3", 24, 16)]
  for f in info:
    assert out[f.name].shape == (2, 32 // f.stride, 32 // f.stride, f.channels), f.name
  headless = vitjax.create_model("cvt_13", **{**TINY, "num_classes": 0})
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  pre = headless.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
  np.testing.assert_allclose(pre, out["pre_logits"], atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (dict(act="relu"), r"act='relu'.*quick_gelu, gelu"),
    (dict(num_heads=(1, 2)), r"num_heads=\(1, 2\) needs one entry per stage \(3"),
    (dict(widht=3), r"widht"),
])
def test_bad_fields_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    model = vitjax.create_model("cvt_13", **{**TINY, **overrides})
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------- transformers


def _transformers():
  torch = pytest.importorskip("torch", reason="the transformers parity tests need torch")
  torch_compat.import_timm()   # torchvision's import on a CPU-only torch; skips with the reason
  transformers = pytest.importorskip(
      "transformers", reason="the transformers parity tests need transformers")
  return torch, transformers


def _perturb(torch, model, seed):
  """Re-draws every float tensor of the state dict: weights, biases, norms, BN statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, t in model.state_dict().items():
      if not t.is_floating_point():
        continue                                  # num_batches_tracked
      if key.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif key.endswith(("layernorm_before.weight", "layernorm_after.weight", "layernorm.weight",
                         "normalization.weight")):
        t.add_(0.2 * torch.randn(t.shape, generator=g))
      else:
        t.add_(0.05 * torch.randn(t.shape, generator=g))
  return model.eval()


def _compare(torch, hf_model, model, variables, size, seed=0):
  x = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))
  diff = float(np.abs(ours - ref).max())
  print(f"transformers parity at {size}x{size}: max|logits diff| {diff:.2e}")   # pytest -s
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_transformers_tiny_cvt_parity_gelu_and_quick_gelu():
  torch, transformers = _transformers()
  torch.manual_seed(0)
  # transformers indexes its per-stage drop-path list by the stage number, so stage i needs at
  # least i + 1 blocks: depths (1, 2, 3) is the smallest config it builds.
  config = transformers.CvtConfig(num_labels=5, depth=[1, 2, 3], embed_dim=[16, 32, 48],
                                  num_heads=[1, 2, 3])
  hf = _perturb(torch, transformers.CvtForImageClassification(config), seed=1)
  state = hf.state_dict()
  model, variables, meta = convert.from_transformers(state, "cvt_13", num_heads=(1, 2, 3))
  assert meta["model_overrides"] == dict(num_classes=5, act="gelu", depths=(1, 2, 3),
                                         dims=(16, 32, 48), num_heads=(1, 2, 3))
  assert set(variables) == {"params", "batch_stats"}
  n_stats = sum(v.numel() for k, v in state.items() if k.endswith(("running_mean", "running_var")))
  assert _count(variables["batch_stats"]) == n_stats
  assert _count(variables["params"]) == sum(p.numel() for p in hf.parameters())
  _compare(torch, hf, model, variables, 64)
  # With QuickGELU swapped into transformers' MLP it is the official model
  # (reference/official_code.md); act='quick_gelu' is vitjax's default.
  class QuickGELU(torch.nn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  for module in hf.modules():
    if isinstance(module, transformers.models.cvt.modeling_cvt.CvtIntermediate):
      module.activation = QuickGELU()
  model, variables, _ = convert.from_transformers(state, "cvt_13", num_heads=(1, 2, 3),
                                                  act="quick_gelu")
  _compare(torch, hf, model, variables, 64, seed=1)


def test_transformers_full_cvt13_parity_and_param_count():
  torch, transformers = _transformers()
  torch.manual_seed(0)
  hf = _perturb(torch, transformers.CvtForImageClassification(
      transformers.CvtConfig(num_labels=1000)), seed=2)
  assert sum(p.numel() for p in hf.parameters()) == PINNED_COUNTS["cvt_13"]
  model, variables, meta = convert.from_transformers(hf.state_dict(), "microsoft/cvt-13")
  assert meta["model_name"] == "cvt_13" and meta["source_model"] == "microsoft/cvt-13"
  assert meta["model_overrides"] == dict(num_classes=1000, act="gelu")
  assert _count(variables["params"]) == PINNED_COUNTS["cvt_13"]
  _compare(torch, hf, model, variables, 64)


# --------------------------------------------------------------------------- strictness (no torch)


def _fake_hf_state(seed=0, tiny=TINY):
  """A CvtForImageClassification state dict of random numpy arrays (tiny config, 5 classes)."""
  model = vitjax.create_model("cvt_13", **{**tiny, "act": "gelu"})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  state = {}
  dims, stage = tiny["dims"], "cvt.encoder.stages.{}."
  for i, d in enumerate(dims):
    s = stage.format(i)
    e = s + "embedding.convolution_embeddings."
    k = 7 if i == 0 else 3
    state[e + "projection.weight"] = rng.standard_normal((d, 3 if i == 0 else dims[i - 1], k, k))
    for name in ("projection.bias", "normalization.weight", "normalization.bias"):
      state[e + name] = rng.standard_normal(d)
    l = s + "layers.0."
    for which in ("query", "key", "value"):
      c = l + f"attention.attention.convolution_projection_{which}.convolution_projection."
      state[c + "convolution.weight"] = rng.standard_normal((d, 1, 3, 3))
      for name in ("weight", "bias", "running_mean"):
        state[c + "normalization." + name] = rng.standard_normal(d)
      state[c + "normalization.running_var"] = rng.uniform(0.5, 1.5, d)
      state[c + "normalization.num_batches_tracked"] = np.array(3)
      state[l + f"attention.attention.projection_{which}.weight"] = rng.standard_normal((d, d))
      state[l + f"attention.attention.projection_{which}.bias"] = rng.standard_normal(d)
    for name, shape in (("attention.output.dense", (d, d)), ("intermediate.dense", (4 * d, d)),
                        ("output.dense", (d, 4 * d))):
      state[l + name + ".weight"] = rng.standard_normal(shape)
      state[l + name + ".bias"] = rng.standard_normal(shape[0])
    for name in ("layernorm_before", "layernorm_after"):
      state[l + name + ".weight"] = rng.standard_normal(d)
      state[l + name + ".bias"] = rng.standard_normal(d)
  state[stage.format(2) + "cls_token"] = rng.standard_normal((1, 1, dims[-1]))
  state.update({"layernorm.weight": rng.standard_normal(24),
                "layernorm.bias": rng.standard_normal(24),
                "classifier.weight": rng.standard_normal((5, 24)),
                "classifier.bias": rng.standard_normal(5)})
  assert len(state) - 9 == len(jax.tree.leaves(shapes))  # and 9 num_batches_tracked
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def test_from_transformers_loads_every_variable_without_torch():
  state = _fake_hf_state()
  model, variables, _ = convert.from_transformers(state, "cvt_13", num_heads=(1, 2, 3))
  np.testing.assert_array_equal(
      variables["batch_stats"]["stages_1"]["blocks_0"]["attn"]["conv_proj_v"]["bn"]["var"],
      state["cvt.encoder.stages.1.layers.0.attention.attention.convolution_projection_value."
            "convolution_projection.normalization.running_var"])
  attn = variables["params"]["stages_0"]["blocks_0"]["attn"]
  np.testing.assert_array_equal(
      attn["conv_proj_q"]["conv"]["kernel"][..., 0, 2],   # torch (C, 1, k, k) -> (k, k, 1, C)
      state["cvt.encoder.stages.0.layers.0.attention.attention.convolution_projection_query."
            "convolution_projection.convolution.weight"][2, 0])
  assert model.act == "gelu"


def test_from_transformers_lists_every_problem_in_one_error():
  state = _fake_hf_state()
  bn = ("cvt.encoder.stages.0.layers.0.attention.attention.convolution_projection_key."
        "convolution_projection.normalization.")
  del state[bn + "running_mean"]                                          # missing statistic
  state["cvt.encoder.stages.1.layers.0.attention.attention.extra.weight"] = np.ones(3)  # unknown
  state["classifier.weight"] = np.ones((5, 12), np.float32)                # wrong shape
  with pytest.raises(ValueError) as e:
    convert.from_transformers(state, "cvt_13", num_heads=(1, 2, 3))
  msg = str(e.value)
  assert "nothing was loaded" in msg
  assert "batch_stats/stages_0/blocks_0/attn/conv_proj_k/bn/mean" in msg
  assert "attention.attention.extra.weight" in msg
  assert "classifier.weight" in msg and "(12, 5)" in msg


def test_from_transformers_refuses_another_family():
  timm_vit = {"cls_token": np.zeros((1, 1, 16)), "pos_embed": np.zeros((1, 5, 16)),
              "patch_embed.proj.weight": np.zeros((16, 3, 4, 4)),
              "blocks.0.attn.qkv.weight": np.zeros((48, 16)), "head.weight": np.zeros((5, 16))}
  with pytest.raises(ValueError, match=r"Not a transformers cvt \(CvtForImageClassification\) "
                     r"state dict(.|\n)*blocks\.0\.attn\.qkv\.weight"):
    convert.from_transformers(timm_vit, "cvt_13")
  with pytest.raises(ValueError, match=r"name='vit_b16'.*cvt_13"):
    convert.from_transformers(timm_vit, "vit_b16")



def test_cli_converts_a_transformers_checkpoint_with_its_batch_statistics(tmp_path, capsys):
  """python -m vitjax.convert --from=transformers writes params AND BatchNorm statistics."""
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitjax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  # Widths the default CvT-13 heads (1, 3, 6) divide: the CLI takes the sizes the weights show.
  state = _fake_hf_state(tiny=dict(TINY, dims=(6, 12, 24), num_heads=(1, 3, 6)))
  path = str(tmp_path / "cvt.npz")
  np.savez(path, **{k: np.asarray(v) for k, v in state.items()})
  out = str(tmp_path / "out")
  rc = convert_cli.main(["--from=transformers", "--model=cvt_13", f"--checkpoint={path}",
                         f"--out={out}"])
  assert rc == 0, capsys.readouterr().err
  variables, meta = checkpoint.load_variables(out)
  assert meta["model_name"] == "cvt_13" and meta["source"] == "transformers"
  _, expected, _ = convert.from_transformers(state, "cvt_13")
  assert set(variables) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), expected)
