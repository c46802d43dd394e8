"""Hyena N-D: gated long 2-D convolutions with implicit filters (Zimerman & Wolf, AISTATS 2024).

Multi-dimensional Hyena ("Multi-Dimensional Hyena for Spatial Inductive Bias") carries the Hyena
operator (Poli et al., ICML 2023) from sequences to image grids. With projections v, x_1..x_N of
the input and implicit filters h_1..h_N, the order-N operator is the recurrence

    z_0 = v,   z_i = x_i * (h_i conv z_{i-1} + d_i * z_{i-1}),   y = z_N

where `conv` is a depthwise *linear* (zero-padded, non-circular, non-causal) 2-D convolution over
the whole grid and d_i a per-channel skip (Hyena's bias term D). A filter lives on the 2-D offsets
o = p - q in [-(h-1), h-1] x [-(w-1), w-1]; it is an MLP of positional features of o, times a
window that decays with |o|, so it is defined for any grid size (no interpolation needed).

The long convolution is computed by FFT on a zero-padded (2h, 2w) grid: offsets o >= 0 sit at
index o, negative offsets wrap to index 2h + o, and the single unused index h (resp. w) keeps
the circular product from aliasing, so it equals the linear convolution exactly. `impl='direct'`
computes the same with `lax.conv_general_dilated` (grouped), faster for small grids on TPU.

The paper's code is not public (supplementary material only), so the filter details follow the
1-D Hyena reference and are choices of this implementation: offsets normalized to [-1, 1] per
axis (so a filter stretches with the grid), features [t, sin(pi f t), cos(pi f t)] per axis, and
a radial window exp(-rate_c |o|) with Hyena's fast-to-slow spread of per-channel rates.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vitjax import choices

LONG_CONV_IMPLS = ("fft", "direct")


def offset_coords(grid: tuple[int, int]):
  """Normalized 2-D offsets of a filter over an (h, w) grid: (2h-1, 2w-1, 2) in [-1, 1]."""
  h, w = grid
  dy = jnp.arange(-(h - 1), h, dtype=jnp.float32) / max(h - 1, 1)
  dx = jnp.arange(-(w - 1), w, dtype=jnp.float32) / max(w - 1, 1)
  yy, xx = jnp.meshgrid(dy, dx, indexing="ij")
  return jnp.stack([yy, xx], axis=-1)


def offset_features(coords, num_bands: int):
  """Positional features [t_y, t_x, sin/cos(pi f t_y), sin/cos(pi f t_x)], f = 1..num_bands.

  Args:
    coords: (..., 2) normalized offsets from `offset_coords`.
    num_bands: number of sinusoid frequencies per axis.

  Returns:
    (..., 2 + 4 * num_bands) features (Hyena's time + sin/cos bands, per axis).
  """
  freqs = jnp.arange(1, num_bands + 1, dtype=jnp.float32) * math.pi  # (F,)
  ang = coords[..., :, None] * freqs                                  # (..., 2, F)
  bands = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)      # (..., 2, 2F)
  return jnp.concatenate([coords, bands.reshape(*coords.shape[:-1], -1)], axis=-1)


def decay_rates(channels: int, *, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                target: float = 1e-2):
  """Per-channel window decay rates spread between a fast and a slow one (Hyena's defaults).

  Channel c decays to `target` at radius between `fast_decay_pct` and `slow_decay_pct`
  (in normalized offset units), so the filters span short to global ranges.
  """
  hi = -math.log(target) / fast_decay_pct
  lo = -math.log(target) / slow_decay_pct
  return jnp.linspace(lo, hi, channels, dtype=jnp.float32)


def exponential_window(coords, rates, shift: float = 0.0):
  """exp(-rate_c * |o|) + shift over the offsets: (2h-1, 2w-1, 2), (C,) -> (2h-1, 2w-1, C)."""
  radius = jnp.sqrt(jnp.sum(coords * coords, axis=-1, keepdims=True))
  return jnp.exp(-radius * rates) + shift


def _check_filter(u, k):
  b, h, w, c = u.shape
  if k.shape != (2 * h - 1, 2 * w - 1, c):
    raise ValueError(
        f"long-conv filter shape {k.shape} does not match input grid {(h, w)} with {c} "
        f"channels; expected {(2 * h - 1, 2 * w - 1, c)}")


def long_conv2d_fft(u, k):
  """Depthwise linear 2-D convolution y[p] = sum_q k[p - q] u[q] by zero-padded FFT.

  Args:
    u: (B, h, w, C) input.
    k: (2h-1, 2w-1, C) filter; k[i, j] is the weight of offset (i - (h-1), j - (w-1)).

  Returns:
    (B, h, w, C) in u's dtype (the FFTs run in float32).
  """
  _check_filter(u, k)
  _, h, w, _ = u.shape
  ph, pw = 2 * h, 2 * w
  kf = k.astype(jnp.float32)
  # Circular layout on the (2h, 2w) grid: offset o -> index o mod (2h, 2w). Roll the centred
  # filter so offset 0 lands at index 0; pad one zero row/column at index h / w first.
  kf = jnp.pad(kf, ((0, 1), (0, 1), (0, 0)))                          # (2h, 2w, C)
  kf = jnp.roll(kf, shift=(-(h - 1), -(w - 1)), axis=(0, 1))
  k_hat = jnp.fft.rfft2(kf, axes=(0, 1))                             # (2h, w+1, C)
  u_hat = jnp.fft.rfft2(u.astype(jnp.float32), s=(ph, pw), axes=(1, 2))  # zero-padded
  y = jnp.fft.irfft2(u_hat * k_hat[None], s=(ph, pw), axes=(1, 2))
  return y[:, :h, :w].astype(u.dtype)


def long_conv2d_direct(u, k):
  """Same as `long_conv2d_fft` with a grouped `lax.conv_general_dilated` (cross-correlation)."""
  _check_filter(u, k)
  _, h, w, c = u.shape
  # Convolution = cross-correlation with the flipped kernel; padding h-1 / w-1 keeps size.
  rhs = jnp.flip(k, axis=(0, 1))[:, :, None, :]                        # (2h-1, 2w-1, 1, C) HWIO
  return jax.lax.conv_general_dilated(
      u, rhs.astype(u.dtype), window_strides=(1, 1), padding=((h - 1, h - 1), (w - 1, w - 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)


def long_conv2d(u, k, *, impl: str = "fft"):
  """Dispatches the depthwise linear long convolution to `impl` in LONG_CONV_IMPLS."""
  if impl == "fft":
    return long_conv2d_fft(u, k)
  if impl == "direct":
    return long_conv2d_direct(u, k)
  raise choices.unknown("long-conv impl", impl, LONG_CONV_IMPLS)


def hyena_recurrence(v, gates, filters, skips, *, impl: str = "fft"):
  """The order-N Hyena recurrence z_i = x_i * (h_i conv z_{i-1} + d_i * z_{i-1}), z_0 = v.

  Args:
    v: (B, h, w, C) value projection.
    gates: (N, B, h, w, C) gate projections x_1..x_N.
    filters: (N, 2h-1, 2w-1, C) long filters h_1..h_N (offset-centred, see `long_conv2d_fft`).
    skips: (N, C) per-channel skip weights d_1..d_N.
    impl: long-convolution implementation, one of LONG_CONV_IMPLS.

  Returns:
    (B, h, w, C) output z_N.
  """
  if not (gates.shape[0] == filters.shape[0] == skips.shape[0]):
    raise ValueError(
        f"order mismatch: {gates.shape[0]} gates, {filters.shape[0]} filters, "
        f"{skips.shape[0]} skips")
  z = v
  for i in range(gates.shape[0]):  # N is small and static: unrolled
    z = gates[i] * (long_conv2d(z, filters[i], impl=impl) + skips[i] * z)
  return z
