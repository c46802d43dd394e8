"""Tests for vitjax.convert: timm and big_vision weights -> vitjax, and the command line.

Three kinds of check:
  * without torch: a timm-layout ViT state dict of random numpy arrays, converted, must give the
    logits and input gradients of a plainly written jnp forward pass that reads timm's layout
    directly (fused qkv rows, (out, in) Linear weights, NCHW conv); big_vision / vit_jax `.npz`
    layouts round-trip; bad state dicts raise ONE error that lists every problem;
  * with torch + timm (skipped otherwise): randomly initialised timm models and their converted
    twins agree on logits (1e-4, float32, batch 2) and input gradients, and the parameter
    counts of every supported model equal timm's;
  * the fast paths in vitjax's attention and GELU equal the plain math within 1e-5.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import vitjax
from vitjax import checkpoint
from vitjax import convert
from vitjax.convert import __main__ as convert_cli
from vitjax.convert import big_vision as bv
from vitjax.convert import timm as timm_convert
from vitjax.models import layers
from vitjax.ops import attention as ops_attention

from tests import torch_compat

# A tiny timm-layout ViT: width 16, 2 heads, 2 blocks, patch 4, 8x8 images (2x2 grid), 5 classes.
TINY = dict(width=16, heads=2, depth=2, mlp=24, patch=4, grid=2, classes=5, chans=3)


def fake_timm_vit(seed=0, *, width, heads, depth, mlp, patch, grid, classes, chans):
  """A timm ViT state dict (timm's key names and layouts) of random float32 numpy arrays."""
  del heads
  rng = np.random.default_rng(seed)
  shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
            "patch_embed.proj.weight": (width, chans, patch, patch),
            "patch_embed.proj.bias": (width,)}
  for i in range(depth):
    shapes.update({
        f"blocks.{i}.norm1.weight": (width,), f"blocks.{i}.norm1.bias": (width,),
        f"blocks.{i}.attn.qkv.weight": (3 * width, width),
        f"blocks.{i}.attn.qkv.bias": (3 * width,),
        f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
        f"blocks.{i}.norm2.weight": (width,), f"blocks.{i}.norm2.bias": (width,),
        f"blocks.{i}.mlp.fc1.weight": (mlp, width), f"blocks.{i}.mlp.fc1.bias": (mlp,),
        f"blocks.{i}.mlp.fc2.weight": (width, mlp), f"blocks.{i}.mlp.fc2.bias": (width,)})
  shapes.update({"norm.weight": (width,), "norm.bias": (width,),
                 "head.weight": (classes, width), "head.bias": (classes,)})
  state = {}
  for k, s in shapes.items():
    scale = 1.0 / math.sqrt(s[-1]) if len(s) > 1 else 0.3
    base = 1.0 if k.endswith("norm1.weight") or k.endswith("norm2.weight") else 0.0
    state[k] = (base + scale * rng.standard_normal(s)).astype(np.float32)
  return state


def _ln(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * w + b


def timm_vit_reference(sd, images_nchw, *, heads):
  """timm's ViT forward written out on timm's own parameter layout (the oracle)."""
  w = sd["patch_embed.proj.weight"]                        # (D, C, P, P)
  d, _, p, _ = w.shape
  b, c, hh, ww = images_nchw.shape
  patches = images_nchw.reshape(b, c, hh // p, p, ww // p, p)
  x = jnp.einsum("bcipjq,dcpq->bijd", patches, w).reshape(b, -1, d) + sd["patch_embed.proj.bias"]
  x = jnp.concatenate([jnp.broadcast_to(sd["cls_token"], (b, 1, d)), x], 1) + sd["pos_embed"]
  n, dh = x.shape[1], d // heads
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
    y = _ln(x, g("norm1.weight"), g("norm1.bias"))
    qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, n, 3, heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]       # (B, N, H, dh)
    a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, n, d)
    x = x + o @ g("attn.proj.weight").T + g("attn.proj.bias")
    y = _ln(x, g("norm2.weight"), g("norm2.bias"))
    h = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / math.sqrt(2.0)))
    x = x + h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    i += 1
  x = _ln(x, sd["norm.weight"], sd["norm.bias"])
  return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def _images(seed, b, size, chans=3):
  return np.random.default_rng(seed).standard_normal((b, size, size, chans)).astype(np.float32)


