"""Plug-ins any ViT takes as switches (DESIGN.md, decision 13), each a registry validated by name:

  posemb          - `layer(tokens, *, train) -> tokens`: puts positions on the carry (adds a
                    table, a conv of one, ...). Built as `cls(**posemb_kwargs, name=...)`.
  norm            - `layer(x, *, tokens) -> x`: a block's normalization of (B, N, D); `tokens`
                    gives the layout (grid, prefix, mask) for norms that need it (DTN).
  token_reduction - `layer(tokens, *, train) -> tokens`: runs between blocks and returns fewer
                    tokens (or the same tokens with a `mask` of the dropped ones). Built as
                    `cls(keep_ratio=..., **reduction_kwargs, name=...)`.

    model = vitjax.create_model('vit_s16', posemb='rpe2d', norm='dtn', token_reduction='ltm',
                                reduction_blocks=(4, 8), keep_ratio=0.7)

The built-in members are registered by their modules (`vitjax.models.positions`, ...); register
your own with `register_posemb` / `register_norm` / `register_reducer`. Random draws in training
use the 'dropout' rng stream, which the runner always passes.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax import choices
from vitjax.models import layers
from vitjax.models.registry import register_in
from vitjax.ops import crossvit as crossvit_ops
from vitjax.ops import resize

POSEMBS: dict[str, type] = {}
NORMS: dict[str, type] = {}
REDUCERS: dict[str, type] = {}


def register_posemb(name: str):
  return register_in(POSEMBS, "posemb", name)


def register_norm(name: str):
  return register_in(NORMS, "norm", name)


def register_reducer(name: str):
  return register_in(REDUCERS, "token_reduction", name)


def _get(table: dict, field: str, value):
  if not isinstance(value, str) and callable(value):   # a Linen class or partial, used as given
    return value
  if value in table:
    return table[value]
  raise choices.unknown(field, value, sorted(table))


def get_posemb(value) -> type:
  return _get(POSEMBS, "posemb", value)


def get_norm(value) -> type:
  return _get(NORMS, "norm", value)


def get_reducer(value) -> type:
  if value == "none":
    raise ValueError("token_reduction='none' builds no reducer")
  if not isinstance(value, str) or value in REDUCERS:
    return _get(REDUCERS, "token_reduction", value)
  raise choices.unknown("token_reduction", value, ["none", *sorted(REDUCERS)])


def check_keep_ratio(keep_ratio: float, field: str = "keep_ratio") -> float:
  if not 0.0 < keep_ratio <= 1.0:
    raise ValueError(f"{field}={keep_ratio!r}: allowed values are in (0, 1]")
  return float(keep_ratio)


def kept_count(n: int, keep_ratio: float) -> int:
  """Tokens left of `n` at `keep_ratio` (at least one): ceil(n * keep_ratio)."""
  return max(1, int(np.ceil(n * check_keep_ratio(keep_ratio) - 1e-9)))


# ---------------------------------------------------------------------------------------------
# Norms.

@register_norm("ln")
class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` (the default), taking and ignoring the layout: same parameters, same math."""

  def __call__(self, x, *, tokens=None):
    del tokens
    return super().__call__(x)


def make_norm(norm, name: str, norm_kwargs=None) -> nn.Module:
  """The norm layer `norm` (registered name, class or partial) named `name`."""
  cls = get_norm(norm)
  kwargs = dict(norm_kwargs or {})
  layers.check_overrides(cls, kwargs, what=f"norm {norm!r}")
  return cls(**kwargs, name=name)


# ---------------------------------------------------------------------------------------------
# Positions.

@register_posemb("none")
class NoPositions(nn.Module):
  """No positions (models whose mixer encodes them, e.g. a relative-position mixer)."""

  def __call__(self, tokens, *, train: bool = False):
    del train
    return tokens


@register_posemb("learn")
class LearnedPositions(nn.Module):
  """A learned table over prefix and patch tokens, created at the grid of the input it is
  initialised with (vit_jax's `posembed_input/pos_embedding`, shape (1, P + h*w, D)).

  Applied at another grid, the patch part of the table is resampled to it with `method`
  (torch's bicubic by default, as timm's `resample_abs_pos_embed`); the prefix rows are kept.
  """
  method: str = "bicubic"
  init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train
    x = tokens.x
    if self.has_variable("params", "pos_embedding"):
      table = self.get_variable("params", "pos_embedding")
    else:
      table = self.param("pos_embedding", self.init, (1,) + x.shape[1:], x.dtype)
    if table.shape[1] != x.shape[1]:
      table = resample_table(table, tokens.num_prefix, tokens.grid, method=self.method)
    return tokens.replace(x=x + table.astype(x.dtype))


