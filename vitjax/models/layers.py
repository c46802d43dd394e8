"""Small building blocks shared by every family: MLP, stochastic depth, position tables."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu(x):
  """The exact GELU x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel, 2016), as timm's.

  `jax.nn.gelu(approximate=False)` evaluates Phi through erfc, which XLA expands into both of its
  branches (a polynomial and an exp-based tail); erf alone is one rational polynomial and runs
  about twice as fast on CPU. Where 1 + erf loses relative precision (x << 0) both forms are
  within 1e-6 absolute of the float64 value (tests/test_convert.py checks 1e-5, with gradients).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


class _DenseParams(nn.Module):
  """The `kernel` (in, out) and `bias` (out,) of an `nn.Dense`, same names, shapes and init."""
  features: int
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return kernel, bias


# dot_general dimension numbers: contract lhs axis i with rhs axis j, no batch axes.
def _contract(i: int, j: int):
  return (((i,), (j,)), ((), ()))


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout (vit_jax's `MlpBlock`, same param names).

  The hidden activation is computed transposed, h^T = W1^T x^T of shape (mlp_dim, tokens), and
  the second product contracts h^T's leading axis. Same math as x W1 -> W2, but XLA:CPU runs
  these two column-major-operand products through its Eigen GEMM, faster than its default
  YNNPACK GEMM on ViT MLP shapes (`python -m experiments.bench_parts`); on GPU/TPU the transposed
  operands are free (folded into the GEMM call / layout).
  """
  mlp_dim: int
  out_dim: int | None = None
  dropout: float = 0.0
  act: Callable = gelu
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    d_in = x.shape[-1]
    out_dim = d_in if self.out_dim is None else self.out_dim
    w1, b1 = _DenseParams(self.mlp_dim, self.kernel_init, self.bias_init, name="Dense_0")(d_in)
    w2, b2 = _DenseParams(out_dim, self.kernel_init, self.bias_init, name="Dense_1")(
        self.mlp_dim)
    x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, d_in)                                          # (M, D)
    h_t = jax.lax.dot_general(w1, tokens, _contract(0, 1)) + b1[:, None]  # (F, M)
    h_t = self.act(h_t)
    # Dropout draws its mask in the usual (M, F) orientation; at eval time it is the identity
    # and the two transposes cancel.
    h_t = nn.Dropout(self.dropout, deterministic=not train)(h_t.T).T
    y = jax.lax.dot_general(h_t, w2, _contract(0, 0)) + b2                # (M, D_out)
    y = y.reshape(*lead, out_dim)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a whole residual branch per example with probability `rate`."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0)


class AddPositionEmbs(nn.Module):
  """Adds a learned position table of the input's shape (vit_jax's `posembed_input`)."""
  init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", self.init, (1,) + x.shape[1:], x.dtype)
    return x + pe


def module_fields(cls) -> set[str]:
  """Names a Linen module class accepts as constructor fields."""
  return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def check_overrides(cls, overrides: dict[str, Any], *, what: str):
  """Raises one clear error when `overrides` names a field `cls` does not have."""
  allowed = module_fields(cls)
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(
        f"Unknown {what} field(s) {unknown}. Allowed fields: {', '.join(sorted(allowed))}.")
