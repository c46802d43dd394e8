"""Attention kernels behind one selector; the pure-jnp `xla` path is the default and the oracle.

`attention(q, k, v, *, scale, impl)` with q (B, T, H, d) and k, v (B, S, H, d).
  * 'xla'   : `vitjax.ops.attention.dot_product_attention` (always available).
  * 'cudnn' : `jax.nn.dot_product_attention(implementation='cudnn')` (GPU only).
  * 'pallas': the flash-attention kernel in `vitjax.kernels.pallas_attention` (no bias or mask;
              interpret mode on CPU, Triton on GPU; imported only when asked for).
  * 'auto'  : the first kernel in `AUTO_ORDER[backend]` that supports the call, else 'xla'
              (it logs the fallback once). A kernel enters AUTO_ORDER only after a benchmark
              recorded in experiments/ shows it faster.
An explicitly named kernel that cannot run the call raises ValueError.
"""
from __future__ import annotations

import functools
import logging

import jax

from vitjax import choices
from vitjax.ops import attention as ops_attention

_LOG = logging.getLogger(__name__)

IMPLS = ("xla", "cudnn", "pallas", "auto")
# Backend -> kernels 'auto' tries before xla. Empty until a recorded benchmark says otherwise.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": (), "gpu": (), "tpu": ()}


def _xla(q, k, v, *, scale, bias=None, mask=None):
  return ops_attention.dot_product_attention(q, k, v, scale=scale, bias=bias, mask=mask)


def _cudnn_supports(q, k, v, bias, mask) -> str | None:
  if jax.default_backend() != "gpu":
    return "cudnn needs a GPU backend"
  if q.dtype.name not in ("float16", "bfloat16"):
    return f"cudnn needs float16/bfloat16 inputs, got {q.dtype}"
  return None


def _cudnn(q, k, v, *, scale, bias=None, mask=None):
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation="cudnn")


def _pallas_supports(q, k, v, bias, mask) -> str | None:
  try:
    from vitjax.kernels import pallas_attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the install
    return f"pallas kernel unavailable: {e}"
  return pallas_attention.supports(q, k, v, bias, mask)


def _pallas(q, k, v, *, scale, bias=None, mask=None):
  from vitjax.kernels import pallas_attention  # pylint: disable=g-import-not-at-top
  return pallas_attention.attention(q, k, v, scale=scale)


_KERNELS = {
    "xla": (_xla, lambda *a: None),
    "cudnn": (_cudnn, _cudnn_supports),
    "pallas": (_pallas, _pallas_supports),
}


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str):
  _LOG.info("attn_impl='auto' falls back to 'xla': %s", reason)


def resolve(impl: str, q, k, v, bias=None, mask=None) -> str:
  """Returns the kernel name `impl` resolves to for these inputs, raising if it cannot run them."""
  choices.check("attn_impl", impl, IMPLS)
  if impl == "auto":
    reasons = []
    for name in AUTO_ORDER.get(jax.default_backend(), ()):
      why = _KERNELS[name][1](q, k, v, bias, mask)
      if why is None:
        return name
      reasons.append(f"{name}: {why}")
    _log_fallback_once(
        "; ".join(reasons) or f"no faster kernel recorded for {jax.default_backend()}")
    return "xla"
  why = _KERNELS[impl][1](q, k, v, bias, mask)
  if why is not None:
    raise ValueError(f"attn_impl={impl!r} cannot run q{q.shape} {q.dtype}: {why}.")
  return impl


def attention(q, k, v, *, scale, bias=None, mask=None, impl: str = "xla"):
  """softmax(q k^T * scale + bias) v with the kernel `impl` selects; see module docstring."""
  name = resolve(impl, q, k, v, bias, mask)
  return _KERNELS[name][0](q, k, v, scale=scale, bias=bias, mask=mask)
