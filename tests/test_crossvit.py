"""CrossViT: parameter counts equal timm's, the class-token cross-attention (op and mixer) against
dense attention written out per head (forward and gradients), the bicubic branch resize against
PyTorch's, logits equal timm's on perturbed weights (a reduced two-block model, crossvit_tiny_240
and crossvit_9_dagger_240 at 240 px), timm's drop-path schedule, and clear errors.

timm's CrossViT equals the official IBM/CrossViT after renaming `pos_embed.i` and `cls_token.i`,
which `from_timm` accepts too, so timm is the reference.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import convert
from vitjax.models import crossvit
from vitjax.ops import crossvit as ops

from tests import torch_compat

# 1000 classes at 240 px; timm's `sum(p.numel() for p in model.parameters())`.
PINNED_COUNTS = {
    "crossvit_tiny_240": (240, 7_014_800),
    "crossvit_small_240": (240, 26_856_272),
    "crossvit_base_240": (240, 105_025_232),
    "crossvit_9_240": (240, 8_553_296),
    "crossvit_15_240": (240, 27_528_464),
    "crossvit_18_240": (240, 43_271_408),
    "crossvit_9_dagger_240": (240, 8_776_592),
    "crossvit_15_dagger_240": (240, 28_209_008),
    "crossvit_18_dagger_240": (240, 44_266_976),
}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_counts(name):
  size, count = PINNED_COUNTS[name]
  shapes = jax.eval_shape(vitjax.create_model(name).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert _count(shapes) == count


# --------------------------------------------------------------------------------------------
# The class-token cross-attention.

def _dense_attention(q, k, v, scale):
  """Every query row of plain softmax attention, head by head: (B, T, H, d) -> (B, T, H, d)."""
  out = []
  for h in range(q.shape[2]):
    s = q[:, :, h] @ jnp.swapaxes(k[:, :, h], 1, 2) * scale          # (B, T, N)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    out.append((e / e.sum(-1, keepdims=True)) @ v[:, :, h])
  return jnp.stack(out, axis=2)


def test_op_equals_the_class_rows_of_dense_attention():
  rng = np.random.default_rng(0)
  b, n, heads, d, p = 2, 7, 3, 4, 2
  q_all, k, v = (jnp.asarray(rng.standard_normal((b, n, heads, d)), jnp.float32) for _ in "qkv")
  w = jnp.asarray(rng.standard_normal((b, p, heads, d)), jnp.float32)

  def op(q_all, k, v):
    return ops.cls_cross_attention(q_all[:, :p], k, v, scale=0.5)

  def ref(q_all, k, v):
    return _dense_attention(q_all, k, v, 0.5)[:, :p]

  @jax.jit
  def both(q_all, k, v):     # values and gradients of op and reference, one compile
    return [jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(
        q_all, k, v) for f in (op, ref)] + [op(q_all, k, v), ref(q_all, k, v)]
  (_, g_op), (_, g_ref), y_op, y_ref = both(q_all, k, v)
  np.testing.assert_allclose(y_op, y_ref, atol=1e-6)
  for a, r in zip(g_op, g_ref):
    np.testing.assert_allclose(a, r, atol=1e-5)
  assert float(jnp.abs(g_op[0][:, p:]).max()) == 0.0          # patch tokens never query


def test_mixer_matches_dense_attention_and_leaves_patch_rows_zero():
  b, n, dim, heads = 2, 6, 8, 2
  rng = np.random.default_rng(1)
  x, w = (rng.standard_normal((b, n, dim)).astype(np.float32) for _ in "xw")
  mixer = crossvit.ClassCrossAttention(num_heads=heads)
  shapes = jax.eval_shape(mixer.init, jax.random.key(0), x)     # every weight re-drawn
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(np.float32),
                        shapes)["params"]

  def ref(params, x):
    def proj(name):
      return jnp.einsum("bnc,chd->bnhd", x, params[name]["kernel"]) + params[name]["bias"]
    y = _dense_attention(proj("query"), proj("key"), proj("value"), (dim // heads) ** -0.5)
    y = jnp.einsum("bnhd,hdc->bnc", y, params["out"]["kernel"]) + params["out"]["bias"]
    return y.at[:, 1:].set(0.0)

  run = lambda p, x: mixer.apply({"params": p}, x, num_prefix=1)  # noqa: E731
  @jax.jit
  def both(params, x):      # outputs and gradients of mixer and reference, one compile
    out = []
    for f in (run, ref):
      loss = lambda p, x, f=f: (jnp.sum(f(p, x) * w), f(p, x))  # noqa: E731
      (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
      out.append((y, g))
    return out
  (y, g), (y_ref, g_ref) = both(params, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  assert float(jnp.abs(y[:, 1:]).max()) == 0.0
  close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4)
  jax.tree.map(close, g, g_ref)
  assert float(jnp.abs(g[0]["key"]["kernel"]).sum()) > 0


def test_cls_cross_attn_is_a_mixer_for_other_backbones():
  """In a ViT block only the class token attends (traced, not compiled: the dense test above
  checks the numbers); without a class token it is one clear error."""
  model = vitjax.create_model("vit_nano4", mixer="cls_cross_attn", num_classes=10, depth=2)
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  attn = variables["params"]["Transformer"]["encoderblock_0"]["attn"]
  assert attn["query"]["kernel"].shape == (128, 4, 32)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
  with pytest.raises(ValueError, match=r"cls_cross_attn: the class token queries"):
    jax.eval_shape(model.clone(pool="gap").init, jax.random.key(0), x)


# --------------------------------------------------------------------------------------------
# The bicubic resize of the large-patch branch.

def test_bicubic_taps_equal_the_dense_matrix_product():
  """The four-tap resize is the separable product A_h x A_w^T with rows summing to one."""
  x = np.random.default_rng(0).standard_normal((2, 9, 5, 3))
  a_h, a_w = ops.bicubic_matrix(9, 4), ops.bicubic_matrix(5, 11)
  for a in (a_h, a_w):
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)
  dense = np.einsum("ph,bhwc,qw->bpqc", a_h, x, a_w)
  np.testing.assert_allclose(ops.resize_bicubic(x.astype(np.float32), (4, 11)), dense, atol=1e-5)
  np.testing.assert_array_equal(ops.bicubic_matrix(7, 7), np.eye(7))


@pytest.mark.parametrize("in_hw,out_hw", [((240, 240), (224, 224)), ((13, 40), (20, 26)),
                                          ((13, 9), (7, 3))])
def test_resize_matches_torch_bicubic(in_hw, out_hw):
  torch = pytest.importorskip("torch", reason="PyTorch's bicubic interpolation is the reference")
  x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_hw,
                                        mode="bicubic", align_corners=False)
  np.testing.assert_allclose(ops.resize_bicubic(x, out_hw), ref.numpy().transpose(0, 2, 3, 1),
                             atol=5e-6)


# --------------------------------------------------------------------------------------------
# Against timm.

# A reduced CrossViT: 48 px, patches 4 and 8, branch 1 resized to 32 px (12x12 and 4x4 grids),
# two multi-scale blocks of different depths, different widths, heads and MLP ratios per branch.
REDUCED = dict(img_size=48, img_scale=(1.0, 32 / 48), patch_size=(4, 8), embed_dim=(16, 32),
               depth=((1, 2, 0), (1, 1, 0)), num_heads=(2, 4), mlp_ratio=(2, 3, 1), num_classes=5)


def perturb(torch, model, seed):
  """Re-draws every parameter: norm scales 1 + 0.2 n, biases 0.2 n, class tokens and position
  tables 0.5 n, weights n / sqrt(fan_in)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        p.copy_(float(name.endswith("weight")) + 0.2 * noise)
      elif p.ndim == 3:
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / math.sqrt(p.numel() // p.shape[0]))
  return model


def _timm(name=None, **kwargs):
  """A timm CrossViT without timm's init (every parameter is re-drawn anyway)."""
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.crossvit import CrossVit  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = timm.create_model(name) if name else CrossVit(**kwargs)
  return torch, perturb(torch, model.to_empty(device="cpu").eval(), 1)


@pytest.fixture(scope="module")
def reduced():
  return _timm(**REDUCED)


def test_reduced_crossvit_matches_timm(reduced):
  """Sizes, depths, MLP ratios, patch sizes and img_scale are read off the weights."""
  torch, timm_model = reduced
  model, variables, meta = convert.from_timm(timm_model.state_dict(), "crossvit_tiny_240",
                                             num_heads=(2, 4))
  assert meta["image_size"] == [48, 48] and model.img_scale == (1.0, 32 / 48)
  assert model.depth == ((1, 2, 0), (1, 1, 0)) and model.mlp_ratio == (2.0, 3.0)
  assert model.patch_size == (4, 8) and model.embed_dim == (16, 32)
  assert _count(variables) == sum(p.numel() for p in timm_model.parameters())
  x = np.random.default_rng(2).standard_normal((2, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    ref = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_full_size_matches_timm_at_240(name):
  torch, timm_model = _timm(name)
  model, variables, meta = convert.from_timm(timm_model.state_dict(), name)
  registered = vitjax.create_model(name)
  assert meta["image_size"] == [240, 240]
  assert (model.img_scale, model.depth, model.multi_conv) == (
      registered.img_scale, registered.depth, registered.multi_conv)
  x = np.random.default_rng(2).standard_normal((1, 240, 240, 3)).astype(np.float32)
  with torch.no_grad():
    ref = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), ref, atol=1e-4, rtol=1e-4)


def test_official_key_names_load_the_same_params(reduced):
  state = reduced[1].state_dict()
  official = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
              for k, v in state.items()}
  assert "pos_embed.1" in official
  a = convert.from_timm(state, "crossvit_tiny_240", num_heads=(2, 4)).variables
  b = convert.from_timm(official, "crossvit_tiny_240", num_heads=(2, 4)).variables
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_from_timm_is_strict(reduced):
  state = dict(reduced[1].state_dict())
  del state["blocks.0.fusion.1.attn.wk.weight"]
  state["blocks.0.fusion.1.attn.lepe.weight"] = state["blocks.0.fusion.1.attn.wq.bias"]
  with pytest.raises(ValueError, match=r"(?s)timm crossvit.*attn\.lepe\.weight.*"
                                       r"blocks_0/fusion_1/attn/key/kernel"):
    convert.from_timm(state, "crossvit_tiny_240", num_heads=(2, 4))


