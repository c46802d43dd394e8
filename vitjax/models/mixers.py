"""Token mixers: (B, N, D) -> (B, N, D), no norm and no residual (the block owns those).

A mixer is a Linen class registered with `@register_mixer(name)`. Its hyperparameters are
dataclass fields. Blocks build it with the fields they share (`num_heads`, `attn_impl`,
`dropout`) filtered to those the class declares, plus the user's `mixer_kwargs`. A mixer that
needs the 2-D token layout sets `needs_grid = True` (a property where a field decides, as
'mhsa' with `local_pe=True`) and then receives `grid=(h, w)` and `num_prefix` (leading non-patch
tokens such as CLS) as keyword arguments.
Family-specific mixers live in their own modules and register themselves the same way.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from vitjax import kernels
from vitjax.models.registry import register_mixer
from vitjax.ops import resformer as resformer_ops


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
  local_pe: ResFormer's local positional embedding (Tian et al., 2023): softmax(QK^T/sqrt(d)) V
    + DWConv3x3(V) before the out projection, the 3x3 depthwise kernel over a head's d channels
    shared by all heads, zeros at prefix tokens (`vitjax.ops.resformer.local_pe`). Parameters
    `local_pe/{kernel (3, 3, 1, d), bias (d,)}`, zero at init (the official init); the mixer
    then needs the token grid. False (the default) adds nothing and no parameters.
  Takes a token `mask` (B, N) (tokens dropped by masking are no key of any query; with local_pe
  their values are also left out of the convolution).
  """
  scope_name: ClassVar[str] = "MultiHeadDotProductAttention_0"
  accepts_mask: ClassVar[bool] = True
  num_heads: int = 8
  head_dim: int | None = None
  qkv_bias: bool = True
  local_pe: bool = False
  attn_impl: str = "xla"
  dropout: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @property
  def needs_grid(self) -> bool:
    """The blocks pass `grid` and `num_prefix` only when the local PE needs them."""
    return bool(self.local_pe)

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None, grid=None, num_prefix: int = 0):
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init, head_dim=self.head_dim)  # (B, N, H, d)
    key_mask = None if mask is None else mask[:, None, None, :]
    y = kernels.attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=key_mask, impl=self.attn_impl)
    if self.local_pe:
      if grid is None:
        raise ValueError("mhsa with local_pe=True needs the token grid (grid=(h, w)); a token "
                         "reducer that gathers or merges tokens leaves none")
      kernel, bias = (p.astype(v.dtype) for p in _LocalPE(name="local_pe")(v.shape[-1]))
      y = y + resformer_ops.local_pe(v, tuple(grid), num_prefix, kernel, bias, mask=mask)
    return out_projection(y, x.shape[-1], kernel_init=self.kernel_init, dropout=self.dropout,
                          train=train)


class _LocalPE(nn.Module):
  """The local PE's depthwise 3x3 kernel (3, 3, 1, d) and bias (d,), zero at init."""

  @nn.compact
  def __call__(self, d: int):
    return (self.param("kernel", nn.initializers.zeros, (3, 3, 1, d)),
            self.param("bias", nn.initializers.zeros, (d,)))
