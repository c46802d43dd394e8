"""Small building blocks shared by every family: MLP, stochastic depth, position tables."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# timm / big_vision ViTs use the exact (erf) GELU.
gelu = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout (vit_jax's `MlpBlock`, same param names)."""
  mlp_dim: int
  out_dim: int | None = None
  dropout: float = 0.0
  act: Callable = gelu
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    x = nn.Dense(self.mlp_dim, kernel_init=self.kernel_init, bias_init=self.bias_init)(x)
    x = self.act(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(out_dim, kernel_init=self.kernel_init, bias_init=self.bias_init)(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


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
