"""ViR and retention: the three forms against a dense reference written entry by entry (float64
within 1e-5, float32 within 1e-4, forward and gradient, with and without RetNet's normalisation),
the 2-D (Manhattan) retention, the 'retention' mixer against a plainly written reference (rotation
as complex numbers, GroupNorm per head, swish gate, class token moved to the end) and its causal
dependency pattern, torchscale's MultiScaleRetention with converted weights, parameter counts
(analytic and pinned), and clear errors for bad fields."""
import importlib.util
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import vir
from vitjax.ops import retention as ops

from tests import torch_compat


def _analytic_count(patch, width, depth, mlp, image, classes=1000, channels=3, value_factor=1):
  """ViT with the 'retention' mixer: q, k (D x D), v, g (D x vD), out (vD x D), no biases, and
  GroupNorm scale + bias (vD each), where the ViT has q, k, v, out with biases."""
  vd = value_factor * width
  mixer = 2 * width * width + 2 * width * vd + vd * width + 2 * vd
  block = mixer + 2 * 2 * width + 2 * width * mlp + mlp + width
  tokens = (image // patch) ** 2 + 1
  return (patch * patch * channels * width + width + width + tokens * width + depth * block
          + 2 * width + width * classes + classes)


# 1000 classes at 224 px. No reference count exists (no official code); each equals the analytic
# count above, and is the ViT's (22,050,664 / 86,567,656) plus the gate projection and the
# GroupNorm, less the attention biases, per block.
PINNED_COUNTS = {
    "vir_s16": (224, 23_810_920),
    "vir_b16": (224, 93_627_112),
}


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_parameter_counts(name):
  size, pinned = PINNED_COUNTS[name]
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  got = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  v = vir.VARIANTS[name]
  assert got == _analytic_count(v["patch_size"], v["width"], v["depth"], v["mlp_dim"], size)
  assert got == pinned


# ------------------------------------------------------------------ ops: dense references

def _causal_matrix(gammas, n):
  d = np.zeros((len(gammas), n, n))
  for h, g in enumerate(gammas):
    for i in range(n):
      for j in range(i + 1):
        d[h, i, j] = g ** (i - j)
  return d


def _manhattan_matrix(gammas, rows, cols):
  n = rows * cols
  d = np.zeros((len(gammas), n, n))
  for h, g in enumerate(gammas):
    for i in range(n):
      for j in range(n):
        d[h, i, j] = g ** (abs(i // cols - j // cols) + abs(i % cols - j % cols))
  return d


def _dense_retention(q, k, v, decay, normalize):
  """RetNet's parallel steps as written: D~ = D / sqrt(row sums of D), R = (q k^T) ⊙ D~,
  R~ = R / max(|row sums of R|, 1) (divisor held out of the gradient), O = R~ V."""
  scores = jnp.einsum("bnhd,bmhd->bhnm", q, k)
  if not normalize:
    return jnp.einsum("bhnm,bmhe->bnhe", scores * decay, v)
  r = scores * (decay / np.sqrt(decay.sum(-1, keepdims=True)))
  r = r / jax.lax.stop_gradient(jnp.maximum(jnp.abs(r.sum(-1, keepdims=True)), 1.0))
  return jnp.einsum("bhnm,bmhe->bnhe", r, v)


def _gammas(h):
  return 1 - 2.0 ** (-5 - np.arange(h))


def _qkv(dtype, b=2, n=13, h=3, d=4, dv=5):
  rng = np.random.default_rng(0)
  # Head 0 gets large q, k so that both branches of max(|row sum|, 1) occur.
  scale = np.array([3.0, 0.3, 1.0])[:h, None]
  q, k = (rng.standard_normal((b, n, h, d)) * scale for _ in range(2))
  return tuple(jnp.asarray(t, dtype) for t in (q, k, rng.standard_normal((b, n, h, dv))))


def _value_and_grads(fn, q, k, v):
  """fn(q, k, v) and its VJP with a fixed random cotangent."""
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(v.shape), q.dtype)
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cot)


# (form, chunk_size; used by 'chunkwise' only): chunks of 4 pad the 13 tokens to 16; 50 is more
# than the sequence.
FORM_CASES = (("parallel", 1), ("recurrent", 1), ("chunkwise", 4), ("chunkwise", 50))


@pytest.mark.parametrize("dtype,tol,normalize", [("float64", 1e-5, False), ("float64", 1e-5, True),
                                                 ("float32", 1e-4, True)])
def test_three_forms_equal_the_dense_reference(dtype, tol, normalize):
  with jax.enable_x64(dtype == "float64"):
    q, k, v = _qkv(jnp.dtype(dtype))
    n, h = q.shape[1], q.shape[2]
    lg = ops.retnet_log_gammas(h)
    np.testing.assert_allclose(np.exp(lg), _gammas(h), rtol=1e-7)
    decay = _causal_matrix(np.exp(lg.astype(np.float64)), n)
    if normalize:   # both branches of the row divisor are exercised
      r = np.einsum("bnhd,bmhd->bhnm", q, k) * decay / np.sqrt(decay.sum(-1, keepdims=True))
      assert (np.abs(r.sum(-1)) > 1).any() and (np.abs(r.sum(-1)) < 1).any()

    @jax.jit
    def everything(q, k, v):             # one compile: the reference and every form
      out = [_value_and_grads(lambda *a: _dense_retention(*a, decay, normalize), q, k, v)]
      for form, chunk in FORM_CASES:
        fn = lambda q, k, v: ops.causal_retention(  # noqa: E731
            q, k, v, lg, form=form, chunk_size=chunk, normalize=normalize)  # noqa: B023
        out.append(_value_and_grads(fn, q, k, v))
      return out

    (ref, ref_grads), *results = everything(q, k, v)
    for (form, chunk), (out, grads) in zip(FORM_CASES, results):
      assert out.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(out, ref, rtol=tol, atol=tol, err_msg=f"{form} {chunk}")
      for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, rtol=tol, atol=tol, err_msg=f"{form} {chunk} grad")


