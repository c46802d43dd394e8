"""FFT and long-convolution token mixers: 'spectral_gating', 'hyena_nd', 'gnconv'.

  spectral_gating - GFNet / SpectFormer (Patro et al., 2023) global filter:
                    irfft2(rfft2(x) * W), W learnable (h, w//2+1, C) complex.
  hyena_nd        - Multi-dimensional Hyena (Zimerman & Wolf, AISTATS 2024): order-N gated
                    2-D long convolutions with implicit (MLP) filters.
  gnconv          - HorNet's recursive gated convolution (Rao et al., NeurIPS 2022), with the
                    depthwise 7x7 ('dwconv') or the global-local filter ('gf') spatial step.

All three need the 2-D token layout (`needs_grid = True`). Prefix tokens (CLS and the like)
have no grid position: they are passed through unchanged, i.e. the mixer is the identity on
them. In a pre-norm residual block the CLS token then never reads the patches, so with these
mixers in every layer pool with 'gap' (or keep some 'mhsa' layers, as SpectFormer does).

Filters tied to a grid ('spectral_gating', 'gnconv' with 'gf') are created for the grid seen at
init (or `filter_size`) and keep that shape; on another grid they are bilinearly interpolated
(align_corners=True, as HorNet's official GF layer does). Hyena's implicit filters are evaluated
on the current grid, so they need no interpolation.
The math is in `vitjax.ops.spectral`, `vitjax.ops.hyena` and `vitjax.ops.gnconv`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from vitjax import choices
from vitjax.models.layers import grid_to_tokens, tokens_to_grid
from vitjax.models.registry import register_mixer
from vitjax.ops import gnconv as gnconv_ops
from vitjax.ops import hyena as hyena_ops
from vitjax.ops import spectral as spectral_ops

GNCONV_VARIANTS = ("dwconv", "gf")
trunc_normal = nn.initializers.truncated_normal


def stored_filter_shape(module: nn.Module, name: str, filter_size, grid) -> tuple[int, int]:
  """Frequency-grid shape of a grid-tied filter parameter.

  An existing parameter keeps the shape it was created with (the filter is then interpolated
  to the current grid); a new one is made for `filter_size`, or for the current grid if None.
  """
  if module.has_variable("params", name):
    return tuple(module.get_variable("params", name).shape[:2])
  size = tuple(filter_size) if filter_size is not None else tuple(grid)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"filter_size must be a pair of positive ints (h, w); got {filter_size!r}")
  return spectral_ops.rfft_grid(size)


@register_mixer("spectral_gating")
class SpectralGating(nn.Module):
  """GFNet / SpectFormer spectral gating: irfft2(rfft2(x, 'ortho') * W, 'ortho') per channel.

  The parameter `complex_weight` is the real view (h_f, w//2+1, C, 2) of W, N(0, init_std)
  as in the official code. Identity on prefix tokens.
  """
  needs_grid: ClassVar[bool] = True
  filter_size: tuple[int, int] | None = None  # spatial grid W is built for; None: init grid
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    prefix, u = tokens_to_grid(x, grid, num_prefix)                    # (B, h, w, C)
    shape = stored_filter_shape(self, "complex_weight", self.filter_size, grid)
    weight = self.param("complex_weight", nn.initializers.normal(self.init_std),
                        (*shape, u.shape[-1], 2), jnp.float32)
    y = spectral_ops.spectral_gating(u, spectral_ops.filter_for_grid(weight, grid))
    return grid_to_tokens(prefix, y)


class DepthwiseConv(nn.Module):
  """'SAME' depthwise k x k convolution on (B, h, w, C); kernel (k, k, C), bias (C,)."""
  kernel_size: int = 7
  use_bias: bool = True
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
    return gnconv_ops.depthwise_conv2d(x, kernel, bias)


class GlobalLocalFilter(nn.Module):
  """HorNet's GF layer: LN -> [DWConv3x3 | global filter] on channel halves -> interleave -> LN."""
  filter_size: tuple[int, int] | None = None
  local_kernel: int = 3
  init_std: float = 0.02
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % 2:
      raise ValueError(f"GlobalLocalFilter needs an even channel count; got {c}")
    x = nn.LayerNorm(epsilon=1e-6, name="pre_norm")(x)
    local, glob = jnp.split(x, 2, axis=-1)                              # (B, h, w, C/2) each
    local = DepthwiseConv(self.local_kernel, use_bias=False, kernel_init=self.kernel_init,
                          name="dw")(local)
    shape = stored_filter_shape(self, "complex_weight", self.filter_size, (h, w))
    weight = self.param("complex_weight", trunc_normal(self.init_std),
                        (*shape, c // 2, 2), jnp.float32)
    glob = spectral_ops.spectral_gating(glob, spectral_ops.filter_for_grid(weight, (h, w)))
    x = gnconv_ops.interleave_channels(local, glob)                     # (B, h, w, C)
    return nn.LayerNorm(epsilon=1e-6, name="post_norm")(x)


def _pointwise_init(kernel_init):
  def init(rng, d_in, d_out):
    return {"kernel": kernel_init(rng, (d_in, d_out), jnp.float32),
            "bias": jnp.zeros((d_out,), jnp.float32)}
  return init


@register_mixer("gnconv")
class GnConv(nn.Module):
  """HorNet's order-n recursive gated convolution (official `gnconv`), identity on prefix tokens.

  proj_in (1x1, C -> 2C) -> split p_0 | q -> q = scale * spatial(q) -> recursion with the
  pointwise `pws_k` -> proj_out (1x1, C -> C). `variant` 'dwconv' is the depthwise
  `kernel_size` conv (HorNet-7x7); 'gf' is the global-local filter (HorNet-GF).
  """
  needs_grid: ClassVar[bool] = True
  order: int = 3
  variant: str = "dwconv"
  kernel_size: int = 7
  scale: float = 1.0 / 3.0
  filter_size: tuple[int, int] | None = None
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    choices.check("variant", self.variant, GNCONV_VARIANTS)
    prefix, u = tokens_to_grid(x, grid, num_prefix)                    # (B, h, w, C)
    c = u.shape[-1]
    dims = gnconv_ops.gnconv_dims(c, self.order)
    dense = lambda n, name: nn.Dense(n, kernel_init=self.kernel_init, name=name)  # noqa: E731
    fused = dense(2 * c, "proj_in")(u)                                  # (B, h, w, 2C)
    p0, q = fused[..., :dims[0]], fused[..., dims[0]:]                  # dims[0], sum(dims)
    if self.variant == "dwconv":
      spatial = DepthwiseConv(self.kernel_size, kernel_init=self.kernel_init, name="dwconv")
    else:
      spatial = GlobalLocalFilter(self.filter_size, kernel_init=self.kernel_init, name="dwconv")
    gates = gnconv_ops.split_channels(spatial(q) * self.scale, dims)
    pws = [self.param(f"pws_{i}", _pointwise_init(self.kernel_init), dims[i], dims[i + 1])
           for i in range(self.order - 1)]
    p = gnconv_ops.recursive_gating(p0, gates, [pw["kernel"] for pw in pws],
                                    [pw["bias"] for pw in pws])          # (B, h, w, C)
    return grid_to_tokens(prefix, dense(c, "proj_out")(p))


@register_mixer("hyena_nd")
class HyenaND(nn.Module):
  """Order-N Hyena on the 2-D grid with implicit filters; identity on prefix tokens.

  in_proj (C -> (N+1)C) + short depthwise conv gives v, x_1..x_N. The filters h_i are an MLP
  (Dense -> sin(freq * .) -> Dense -> sin -> Dense, Hyena's periodic activations) of
  `offset_features`, times an exponential window whose per-channel decay rates span fast to slow
  (fixed, as Hyena's modulation). Long convolutions are linear (zero-padded), `conv_impl` 'fft'
  or 'direct'. out_proj (C -> C) closes the operator.
  """
  needs_grid: ClassVar[bool] = True
  order: int = 2
  filter_width: int = 64
  num_bands: int = 8
  short_kernel: int = 3
  sin_freq: float = 1.0
  window_shift: float = 0.0
  conv_impl: str = "fft"
  dropout: float = 0.0
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    choices.check("conv_impl", self.conv_impl, hyena_ops.LONG_CONV_IMPLS)
    if self.order < 1:
      raise ValueError(f"hyena_nd order must be >= 1; got order={self.order}")
    prefix, u = tokens_to_grid(x, grid, num_prefix)                    # (B, h, w, C)
    b, h, w, c = u.shape
    n = self.order
    proj = nn.Dense((n + 1) * c, kernel_init=self.kernel_init, name="in_proj")(u)
    proj = DepthwiseConv(self.short_kernel, name="short_conv")(proj)   # (B, h, w, (N+1)C)
    proj = proj.reshape(b, h, w, n + 1, c)
    v, gates = proj[..., 0, :], jnp.moveaxis(proj[..., 1:, :], 3, 0)   # (B,h,w,C), (N,B,h,w,C)

    coords = hyena_ops.offset_coords(grid)                              # (2h-1, 2w-1, 2)
    z = hyena_ops.offset_features(coords, self.num_bands)
    for i in range(2):
      z = nn.Dense(self.filter_width, name=f"filter_fc_{i}")(z)
      freq = self.param(f"filter_freq_{i}", nn.initializers.constant(self.sin_freq),
                        (self.filter_width,), jnp.float32)
      z = jnp.sin(freq * z)
    z = nn.Dense(n * c, use_bias=False, name="filter_out")(z)          # (2h-1, 2w-1, N*C)
    z = z * hyena_ops.exponential_window(coords, hyena_ops.decay_rates(n * c),
                                         self.window_shift)
    filters = jnp.moveaxis(z.reshape(*z.shape[:2], n, c), 2, 0)         # (N, 2h-1, 2w-1, C)
    skips = self.param("skip", nn.initializers.normal(1.0), (n, c), jnp.float32)

    y = hyena_ops.hyena_recurrence(v, gates, filters.astype(u.dtype), skips.astype(u.dtype),
                                   impl=self.conv_impl)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(c, kernel_init=self.kernel_init, name="out_proj")(y)
    return grid_to_tokens(prefix, y)