def _num_params(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# Overrides that shape vit_ti16 like TINY (from_timm reads classes and depth off the weights).
TINY_OVERRIDES = dict(width=16, num_heads=2, mlp_dim=24, patch_size=4)


def _linear_functional(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------- timm, no torch


def test_timm_layout_matches_reference_forward_and_gradients():
  sd = fake_timm_vit(**TINY)
  model, variables, meta = convert.from_timm(sd, "vit_tiny_patch16_224", **TINY_OVERRIDES)
  assert meta.pop("preprocess")["mean"] == [0.5, 0.5, 0.5]  # timm's eval transform (predict's)
  assert meta == {"source": "timm", "source_model": "vit_tiny_patch16_224",
                  "model_name": "vit_ti16", "image_size": [8, 8],
                  "model_overrides": {"num_classes": 5, "depth": 2, **TINY_OVERRIDES}}
  assert _num_params(variables) == sum(v.size for v in sd.values())
  x = _images(1, 2, 8)
  sd_j = {k: jnp.asarray(v) for k, v in sd.items()}
  w = _linear_functional(2, (2, 5))
  ref = lambda s, x: timm_vit_reference(s, x.transpose(0, 3, 1, 2), heads=2)  # noqa: E731
  ours = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  np.testing.assert_allclose(ours(variables["params"], x), ref(sd_j, x), atol=1e-4, rtol=1e-4)
  g_ours = jax.grad(lambda p, x: jnp.sum(ours(p, x) * w), argnums=(0, 1))(variables["params"], x)
  g_ref = jax.grad(lambda s, x: jnp.sum(ref(s, x) * w), argnums=(0, 1))(sd_j, x)
  np.testing.assert_allclose(g_ours[1], g_ref[1], atol=1e-4, rtol=1e-4)
  # The conversion is a pure relayout, so it must carry the reference's parameter gradient (in
  # timm's layout) onto ours (in vitjax's layout).
  g_ref_params = convert.from_timm({k: np.asarray(v) for k, v in g_ref[0].items()},
                                   "vit_ti16", **TINY_OVERRIDES).variables["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3),
               g_ours[0], g_ref_params)


def test_timm_bad_state_dict_lists_every_problem_in_one_error():
  sd = fake_timm_vit(**TINY)
  sd["blocks.0.attn.q_norm.weight"] = np.ones(8, np.float32)          # unknown key
  del sd["blocks.1.mlp.fc2.bias"]                                      # missing parameter
  sd["blocks.0.attn.proj.weight"] = np.ones((16, 12), np.float32)     # wrong shape
  sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"].T      # same size, axes swapped
  with pytest.raises(ValueError) as e:
    convert.from_timm(sd, "vit_tiny_patch16_224", **TINY_OVERRIDES)
  msg = str(e.value)
  assert "nothing was loaded" in msg
  assert "blocks.0.attn.q_norm.weight" in msg
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias" in msg
  assert "blocks.0.attn.proj.weight" in msg and "(12, 16)" in msg
  assert "blocks.1.mlp.fc1.weight (16, 24)" in msg
  # The default vit_ti16 (width 192) does not fit a width-16 state dict: shapes are reported.
  with pytest.raises(ValueError, match="the vitjax model expects"):
    convert.from_timm(fake_timm_vit(**TINY), "vit_ti16")


def test_timm_unknown_model_name_lists_allowed_values():
  with pytest.raises(ValueError, match="vit_base_patch16_224") as e:
    convert.from_timm({}, "resnet50")
  assert "model_name='resnet50'" in str(e.value)
  assert convert.timm.resolve("vit_base_patch16_224.augreg_in21k")[2] == "vit_b16"
  assert convert.timm.resolve("vit_b32")[1] == "vit_base_patch32_224"


# ---------------------------------------------------------------------------- big_vision / vit_jax


def _vitjax_tiny(pool="tok", seed=0):
  model = vitjax.create_model("vit_ti16", num_classes=5, depth=2, pool=pool, head_zero_init=False,
                              **TINY_OVERRIDES)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))["params"]
  params = jax.tree.map(  # non-trivial values everywhere, biases and norms included
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape), params)
  return model, jax.tree.map(np.asarray, params)


def _flat(params):
  import flax  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(params, sep="/")


def _write_npz(path, flat):
  np.savez(path, **flat)
  return str(path)