@pytest.mark.parametrize("normalize", [False, True])
def test_manhattan_retention_equals_the_dense_reference(normalize):
  q, k, v = _qkv(jnp.float32, n=12)
  lg = ops.retnet_log_gammas(3)
  decay = _manhattan_matrix(np.exp(lg.astype(np.float64)), 3, 4)
  (ref, ref_grads), (out, grads) = jax.jit(lambda q, k, v: (
      _value_and_grads(lambda *a: _dense_retention(*a, decay, normalize), q, k, v),
      _value_and_grads(lambda q, k, v: ops.manhattan_retention(q, k, v, lg, (3, 4),
                                                               normalize=normalize), q, k, v)))(
                                                                   q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the mixer

def _rotate(x):
  """RetNet's theta shift on (B, N, H, d): pair (2i, 2i+1) as a complex number times
  exp(1j n theta_i), theta_i = 10000^(-i / (d/2 - 1)), n the token's index."""
  n, d = x.shape[1], x.shape[-1]
  theta = 10000.0 ** (-np.arange(d // 2) / (d // 2 - 1))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.arange(n)[:, None] * theta)[:, None]
  return jnp.stack([z.real, z.imag], -1).reshape(x.shape)


def _mixer_reference(p, x, heads, num_prefix):
  """The 'retention' mixer written out: class token(s) to the end, projections, rotation,
  normalised causal retention, GroupNorm per head (mean/variance over the head's channels,
  then scale and bias), swish gate, output projection, class token(s) back to the front."""
  seq = jnp.concatenate([x[:, num_prefix:], x[:, :num_prefix]], 1)
  b, n, dim = seq.shape
  d = dim // heads
  q, k, v, g = (seq @ p[f"{s}_proj"]["kernel"] for s in "qkvg")
  q, k, v = (t.reshape(b, n, heads, -1) for t in (q, k * d ** -0.5, v))
  y = _dense_retention(_rotate(q), _rotate(k), v, _causal_matrix(_gammas(heads), n), True)
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  y = (y - mu) / jnp.sqrt(var + 1e-6) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
  out = (g * jax.nn.sigmoid(g) * y.reshape(b, n, dim)) @ p["out_proj"]["kernel"]
  return jnp.concatenate([out[:, n - num_prefix:], out[:, :n - num_prefix]], 1)


def _random_variables(init, *args, seed=2, **kwargs):
  """Variables of `init`'s shapes drawn N(0, 0.3^2) + 1 for scales and N(0, 0.3^2) otherwise
  (GroupNorm and LayerNorm off identity, heads non-zero), without compiling the init."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda *a: init(jax.random.key(0), *a, **kwargs), *args)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.float32(0.3) * rng.standard_normal(x.shape, np.float32)
      + np.float32("scale" in jax.tree_util.keystr(path)), shapes)


def test_mixer_equals_its_written_out_form():
  """Chunkwise (chunks of 4 over 7 tokens) with every parameter perturbed; forward and the
  gradients of parameters and input."""
  x = np.random.default_rng(0).standard_normal((2, 7, 16), np.float32)  # CLS + 6 patches
  mixer = vir.MultiScaleRetention(num_heads=2, form="chunkwise", chunk_size=4)
  params = _random_variables(mixer.init, x, num_prefix=1)
  fn = lambda p, x: mixer.apply(p, x, num_prefix=1)                # noqa: E731
  ref_fn = lambda p, x: _mixer_reference(p["params"], x, 2, 1)     # noqa: E731
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * jnp.cos(jnp.arange(16.0)))  # noqa: E731
  out, ref, grads, ref_grads = jax.jit(lambda p, x: (
      fn(p, x), ref_fn(p, x), jax.grad(loss(fn), argnums=(0, 1))(p, x),
      jax.grad(loss(ref_fn), argnums=(0, 1))(p, x)))(params, x)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  assert len(jax.tree.leaves(grads)) == 8                              # 5 kernels, GN, x
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-4)


def test_class_token_at_the_end_sees_every_patch_and_patches_are_causal():
  x = np.random.default_rng(0).standard_normal((1, 5, 8), np.float32)  # CLS + 4 patches
  mixer = vir.MultiScaleRetention(num_heads=2)
  params = _random_variables(mixer.init, x, num_prefix=1)
  jac = jax.jit(jax.jacrev(lambda x: mixer.apply(params, x, num_prefix=1)))(x)[0, :, :, 0]
  depends = np.abs(np.asarray(jac)).sum((1, 3)) > 0                 # (out token, in token)
  expected = np.zeros((5, 5), bool)
  expected[0] = True                                                 # CLS: every token
  for i in range(1, 5):
    expected[i, 1:i + 1] = True                                      # patch i: patches <= i
  np.testing.assert_array_equal(depends, expected)


# ------------------------------------------------------------------ torchscale

def _torchscale():
  torch = pytest.importorskip("torch", reason="the torchscale parity test needs torch")
  pytest.importorskip("torchscale", reason="torchscale (pip install torchscale==0.3.0), the "
                      "RetNet reference, is not installed")
  torch_compat.import_timm()           # torchscale's retnet module imports timm's drop_path
  stubs = {}
  if importlib.util.find_spec("fairscale") is None:
    # retnet.py imports fairscale's checkpoint_wrapper / wrap at module level; they are used
    # only by the full decoder with activation checkpointing or FSDP, never here.
    fs = types.ModuleType("fairscale")
    fs.nn = types.ModuleType("fairscale.nn")
    fs.nn.checkpoint_wrapper = fs.nn.wrap = lambda module, *a, **k: module
    stubs = {"fairscale": fs, "fairscale.nn": fs.nn}
  sys.modules.update(stubs)
  try:
    from torchscale.architecture import config, retnet  # pylint: disable=g-import-not-at-top
    from torchscale.component import multiscale_retention  # pylint: disable=g-import-not-at-top
  finally:
    for name in stubs:
      sys.modules.pop(name, None)
  return torch, config.RetNetConfig, retnet.RetNetRelPos, multiscale_retention.MultiScaleRetention


def torchscale_diffs(dim=32, value_dim=64, heads=4, n=24, form="chunkwise", chunk_size=5,
                     batch=2, seed=0):
  """max |vitjax - torchscale| of the output and of the input gradient (each also relative to
  the largest reference entry): torchscale's MultiScaleRetention (parallel form, float64) with
  re-drawn weights against the 'retention' mixer (float32) with the same weights. The test runs
  the reduced size; the full-size figures of the README come from e.g.
      python -c "from tests import test_vir; print(test_vir.torchscale_diffs(384, 384, 6, 197))"
  """
  torch, RetNetConfig, RetNetRelPos, TorchMSR = _torchscale()   # noqa: N806
  args = RetNetConfig(decoder_embed_dim=dim, decoder_value_embed_dim=value_dim,
                      decoder_retention_heads=heads)
  torch.manual_seed(seed)
  ref = TorchMSR(args, dim, value_dim, heads).double()
  with torch.no_grad():                # re-drawn: the gain-2^-2.5 init keeps scores small
    for w in ref.parameters():
      w.copy_(dim ** -0.5 * torch.randn_like(w))
  x = torch.randn(batch, n, dim, dtype=torch.float64, requires_grad=True)
  cot = torch.randn(batch, n, dim, dtype=torch.float64)
  out = ref(x, RetNetRelPos(args).double()(n))                      # parallel form
  (out * cot).sum().backward()
  params = {"params": {k.removesuffix(".weight"): {"kernel": np.float32(w.numpy().T)}
                       for k, w in ref.state_dict().items()}}
  assert sorted(params["params"]) == ["g_proj", "k_proj", "out_proj", "q_proj", "v_proj"]
  mixer = vir.MultiScaleRetention(num_heads=heads, norm="rms", value_factor=value_dim // dim,
                                  form=form, chunk_size=chunk_size)

  @jax.jit
  def run(x, cot):
    y, vjp = jax.vjp(lambda x: mixer.apply(params, x), x)
    return y, vjp(cot)[0]

  y, gx = run(jnp.asarray(x.detach().numpy(), jnp.float32), jnp.asarray(cot.numpy(), jnp.float32))
  out, gref = out.detach().numpy(), x.grad.numpy()
  dy, dg = float(np.abs(y - out).max()), float(np.abs(gx - gref).max())
  return dict(out=dy, out_rel=dy / np.abs(out).max(), grad=dg, grad_rel=dg / np.abs(gref).max())


def test_equals_torchscale_multiscale_retention():
  """torchscale 0.3.0's parallel form (its decay, row normalisations, theta shift, RMSNorm, swish
  gate) against vitjax's chunkwise form (chunks of 5 over 24 tokens: padded), which carries the
  same normalisation: output and input gradient within 1e-4 of their largest entry."""
  diffs = torchscale_diffs()
  assert diffs["out_rel"] < 1e-4 and diffs["grad_rel"] < 1e-4, diffs


# ------------------------------------------------------------------ models and bad input

def test_model_forms_agree():
  """vir_s16's layout at a tiny size: the same logits whichever form the mixers use."""
  kw = dict(patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2, num_classes=5,
            head_zero_init=False)
  images = np.random.default_rng(0).standard_normal((2, 12, 12, 3), np.float32)  # 9 patches
  models = {form: vitjax.create_model("vir_s16", **kw, form=form, chunk_size=4)
            for form in ("auto", "chunkwise")}
  variables = _random_variables(models["auto"].init, images)
  logits = jax.jit(lambda v, x: {f: m.apply(v, x) for f, m in models.items()})(variables, images)
  assert logits["auto"].shape == (2, 5) and np.isfinite(logits["auto"]).all()
  np.testing.assert_allclose(logits["chunkwise"], logits["auto"], rtol=1e-4, atol=1e-4)


def test_manhattan_model_pools_patches():
  model = vitjax.create_model("vir_s16", patch_size=4, width=16, depth=1, mlp_dim=32,
                              num_heads=2, num_classes=3, decay="manhattan", pool="gap")
  images = jax.ShapeDtypeStruct((1, 8, 12, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert jax.eval_shape(model.apply, variables, images).shape == (1, 3)
  with pytest.raises(ValueError, match="pool='gap'"):
    jax.eval_shape(model.clone(pool="tok").init, jax.random.key(0), images)


@pytest.mark.parametrize("fields,call,match", [
    (dict(gammas=(0.5, 1.0)), {}, r"gammas=\(0\.5, 1\.0\).*\(0, 1\)"),
    (dict(gammas=(0.5, 0.0)), {}, r"gammas=.*\(0, 1\)"),
    (dict(gammas=(0.5,)), {}, r"gammas=.*one decay per head \(2"),
    (dict(form="paralel"), {}, r"form='paralel'.*Did you mean: parallel"),
    (dict(chunk_size=0), {}, r"chunk_size=0.*>= 1"),
    (dict(decay="manhattan", form="recurrent"), dict(grid=(2, 3)), r"only the parallel form"),
    (dict(decay="manhattan"), dict(grid=(2, 3), num_prefix=1), r"pool='gap'"),
    (dict(decay="1d"), {}, r"decay='1d'.*causal, manhattan"),
    (dict(norm="layer"), {}, r"norm='layer'.*group, rms"),
])
def test_bad_fields_raise_one_clear_error(fields, call, match):
  mixer = vir.MultiScaleRetention(num_heads=2, **fields)
  x = jax.ShapeDtypeStruct((1, 6 + call.get("num_prefix", 0), 8), jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: mixer.init(jax.random.key(0), x, **call), x)


def test_unknown_model_field_lists_the_retention_fields():
  with pytest.raises(ValueError, match=r"\['chunk'\].*chunk_size"):
    vitjax.create_model("vir_s16", chunk=4)
