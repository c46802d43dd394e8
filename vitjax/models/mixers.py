"""Token mixers: (B, N, D) -> (B, N, D), no norm and no residual (the block owns those).

A mixer is a Linen class registered with `@register_mixer(name)`. Its hyperparameters are
dataclass fields. Blocks build it with the fields they share (`num_heads`, `attn_impl`,
`dropout`) filtered to those the class declares, plus the user's `mixer_kwargs`. A mixer that
needs the 2-D token layout sets `needs_grid = True` and then receives `grid=(h, w)` and
`num_prefix` (leading non-patch tokens such as CLS) as keyword arguments.
Family-specific mixers live in their own modules and register themselves the same way.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from vitjax import kernels
from vitjax.models.registry import register_mixer


def qkv_projections(x, num_heads: int, *, qkv_bias: bool, kernel_init, head_dim: int | None = None):
  """The 'query', 'key', 'value' DenseGeneral projections (B, N, D) -> 3 x (B, N, H, d), with
  d = head_dim, by default D/H.

  Call it from inside a compact method: the projections become submodules of that module, with
  the parameter names of `nn.MultiHeadDotProductAttention`.
  """
  d_model = x.shape[-1]
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"width {d_model} is not divisible by num_heads={num_heads}")
    head_dim = d_model // num_heads
  proj = lambda name: nn.DenseGeneral(  # noqa: E731
      (num_heads, head_dim), use_bias=qkv_bias, kernel_init=kernel_init, name=name)
  return proj("query")(x), proj("key")(x), proj("value")(x)


def out_projection(y, d_model: int, *, kernel_init, dropout: float, train: bool):
  """The 'out' projection (B, N, H, d) -> (B, N, D), then dropout; see `qkv_projections`."""
  y = nn.DenseGeneral(d_model, axis=(-2, -1), kernel_init=kernel_init, name="out")(y)
  return nn.Dropout(dropout, deterministic=not train)(y)


@register_mixer("mhsa")
class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with Flax's parameter layout (query/key/value/out DenseGeneral).

  The param names equal those of `nn.MultiHeadDotProductAttention`, so big_vision / vit_jax
  checkpoints load unchanged; the math is `vitjax.kernels.attention` (pure jnp by default).

  head_dim: the width of each head (default width / num_heads); a model whose heads do not
    tile the width (a merged parallel-branch block, `vitjax.models.reparam`) sets it.
  Takes a token `mask` (B, N) (tokens dropped by masking are no key of any query).
  """
  scope_name: ClassVar[str] = "MultiHeadDotProductAttention_0"
  accepts_mask: ClassVar[bool] = True
  num_heads: int = 8
  head_dim: int | None = None
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init, head_dim=self.head_dim)  # (B, N, H, d)
    key_mask = None if mask is None else mask[:, None, None, :]
    y = kernels.attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=key_mask, impl=self.attn_impl)
    return out_projection(y, x.shape[-1], kernel_init=self.kernel_init, dropout=self.dropout,
                          train=train)