@pytest.mark.parametrize("layout", ["vit_jax", "big_vision", "big_vision_scan", "gap"])
def test_big_vision_npz_layouts(tmp_path, layout):
  model, params = _vitjax_tiny(pool="gap" if layout == "gap" else "tok")
  flat = _flat(params)
  if layout.startswith("big_vision"):
    # big_vision adds positions before concatenating CLS: its table has no CLS row. vitjax with a
    # zero CLS row is the same function.
    pe = flat.pop(bv.POSEMB)
    flat[bv.POSEMB] = pe = pe.copy()
    pe[:, 0] = 0.0
    flat = {**{k: v for k, v in flat.items() if k != bv.POSEMB}, "pos_embedding": pe[:, 1:]}
    flat = {"params/" + k: v for k, v in flat.items()}
    if layout == "big_vision_scan":
      blocks = [k for k in flat if "encoderblock_" in k]
      for k in [k for k in blocks if "encoderblock_0/" in k]:
        rest = k.split("encoderblock_0/")[1]
        flat["params/Transformer/encoderblock/" + rest] = np.stack(
            [flat[f"params/Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
      for k in blocks:
        del flat[k]
  expected = {**_flat(params)}
  if layout.startswith("big_vision"):
    expected[bv.POSEMB] = np.concatenate([np.zeros_like(pe[:, :1]), pe[:, 1:]], axis=1)
  path = _write_npz(tmp_path / "ckpt.npz", flat)
  got_model, got, meta = convert.from_big_vision_npz(path, "vit_ti16", **TINY_OVERRIDES)
  assert meta["model_overrides"]["pool"] == ("gap" if layout == "gap" else "tok")
  assert meta["model_overrides"]["depth"] == 2 and meta["image_size"] == [8, 8]
  got_flat = _flat(got["params"])
  assert sorted(got_flat) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(got_flat[k], v, err_msg=k)
  x = _images(3, 2, 8)
  ref_params = dict(params)
  if layout.startswith("big_vision"):
    ref_params = jax.tree.map(lambda a: a, params)
    ref_params["Transformer"]["posembed_input"]["pos_embedding"] = expected[bv.POSEMB]
  np.testing.assert_allclose(got_model.apply(got, x), model.apply({"params": ref_params}, x),
                             atol=1e-5, rtol=1e-5)


def test_big_vision_unknown_keys_raise_one_error(tmp_path):
  _, params = _vitjax_tiny()
  flat = _flat(params)
  flat["pre_logits/kernel"] = np.zeros((16, 16), np.float32)
  flat["MAPHead_0/probe"] = np.zeros((1, 1, 16), np.float32)
  del flat["Transformer/encoder_norm/scale"]
  with pytest.raises(ValueError) as e:
    convert.from_big_vision_npz(_write_npz(tmp_path / "c.npz", flat), "B/16", **TINY_OVERRIDES)
  msg = str(e.value)
  for key in ("pre_logits/kernel", "MAPHead_0/probe", "Transformer/encoder_norm/scale"):
    assert key in msg


# ---------------------------------------------------------------------------- command line


def test_cli_writes_a_checkpoint_that_loads(tmp_path, capsys, monkeypatch):
  sd = fake_timm_vit(**TINY)
  try:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
  except ImportError:
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "w.pth")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  # The command line takes no size overrides; give the tiny shape a registered name of its own.
  monkeypatch.setitem(vitjax.models.registry.MODELS, "vit_convert_tiny",
                      lambda **kw: vitjax.create_model("vit_ti16", **{**TINY_OVERRIDES, **kw}))
  out = str(tmp_path / "out")
  rc = convert_cli.main(["--from=timm", "--model=vit_convert_tiny", f"--checkpoint={path}",
                         f"--out={out}"])
  assert rc == 2 and "Unknown timm model_name" in capsys.readouterr().err
  family = convert.FAMILIES["vit"]
  monkeypatch.setitem(convert.FAMILIES, "tiny", convert.timm.Family(
      "tiny", {"vit_tiny_test": "vit_convert_tiny"}, family.rules, family.overrides,
      family.example_input))
  rc = convert_cli.main(["--from=timm", "--model=vit_tiny_test", f"--checkpoint={path}",
                         f"--out={out}"])
  assert rc == 0, capsys.readouterr().err
  assert "--config.init_from=" + out in capsys.readouterr().out
  params, meta = checkpoint.load_params(out)
  assert meta["model_name"] == "vit_convert_tiny" and meta["image_size"] == [8, 8]
  _, variables, _ = convert.from_timm(sd, "vit_ti16", **TINY_OVERRIDES)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params),
               variables["params"])
  # Wrong file type for the source: a clear error, exit code 2.
  rc = convert_cli.main(["--from=big_vision", "--model=vit_b16", f"--checkpoint={path}",
                         f"--out={out}"])
  assert rc == 2 and ".npz" in capsys.readouterr().err