def test_drop_path_rates_follow_timm():
  _, timm_model = _timm(**{**REDUCED, "drop_path_rate": 0.3})
  rate = lambda m: getattr(m, "drop_prob", 0.0)  # noqa: E731  (Identity when the rate is 0)
  model = vitjax.create_model("crossvit_tiny_240", **{
      k: v for k, v in REDUCED.items() if k not in ("img_size", "num_classes", "mlp_ratio")},
      mlp_ratio=(2, 3), drop_path=0.3)
  for k, entry in enumerate(model.stage_spec().block_cycle):
    blocks = timm_model.blocks[k]
    for i, depth in enumerate(entry["depth"]):
      want = [rate(blocks.blocks[i][j].drop_path1) for j in range(depth)]
      np.testing.assert_allclose(entry["drop_rates"][:depth], want, atol=1e-7)
    np.testing.assert_allclose(entry["drop_rates"][-1], rate(blocks.fusion[0].drop_path),
                               atol=1e-7)
  x = jax.ShapeDtypeStruct((2, 48, 48, 3), jnp.float32)    # train=True traces with drop-path
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits = jax.eval_shape(functools.partial(model.apply, train=True, rngs={
      "dropout": jax.random.key(1)}), variables, x)
  assert logits.shape == (2, 1000)


# --------------------------------------------------------------------------------------------
# Errors.

def test_bad_input_gets_one_clear_error():
  make = functools.partial(vitjax.create_model, "crossvit_tiny_240", num_classes=3)
  def init(model, size):
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"image size 250x250 does not suit the CrossViT branches' "
                                       r"patch sizes \(12, 16\).*multiples of 12"):
    init(make(), 250)
  with pytest.raises(ValueError, match=r"image size 24x24 .*branch 1 \(patch 16\) at 0x0"):
    init(make(img_scale=(1.0, 0.25)), 24)
  cases = [
      (dict(num_heads=(3,)), r"num_heads=\(3,\) needs one entry per branch \(2"),
      (dict(depth=((1, 4, 1),)), r"depth=.*fusion depth 0"),
      (dict(img_scale=(0.5, 0.5)), r"img_scale=\(0.5, 0.5\): branch 0 runs on the image itself"),
      (dict(embed_dim=(96, 190)), r"branch 1: embed_dim 190 is not divisible by num_heads=3"),
      (dict(multi_conv=True, patch_size=(4, 8)), r"multi_conv=True: patch_size=\(4, 8\)"),
      (dict(pool="cls"), r"Unknown pool='cls'"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      init(make(**overrides), 48)
