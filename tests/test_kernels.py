"""Tests for the attention-kernel selector and the Pallas flash-attention kernel.

The oracle is `vitjax.ops.attention.dot_product_attention` (a plain einsum + softmax) and its
autodiff gradient. The Pallas kernel runs in interpret mode on CPU; every case is compiled once
(forward and VJP in one jitted function) to keep the file fast.
"""
import logging

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import kernels
from vitjax.kernels import pallas_attention
from vitjax.models.mixers import MultiHeadSelfAttention
from vitjax.ops.attention import dot_product_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkvw(seed, b, t, s, h, d, dv, dtype=jnp.float32):
  """Random q, k, v and a cotangent w (the weights of a random linear functional of the output)."""
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, s, h, d), dtype),
          jax.random.normal(kv, (b, s, h, dv), dtype), jax.random.normal(kw, (b, t, h, dv), dtype))


def _out_and_grads(fn, q, k, v, w):
  """fn(q, k, v) and the gradient of sum(fn(q, k, v) * w) w.r.t. q, k, v, in one compile."""
  def run(q, k, v, w):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w)
  return jax.jit(run)(q, k, v, w)


# (T, S, d, dv): T = S = 32 is a multiple of the 16-blocks; 17 and 40 are not, so both the query
# and key axes get padded; the last case is cross-attention with S != T and dv != d. Head dims
# below 16 also exercise the zero-padding of the feature axis.
@pytest.mark.parametrize("t,s,d,dv", [(32, 32, 16, 16), (17, 17, 8, 8), (40, 40, 8, 8),
                                      (17, 40, 12, 8)])
def test_pallas_matches_reference_forward_and_gradient(t, s, d, dv):
  q, k, v, w = _qkvw(t + s, 2, t, s, 3, d, dv)
  scale = d ** -0.5
  out, grads = _out_and_grads(
      lambda q, k, v: pallas_attention.attention(q, k, v, scale=scale, block_q=16, block_k=16),
      q, k, v, w)
  ref_out, ref_grads = _out_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, scale=scale), q, k, v, w)
  assert out.shape == (2, t, 3, dv)
  np.testing.assert_allclose(out, ref_out, **TOL)
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, err_msg=name, **TOL)


def test_pallas_bfloat16_close_to_float32_reference():
  q, k, v, w = _qkvw(7, 1, 24, 24, 2, 16, 16)
  cast = lambda *xs: [x.astype(jnp.bfloat16) for x in xs]  # noqa: E731
  out, grads = _out_and_grads(
      lambda q, k, v: pallas_attention.attention(q, k, v, scale=0.25, block_q=16, block_k=16),
      *cast(q, k, v, w))
  # The oracle sees the same bf16-rounded inputs, computed in float32.
  qb, kb, vb, wb = (x.astype(jnp.float32) for x in cast(q, k, v, w))
  ref_out, ref_grads = _out_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, scale=0.25), qb, kb, vb, wb)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=3e-2, rtol=3e-2)
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), ref_g, atol=6e-2, rtol=6e-2, err_msg=name)


def test_mhsa_mixer_pallas_equals_xla():
  x = jax.random.normal(jax.random.key(0), (2, 17, 16))
  w = jax.random.normal(jax.random.key(1), (2, 17, 16))
  params = MultiHeadSelfAttention(num_heads=2).init(jax.random.key(2), x)

  def out_and_grads(impl):
    mixer = MultiHeadSelfAttention(num_heads=2, attn_impl=impl)

    def loss(params, x):
      y = mixer.apply(params, x)
      return jnp.sum(y * w), y
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (dparams, dx), y = out_and_grads("pallas")
  (ref_dparams, ref_dx), ref_y = out_and_grads("xla")
  np.testing.assert_allclose(y, ref_y, **TOL)
  np.testing.assert_allclose(dx, ref_dx, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), dparams, ref_dparams)