# ---------------------------------------------------------------------------- timm + torch parity

# (timm name, img_size, depth, check the input gradient too): small inputs and shallow stacks keep
# the compiles short; every width is the real one, and vit_base runs at its native 224 px.
PARITY = [
    ("vit_tiny_patch16_224", 32, 3, True),
    ("vit_small_patch16_224", 32, 1, False),
    ("vit_base_patch16_224", 224, 1, True),
    ("vit_large_patch16_224", 32, 1, False),
    ("vit_base_patch32_224", 32, 1, False),
]


@pytest.mark.parametrize("name,img_size,depth,grad", PARITY, ids=[p[0] for p in PARITY])
def test_timm_parity_logits_and_input_gradient(name, img_size, depth, grad):
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tm = timm.create_model(name, img_size=img_size, num_classes=7, depth=depth).eval()
  with torch.no_grad():  # perturb every tensor so biases, norms and tokens are all non-trivial
    for p in tm.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model, variables, meta = convert.from_timm(tm.state_dict(), name)
  assert meta["image_size"] == [img_size, img_size] and meta["model_overrides"]["depth"] == depth
  assert _num_params(variables) == sum(p.numel() for p in tm.parameters())

  x = _images(0, 2, img_size)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(grad)
  logits_t = tm(xt)
  if not grad:
    logits = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), atol=1e-4, rtol=1e-4)
    return
  w = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)
  (logits_t * torch.from_numpy(w)).sum().backward()
  grad_t = xt.grad.numpy().transpose(0, 2, 3, 1)

  def f(x):
    logits = model.apply(variables, x)
    return jnp.sum(logits * w), logits
  (_, logits), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
  np.testing.assert_allclose(logits, logits_t.detach().numpy(), atol=1e-4, rtol=1e-4)
  scale = np.abs(grad_t).max()
  np.testing.assert_allclose(grad / scale, grad_t / scale, atol=1e-4)


def _pinned_vitjax_counts() -> dict[str, tuple[int, int]]:
  """vitjax name -> (image size, count) pinned by the family tests, which check vitjax's count."""
  from tests import test_convnext, test_crossvit, test_models, test_swin  # pylint: disable=g-import-not-at-top
  pinned = {n: (224, c) for n, c in {**test_convnext.PINNED_COUNTS, **test_swin.PINNED_COUNTS}.items()}
  pinned.update({n: v for n, v in test_models.VIT_COUNTS.items() if v[1] is not None})
  pinned.update(test_crossvit.PINNED_COUNTS)
  return pinned


def test_timm_parameter_counts_equal_vitjax():
  """timm's count of every supported name equals vitjax's: through the family tests' pinned count
  (which they compare with vitjax's) where one exists at timm's input size, else traced here."""
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  pinned, traced = _pinned_vitjax_counts(), []
  for name in convert.supported_models():
    with torch.device("meta"):  # shapes only: no memory, no init time
      count = sum(p.numel() for p in timm.create_model(name).parameters())
    vitjax_name = convert.timm.resolve(name)[2]
    size = timm.models.get_pretrained_cfg(name).input_size[-1]   # 224; CrossViT 240 / 408
    if pinned.get(vitjax_name, (None,))[0] == size:
      assert pinned[vitjax_name][1] == count, (name, size)
      continue
    traced.append(name)
    shapes = jax.eval_shape(vitjax.create_model(vitjax_name).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    assert _num_params(shapes) == count, (name, size)
  assert traced == ["crossvit_15_dagger_408", "crossvit_18_dagger_408"]  # the rest are pinned


# ---------------------------------------------------------------------------- fast-path numerics


def test_gelu_is_the_exact_erf_gelu():
  x = np.concatenate([np.linspace(-12, 12, 4001), [-40.0, -7.5, 0.0, 7.5, 40.0]])
  exact = 0.5 * x * scipy.special.erfc(-x / np.sqrt(2.0))                      # float64
  dexact = 0.5 * scipy.special.erfc(-x / np.sqrt(2.0)) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
  xf = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(layers.gelu(xf), exact, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(xf), dexact, atol=1e-5, rtol=1e-5)
  # The tanh approximation is farther off than 1e-5 here: the test can tell the two apart.
  assert np.abs(jax.nn.gelu(xf, approximate=True) - exact).max() > 1e-4


def _plain_attention(q, k, v, scale, bias=None, mask=None):
  logits = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k.astype(np.float64)) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v.astype(np.float64))


