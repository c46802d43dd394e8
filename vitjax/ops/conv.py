"""Depthwise convolutions, the pure-jnp forms every family shares (CvT's projections, ConvNeXt's
and HorNet's 7x7 mixing, LePE / LCE of the window models).

  conv_output_size      - floor((n + 2p - k) / s) + 1, PyTorch's Conv2d output side.
  depthwise_conv2d      - strided, zero-padded depthwise convolution as k*k shifted slices.
  depthwise_conv_same   - stride-1 'same' depthwise convolution plus bias, with an `impl` switch:
                          'shift' (the slices; fastest on XLA:CPU), 'xla' (grouped convolution;
                          cuDNN on GPU) or 'auto' (the first on CPU, the second elsewhere).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax import choices


def conv_output_size(n: int, kernel_size: int, stride: int, padding: int) -> int:
  """Output side of a convolution over `n` positions: floor((n + 2p - k) / s) + 1."""
  return (n + 2 * padding - kernel_size) // stride + 1


def depthwise_conv2d(x, kernel, *, stride: int = 1, padding: int = 0):
  """Depthwise 2-D convolution (cross-correlation, as PyTorch's Conv2d with groups=C, no bias).

  out[b, i, j, c] = sum_{di, dj} xpad[b, s*i + di, s*j + dj, c] * kernel[di, dj, 0, c], written
  as k*k strided slices of the padded map, each scaled per channel and summed. XLA fuses the
  slices into one loop; on CPU that ran 1.2-8x faster (forward + backward, CvT shapes, stride 2
  gaining most) than `lax.conv_general_dilated(feature_group_count=C)`, whose grouped
  convolution takes a generic path there. tests/test_cvt.py checks both against an einsum.

  Args:
    x: (B, H, W, C) map.
    kernel: (k, k, 1, C), Flax's depthwise `nn.Conv` layout (torch stores it as (C, 1, k, k)).
    stride: the same stride along both axes.
    padding: zeros added on every side of both axes.

  Returns:
    (B, H', W', C) with H' = conv_output_size(H, k, stride, padding), likewise W'.
  """
  c = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2:] != (1, c):
    raise ValueError(f"depthwise kernel must have shape (k, k, 1, {c}) for {c} channels; "
                     f"got {kernel.shape}")
  k = kernel.shape[0]
  ho, wo = (conv_output_size(n, k, stride, padding) for n in x.shape[1:3])
  if ho < 1 or wo < 1:
    raise ValueError(f"depthwise conv: a {x.shape[1]}x{x.shape[2]} map with kernel {k}, stride "
                     f"{stride} and padding {padding} has no output positions")
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kernel = kernel.astype(x.dtype)
  out = None
  for di in range(k):
    for dj in range(k):
      window = jax.lax.slice(xp, (0, di, dj, 0),
                             (xp.shape[0], di + stride * (ho - 1) + 1,
                              dj + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
      term = window * kernel[di, dj, 0]
      out = term if out is None else out + term
  return out


DWCONV_IMPLS = ("auto", "shift", "xla")


def depthwise_conv_same(x, kernel, bias=None, *, impl: str = "auto"):
  """Stride-1 zero-padded ('same') depthwise convolution of a (B, H, W, C) map, plus bias.

  kernel: (k, k, 1, C), Flax's depthwise layout (k odd); out[b, y, x, c] = bias[c] +
  sum_{i, j} in[b, y + i - k//2, x + j - k//2, c] * kernel[i, j, 0, c].
  Taps that only ever meet the zero padding (on a map smaller than the kernel: a 7x7 kernel on a
  2x2 map uses its central 3x3) are dropped first; they add nothing.

  impl: 'xla' is `lax.conv_general_dilated` with one group per channel (cuDNN on GPU); 'shift' is
    `depthwise_conv2d`, k*k shifted slices that XLA fuses into one
    loop. On CPU 'shift' made a convnext_atto training step (32 px, batch 128, 2 cores)
    1.8-2.6x faster than XLA:CPU's grouped convolution, whose forward alone was 5-50x slower on
    2x2 to 16x16 maps; it compiles slower (k*k slices per block). 'auto' is 'shift' on CPU and
    'xla' elsewhere.
  """
  choices.check("dwconv_impl", impl, DWCONV_IMPLS)
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "xla"
  k = kernel.shape[0]
  r = min(k // 2, max(x.shape[1], x.shape[2]) - 1)             # reach that can touch the map
  kernel = kernel[k // 2 - r:k // 2 + r + 1, k // 2 - r:k // 2 + r + 1].astype(x.dtype)
  if impl == "xla":
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((r, r), (r, r)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=x.shape[-1])
  else:
    y = depthwise_conv2d(x, kernel, padding=r)
  return y if bias is None else y + bias