def test_pallas_lowers_to_triton_for_gpu():
  """The GPU path cannot run here; check that all three kernels at least lower to Triton IR."""
  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: pallas_attention.attention(
        q, k, v, scale=0.125, interpret=False), q, k, v)
    return vjp(out)

  # 197 tokens (ViT-B/16 at 224 px) is not a block multiple, so the padded path is lowered.
  spec = jax.ShapeDtypeStruct((1, 197, 2, 64), jnp.bfloat16)
  try:
    exported = export.export(
        jax.jit(fwd_bwd), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(spec, spec, spec)
  except ImportError as e:  # pragma: no cover - jaxlib built without the Triton dialect
    pytest.skip(f"no Triton lowering in this jaxlib: {e}")
  module = exported.mlir_module()
  for name in ("vitjax_flash_fwd", "vitjax_flash_bwd_dq", "vitjax_flash_bwd_dkv"):
    assert f'name = "{name}"' in module, name


def _small_qkv():
  return _qkvw(0, 1, 17, 17, 2, 8, 8)[:3]


def test_supports_reasons():
  q, k, v = _small_qkv()
  assert pallas_attention.supports(q, k, v) is None
  assert "bias" in pallas_attention.supports(q, k, v, bias=jnp.zeros((1, 2, 17, 17)))
  assert "mask" in pallas_attention.supports(q, k, v, mask=jnp.ones((1, 1, 17, 17), bool))
  qi = q.astype(jnp.int32)
  assert "dtype" in pallas_attention.supports(qi, qi, qi)
  assert "differ" in pallas_attention.supports(q, k.astype(jnp.bfloat16), v)
  big = jnp.zeros((1, 17, 1, 512))
  assert "head dim" in pallas_attention.supports(big, big, big)
  assert "disagree" in pallas_attention.supports(q, k[:, :, :1], v[:, :, :1])


def test_pallas_rejects_bad_block_and_traced_scale():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match="block_q=24"):
    pallas_attention.attention(q, k, v, scale=1.0, block_q=24)
  with pytest.raises(ValueError, match="block_k=8"):
    pallas_attention.attention(q, k, v, scale=1.0, block_k=8)
  with pytest.raises(ValueError, match="scale must be a concrete"):
    jax.jit(lambda s: pallas_attention.attention(q, k, v, scale=s)).trace(0.5)


def test_explicit_pallas_with_mask_raises():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match="attn_impl='pallas'.*mask"):
    kernels.attention(q, k, v, scale=0.5, mask=jnp.ones((1, 1, 17, 17), bool), impl="pallas")


def test_unknown_impl_lists_allowed_values():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match="flash.*Allowed values: xla, cudnn, pallas, auto"):
    kernels.attention(q, k, v, scale=0.5, impl="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_explicit_cudnn_on_cpu_raises():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match="attn_impl='cudnn'.*GPU"):
    kernels.attention(q, k, v, scale=0.5, impl="cudnn")


def test_auto_falls_back_to_xla_on_cpu_and_logs_once(caplog):
  q, k, v = _small_qkv()
  kernels._log_fallback_once.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO, logger=kernels.__name__):
    assert kernels.resolve("auto", q, k, v) == "xla"
    out = kernels.attention(q, k, v, scale=0.5, impl="auto")
  fallbacks = [r for r in caplog.records if "falls back to 'xla'" in r.getMessage()]
  assert len(fallbacks) == 1, caplog.text
  np.testing.assert_array_equal(out, dot_product_attention(q, k, v, scale=0.5))


def test_auto_takes_a_listed_kernel_only_when_it_supports_the_call(monkeypatch, caplog):
  q, k, v = _small_qkv()
  monkeypatch.setitem(kernels.AUTO_ORDER, jax.default_backend(), ("pallas",))
  assert kernels.resolve("auto", q, k, v) == "pallas"
  kernels._log_fallback_once.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO, logger=kernels.__name__):
    assert kernels.resolve("auto", q, k, v, mask=jnp.ones((1, 1, 17, 17), bool)) == "xla"
  assert "pallas: the pallas kernel takes no mask" in caplog.text
