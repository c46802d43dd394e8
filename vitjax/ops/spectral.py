"""Global (spectral) filters: token mixing by a learned elementwise product in 2-D Fourier space.

GFNet (Rao et al., "Global Filter Networks for Image Classification", NeurIPS 2021) and its
successors SpectFormer (Patro et al., 2023, "spectral gating") and HorNet's GF layer
(Rao et al., NeurIPS 2022) mix the tokens of an (h, w) grid with

    SG(x) = irfft2(rfft2(x, norm='ortho') * W, s=(h, w), norm='ortho'),   W in C^{h x (w//2+1) x C}

which is a depthwise *circular* convolution of x with the real kernel irfft2(W) (default norm):
the two 'ortho' factors 1/sqrt(hw) multiply to the 1/(hw) of the standard inverse transform.
An all-ones W is therefore the identity.

The filter's shape is tied to the grid it was created for. On another grid the filter is
bilinearly interpolated over its (frequency-row, frequency-column) axes with the corner
samples held fixed (`align_corners=True`), the rule of HorNet's official GF layer.
Everything here is pure jax.numpy; the Linen wrappers live in `vitjax.models.spectral_mixers`.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp


def rfft_grid(grid: tuple[int, int]) -> tuple[int, int]:
  """Frequency-grid shape of `rfft2` over a spatial (h, w) grid: (h, w // 2 + 1)."""
  h, w = grid
  return h, w // 2 + 1


def linear_interp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D linear interpolation with the end samples aligned.

  Output sample i sits at source position i * (n_in - 1) / (n_out - 1) (0 when n_out == 1),
  i.e. PyTorch's `interpolate(..., align_corners=True)`. Built with numpy: shapes are static.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"interpolation sizes must be positive; got n_in={n_in}, n_out={n_out}")
  pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
  lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float64)
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m


def resize_bilinear(x, size: tuple[int, int]):
  """Bilinear resize of the two leading axes of x (align_corners=True); other axes ride along.

  Args:
    x: (a, b, ...) array, e.g. a filter (h_f, w_f, C) or its real view (h_f, w_f, C, 2).
    size: target (a', b').

  Returns:
    (a', b', ...) array; x itself when the size already matches.
  """
  if tuple(x.shape[:2]) == tuple(size):
    return x
  rows = jnp.asarray(linear_interp_matrix(x.shape[0], size[0]), x.dtype)  # (a', a)
  cols = jnp.asarray(linear_interp_matrix(x.shape[1], size[1]), x.dtype)  # (b', b)
  # Separable: interpolate the rows, then the columns.
  return jnp.einsum("ia,jb,ab...->ij...", rows, cols, x)


def filter_for_grid(weight, grid: tuple[int, int]):
  """Complex filter for a spatial grid from its real parameter view.

  Args:
    weight: (h_f, w_f, C, 2) real array, [..., 0] the real and [..., 1] the imaginary part
      (a real parameter view keeps optimizers and weight decay on real numbers).
    grid: the spatial (h, w) grid the filter will be applied to.

  Returns:
    (h, w // 2 + 1, C) complex64 filter, bilinearly interpolated if the stored size differs.
  """
  if weight.ndim != 4 or weight.shape[-1] != 2:
    raise ValueError(f"filter weight must be (h_f, w_f, C, 2) real; got shape {weight.shape}")
  w = resize_bilinear(weight.astype(jnp.float32), rfft_grid(grid))
  return jax.lax.complex(w[..., 0], w[..., 1])


def spectral_gating(x, filt):
  """irfft2(rfft2(x) * filt) over the grid axes with 'ortho' normalization (GFNet / SpectFormer).

  Args:
    x: (B, h, w, C) real tokens on their grid.
    filt: (h, w // 2 + 1, C) complex filter (see `filter_for_grid`).

  Returns:
    (B, h, w, C) in x's dtype. The transforms run in float32 (FFTs have no bfloat16 path).
  """
  b, h, w, c = x.shape
  if filt.shape != (*rfft_grid((h, w)), c):
    raise ValueError(
        f"filter shape {filt.shape} does not match the grid {(h, w)} with {c} channels; "
        f"expected {(*rfft_grid((h, w)), c)}")
  spec = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")  # (B, h, w//2+1, C)
  y = jnp.fft.irfft2(spec * filt[None], s=(h, w), axes=(1, 2), norm="ortho")  # (B, h, w, C)
  return y.astype(x.dtype)


def spatial_kernel(filt, grid: tuple[int, int]):
  """The real circular-convolution kernel k = irfft2(filt) that `spectral_gating` applies.

  spectral_gating(x, filt)[p] = sum_q k[(p - q) mod (h, w)] * x[q], channel by channel.
  Useful for inspecting learned filters and as a test oracle.
  """
  return jnp.fft.irfft2(filt, s=grid, axes=(0, 1))  # (h, w, C)
