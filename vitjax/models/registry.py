"""Registries: models (name -> factory); blocks, token mixers and downsampling layers
(name -> Linen class).

The three plug points of the backbone (DESIGN.md, decision 3):
  * the token carry (`backbone.Tokens`), a pytree of token streams;
  * BLOCKS: `block(tokens, *, train) -> tokens`, owns norms and residuals;
  * MIXERS: `mixer(x, *, train) -> x` on (B, N, D), no norm, no residual.
A mixer may take `grid=(h, w)` (the token grid of x) when it needs 2-D structure;
blocks pass it to mixers whose class sets `needs_grid = True`.
DOWNSAMPLES: `layer(x, *, train) -> x` on (B, H, W, C) maps between the stages of a
multi-stage model; built as `cls(width, **kwargs)`, each declares its `stride`.

Wherever a block, mixer or downsampling layer is chosen, it can be given by registered name
(configs, the command line) or directly as a Linen class or `functools.partial` of one (Python
users), as timm's `block_fn`: `get_block`, `get_mixer` and `get_downsample` accept both.
Register your own with the decorators (exported as `vitjax.register_mixer` and friends):

    @vitjax.register_mixer("my_mixer")
    class MyMixer(nn.Module): ...
    model = vitjax.create_model("vit_s16", mixer="my_mixer")
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from vitjax import choices

MODELS: dict[str, Callable[..., Any]] = {}
MIXERS: dict[str, type] = {}
BLOCKS: dict[str, type] = {}
DOWNSAMPLES: dict[str, type] = {}


def register_in(table: dict, kind: str, name: str):
  """Decorator registering an object under `name` in `table` (an error when taken); the plug-in
  registries of `vitjax.models.plugins` use it too."""
  def wrap(obj):
    if name in table:
      raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = obj
    return obj
  return wrap


def register_model(name: str):
  """Decorator: registers a factory `fn(**overrides) -> nn.Module` under `name`."""
  return register_in(MODELS, "model", name)


def register_mixer(name: str):
  """Decorator: registers a token-mixer Linen class under `name`."""
  return register_in(MIXERS, "mixer", name)


def register_block(name: str):
  """Decorator: registers a block Linen class under `name`."""
  return register_in(BLOCKS, "block", name)


def register_downsample(name: str):
  """Decorator: registers a downsampling layer (Linen class taking `width` first) under `name`."""
  return register_in(DOWNSAMPLES, "downsample", name)


def _lookup(table: dict, kind: str, field: str, name):
  if not isinstance(name, str):   # a Linen class or a functools.partial of one: used as given
    if callable(name):
      return name
    raise ValueError(f"{field}={name!r} must be a registered {kind} name, a Linen class or a "
                     f"functools.partial of one. Allowed names: {', '.join(sorted(table))}.")
  if name in table:
    return table[name]
  raise choices.unknown(f"{kind} {field}", name, sorted(table))


def get_mixer(name) -> type:
  return _lookup(MIXERS, "mixer", "mixer", name)


def get_block(name) -> type:
  return _lookup(BLOCKS, "block", "block", name)


def get_downsample(name) -> type:
  return _lookup(DOWNSAMPLES, "downsample", "downsample", name)


def display_name(obj) -> str:
  """A registered name as is; a class or partial by its class name (for error messages)."""
  if isinstance(obj, str):
    return obj
  return getattr(getattr(obj, "func", obj), "__name__", repr(obj))


def list_models(pattern: str = "*") -> list[str]:
  """Sorted names of registered models matching a shell-style pattern."""
  return sorted(n for n in MODELS if fnmatch.fnmatchcase(n, pattern))


def list_mixers(pattern: str = "*") -> list[str]:
  return sorted(n for n in MIXERS if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, **overrides):
  """Builds a registered model; `None`-valued overrides are dropped (as timm does).

  Raises:
    ValueError: for an unknown name (listing close names) or an unknown override.
  """
  factory = _lookup(MODELS, "model", "model_name", name)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return factory(**overrides)