def test_dot_product_attention_matches_plain_math_forward_and_gradient():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
  bias = rng.standard_normal((1, 3, 5, 7)).astype(np.float32)
  mask = rng.random((2, 1, 5, 7)) > 0.3
  mask[..., 0] = True
  for kw in ({}, {"bias": bias}, {"mask": mask}):
    out = ops_attention.dot_product_attention(q, k, v, scale=0.3, **kw)
    np.testing.assert_allclose(out, _plain_attention(q, k, v, 0.3, **kw), atol=1e-5, rtol=1e-5)
  # A row whose keys are all masked attends uniformly, as the plain softmax over equal logits.
  full = mask.copy()
  full[1, 0, 2] = False
  plain = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(
      full, jnp.einsum("bthd,bshd->bhts", q, k) * 0.3, jnp.finfo(jnp.float32).min), -1), v)
  np.testing.assert_allclose(ops_attention.dot_product_attention(q, k, v, scale=0.3, mask=full),
                             plain, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(plain[1, 2], np.broadcast_to(v[1].mean(0), (3, 8)), atol=1e-5)
  w = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  grads = jax.grad(lambda q, k, v: jnp.sum(
      ops_attention.dot_product_attention(q, k, v, scale=0.3, bias=bias) * w), (0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(jnp.einsum(
      "bhts,bshd->bthd", jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) * 0.3 + bias, -1),
      v) * w), (0, 1, 2))(q, k, v)
  for a, b in zip(grads, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_mlp_block_matches_plain_dense_gelu_dense_forward_and_gradient():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mlp = layers.MlpBlock(24, out_dim=9)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 16)), jnp.float32)
  params = mlp.init(jax.random.key(0), x)["params"]
  # Same parameter names, shapes and initial values as two nn.Dense layers (vit_jax layout).
  class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      kw = dict(kernel_init=mlp.kernel_init, bias_init=mlp.bias_init)
      return nn.Dense(9, name="Dense_1", **kw)(nn.Dense(24, name="Dense_0", **kw)(x))
  jax.tree.map(np.testing.assert_array_equal, params,
               TwoDense().init(jax.random.key(0), x)["params"])
  assert jax.tree.map(np.shape, params) == {
      "Dense_0": {"kernel": (16, 24), "bias": (24,)}, "Dense_1": {"kernel": (24, 9), "bias": (9,)}}
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)

  def plain(p, x):
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / np.sqrt(2.0)))
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  ours = lambda p, x: mlp.apply({"params": p}, x)  # noqa: E731
  np.testing.assert_allclose(ours(params, x), plain(params, x), atol=1e-5, rtol=1e-5)
  w = _linear_functional(3, (2, 3, 4, 9))
  g = jax.grad(lambda p, x: jnp.sum(ours(p, x) * w), (0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(plain(p, x) * w), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_torch_checkpoint_files_unwrap_and_drop_the_ddp_prefix(tmp_path):
  """A released training checkpoint (.pth.tar, weights under 'model', DDP's 'module.' prefix)
  reads as the plain state dict."""
  torch = pytest.importorskip("torch", reason="reading .pth files needs torch (the torch extra)")
  from vitjax.convert import files  # pylint: disable=g-import-not-at-top
  weights = {"module.head.weight": torch.arange(6.0).reshape(2, 3), "module.head.bias": torch.ones(2)}
  path = str(tmp_path / "released.pth.tar")
  torch.save({"model": weights, "epoch": 300}, path)
  state = files.load_state_dict(path)
  assert sorted(state) == ["head.bias", "head.weight"]
  np.testing.assert_array_equal(np.asarray(state["head.weight"]), np.arange(6.0).reshape(2, 3))
  mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}  # prefix on some keys only: kept as is
  torch.save(mixed, str(tmp_path / "mixed.pth"))
  assert sorted(files.load_state_dict(str(tmp_path / "mixed.pth"))) == ["b", "module.a"]
  with pytest.raises(ValueError, match="unsupported extension '.ckpt'"):
    (tmp_path / "x.ckpt").write_bytes(b"")
    files.load_state_dict(str(tmp_path / "x.ckpt"))