def resample_table(table, num_prefix: int, grid, *, method: str = "bicubic"):
  """A (1, P + h0*w0, D) position table with a square patch part, resampled to `grid`."""
  if grid is None:
    raise ValueError("a learned position table can only be resampled for tokens on a 2-D grid")
  n0 = table.shape[1] - num_prefix
  side = int(round(np.sqrt(n0)))
  if side * side != n0:
    raise ValueError(f"the learned position table has {n0} patch rows, which is not a square "
                     f"grid; it cannot be resampled to grid={grid}")
  choices.check("posemb_kwargs.method", method, ("bicubic", *resize.METHODS))
  prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
  patches = patches.reshape(1, side, side, -1)
  if method == "bicubic":   # torch's F.interpolate(mode='bicubic', align_corners=False)
    patches = crossvit_ops.resize_bicubic(patches, tuple(grid))
  else:
    patches = resize.resize_2d(patches, tuple(grid), method)
  return jnp.concatenate([prefix, patches.reshape(1, grid[0] * grid[1], -1)], axis=1)


@register_posemb("sincos2d")
class SinCosPositions(nn.Module):
  """The fixed 2-D sin-cos table (`layers.posemb_sincos_2d`) of the current grid; prefix tokens
  get zeros. Nothing learned, so any grid works."""
  temperature: float = 10_000.0

  def __call__(self, tokens, *, train: bool = False):
    del train
    h, w = _grid(tokens)
    pe = layers.posemb_sincos_2d(h, w, tokens.x.shape[-1], self.temperature).reshape(1, h * w, -1)
    pe = np.concatenate([np.zeros((1, tokens.num_prefix, pe.shape[-1]), pe.dtype), pe], axis=1)
    return tokens.replace(x=tokens.x + jnp.asarray(pe, tokens.x.dtype))


def _grid(tokens) -> tuple[int, int]:
  if tokens.grid is None:
    raise ValueError("these positions need tokens on a 2-D grid")
  return tokens.grid


def add_positions(module: nn.Module, posemb, tokens, *, train: bool, posemb_kwargs=None,
                  name: str = "posembed_input"):
  """Builds the `posemb` layer inside `module`'s compact method and applies it."""
  cls = get_posemb(posemb)
  kwargs = dict(posemb_kwargs or {})
  layers.check_overrides(cls, kwargs, what=f"posemb {posemb!r}")
  return cls(**kwargs, name=name)(tokens, train=train)


# ---------------------------------------------------------------------------------------------
# Token reduction.

def make_reducer(kind, keep_ratio: float, name: str, reduction_kwargs=None) -> nn.Module:
  cls = get_reducer(kind)
  check_keep_ratio(keep_ratio)
  kwargs = dict(reduction_kwargs or {})
  layers.check_overrides(cls, {**kwargs, "keep_ratio": keep_ratio},
                         what=f"token_reduction {kind!r}")
  return cls(keep_ratio=keep_ratio, **kwargs, name=name)


def keep_tokens(tokens, index):
  """The carry with the prefix tokens and the patch tokens at `index` (B, k) (indices among the
  patch tokens), in that order; `grid` becomes None, `mask` is gathered along."""
  p = tokens.num_prefix
  take = lambda a: jnp.take_along_axis(a, index[..., None] if a.ndim == 3 else index, axis=1)
  x = jnp.concatenate([tokens.x[:, :p], take(tokens.x[:, p:])], axis=1)
  mask = tokens.mask
  if mask is not None:
    mask = jnp.concatenate([mask[:, :p], take(mask[:, p:])], axis=1)
  return tokens.replace(x=x, grid=None, mask=mask)


def masked_mean(x, mask):
  """Mean over axis 1 of (B, N, D) counting only tokens where mask (B, N) is True."""
  if mask is None:
    return x.mean(axis=1)
  w = mask.astype(x.dtype)[..., None]
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def check_switches(*, posemb=None, norm=None, token_reduction=None, reduction_blocks=(),
                   keep_ratio: float = 1.0) -> None:
  """One clear error for a plug-in switch outside its registry, before anything is built."""
  if isinstance(posemb, str):
    get_posemb(posemb)
  if isinstance(norm, str):
    get_norm(norm)
  if isinstance(token_reduction, str) and token_reduction != "none":
    get_reducer(token_reduction)
  check_keep_ratio(keep_ratio)
  if token_reduction not in (None, "none") and not reduction_blocks:
    raise ValueError(f"token_reduction={token_reduction!r} needs reduction_blocks: the block "
                     "indices the reducer runs before, e.g. (4, 8)")


def registered() -> dict[str, list[str]]:
  """Every switch and its allowed values (the README's table is checked against this)."""
  return {"posemb": sorted(POSEMBS), "norm": sorted(NORMS),
          "token_reduction": ["none", *sorted(REDUCERS)]}

