"""The one backbone: a token carry, a block registry and a mixer registry (DESIGN.md, decision 3).

  Tokens  - the carry: the main stream `x` (B, N, D), its static layout (`grid`, `num_prefix`)
            and `extra`, a dict of other streams (LookupViT keeps its lookup tokens there).
  Block   - `block(tokens, *, train) -> tokens`; registered in BLOCKS. 'vit' is the pre-norm
            Transformer block whose token mixer is any registered MIXER.
  Encoder - a stack of blocks over the carry (vit_jax's `Transformer`, same param names).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers
from vitjax.models.registry import get_block, get_mixer, register_block


@flax.struct.dataclass
class Tokens:
  """The carry between blocks. `grid` and `num_prefix` are static (not traced)."""
  x: jnp.ndarray                                   # (B, N, D) main stream
  extra: dict[str, Any] = flax.struct.field(default_factory=dict)
  grid: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)
  num_prefix: int = flax.struct.field(pytree_node=False, default=0)


def build_mixer(name: str, shared: dict[str, Any], mixer_kwargs: dict[str, Any] | None,
                **module_kw):
  """Instantiates registered mixer `name` with the shared fields it declares plus its kwargs."""
  cls = get_mixer(name)
  fields = layers.module_fields(cls)
  kwargs = {k: v for k, v in shared.items() if k in fields}
  kwargs.update(mixer_kwargs or {})
  layers.check_overrides(cls, kwargs, what=f"mixer {name!r}")
  return cls(**kwargs, name=getattr(cls, "scope_name", "mixer"), **module_kw)


def call_mixer(mixer: nn.Module, x, tokens: Tokens, *, train: bool):
  if getattr(mixer, "needs_grid", False):
    if tokens.grid is None:
      raise ValueError(f"mixer {type(mixer).__name__} needs a 2-D token grid, but the tokens have none")
    return mixer(x, grid=tokens.grid, num_prefix=tokens.num_prefix, train=train)
  return mixer(x, train=train)


@register_block("vit")
class EncoderBlock(nn.Module):
  """Pre-norm block: x + DropPath(mixer(LN(x))), then x + DropPath(MLP(LN(x)))."""
  mlp_dim: int
  num_heads: int
  mixer: str = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    x = tokens.x
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = nn.LayerNorm(name="LayerNorm_1")(x)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, name="MlpBlock_0")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return tokens.replace(x=x)


class Encoder(nn.Module):
  """Stack of `depth` registered blocks over the carry, drop-path rising linearly to `drop_path`.

  With `posemb=True` a learned table is added to `tokens.x` first (`posembed_input`), and with
  `final_norm=True` the main stream ends in `encoder_norm`: vit_jax's `Transformer` names.
  """
  depth: int
  block: str = "vit"
  block_kwargs: Any = None
  drop_path: float = 0.0
  posemb: bool = True
  final_norm: bool = True

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if self.posemb:
      tokens = tokens.replace(x=layers.AddPositionEmbs(name="posembed_input")(tokens.x))
    block_cls = get_block(self.block)
    kwargs = dict(self.block_kwargs or {})
    layers.check_overrides(block_cls, {**kwargs, "drop_path": 0.0}, what=f"block {self.block!r}")
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      tokens = block_cls(**kwargs, drop_path=rate, name=f"encoderblock_{i}")(tokens, train=train)
    if self.final_norm:
      tokens = tokens.replace(x=nn.LayerNorm(name="encoder_norm")(tokens.x))
    return tokens
