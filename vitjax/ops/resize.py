"""Parameter-free bilinear resizing of 2-D token maps, as explicit interpolation matrices.

LookupViT (Koner et al., "LookupViT: Compressing visual information to a limited number of
tokens", ECCV 2024, arXiv:2407.12753) builds its few compressed tokens by resizing the
position-augmented patch map (the lookup tokens) to a small grid, and resizes its learned
position table when the lookup grid changes. Both are fixed linear maps, written here as one
(out, in) matrix per spatial axis so that the sampling convention is visible and testable:

  * sample centres are half-pixel: output index o sits at input coordinate
    c(o) = (o + 1/2) * in / out - 1/2 (PyTorch `align_corners=False`, TF2, `jax.image`);
  * weights come from a triangle kernel of half-width s around c(o), restricted to the
    input and renormalised to sum to one (this reproduces edge clamping when upsampling);
  * 'bilinear'    : s = 1, a 2x2 blend per output (PyTorch / TF default, no anti-aliasing);
  * 'bilinear_aa' : s = max(in / out, 1), the kernel widens when downsampling so every input
    contributes (what `jax.image.resize(..., 'bilinear')` does by default).

Resizing to the same size is the identity for both methods, and the map is linear, so
resize(x + pos) = resize(x) + resize(pos).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import choices

METHODS = ("bilinear", "bilinear_aa")


def check_method(method: str, *, field: str = "compress_resize") -> None:
  choices.check(field, method, METHODS)


@functools.lru_cache(maxsize=256)
def _matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  ratio = in_size / out_size
  half_width = max(ratio, 1.0) if antialias else 1.0
  centres = (np.arange(out_size) + 0.5) * ratio - 0.5               # (out,)
  dist = np.abs(np.arange(in_size)[None, :] - centres[:, None])     # (out, in)
  w = np.maximum(0.0, 1.0 - dist / half_width)
  w /= w.sum(axis=1, keepdims=True)
  w.setflags(write=False)
  return w


def interpolation_matrix(in_size: int, out_size: int, method: str = "bilinear") -> np.ndarray:
  """(out_size, in_size) float64 matrix whose rows are the 1-D resampling weights (sum 1)."""
  check_method(method, field="method")
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
  return _matrix(int(in_size), int(out_size), method == "bilinear_aa")


def resize_2d(x, out_hw: tuple[int, int], method: str = "bilinear"):
  """Resizes a (..., h, w, D) map to (..., out_h, out_w, D) with separable interpolation.

  Args:
    x: (..., h, w, D) token map (any leading batch axes).
    out_hw: static output grid (out_h, out_w).
    method: 'bilinear' or 'bilinear_aa' (see the module docstring).

  Returns:
    (..., out_h, out_w, D) array of x's dtype.
  """
  h, w = x.shape[-3:-1]
  a_h = jnp.asarray(interpolation_matrix(h, out_hw[0], method), x.dtype)  # (p, h)
  a_w = jnp.asarray(interpolation_matrix(w, out_hw[1], method), x.dtype)  # (q, w)
  # HIGHEST keeps the identity exact and linearity at float32 rounding on GPU/TPU too,
  # whose default f32 matmul precision is lower; the matrices are tiny, so it costs nothing.
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("ph,...hwd->...pwd", a_h, x, precision=hi)
  return jnp.einsum("qw,...pwd->...pqd", a_w, y, precision=hi)
