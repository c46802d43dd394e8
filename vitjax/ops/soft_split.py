"""Soft split (Yuan et al., ICCV 2021, "Tokens-to-Token ViT"): overlapping k x k patches of a map,
each flattened into one token, i.e. PyTorch's `nn.Unfold` on an NHWC map.

    T' = SoftSplit_{k, s, p}(I):  I (B, H, W, C)  ->  T' (B, H', W', C * k * k),
    H' = floor((H + 2p - k) / s) + 1 (W' alike),
    T'[b, y, x, c * k * k + i * k + j] = I_pad[b, s y + i, s x + j, c]

with I_pad the map zero-padded by p on each side. The feature order (channel-major, then the
kernel row i, then the column j) is `nn.Unfold`'s, so a Linear layer trained on unfolded PyTorch
tokens applies to these unchanged. Patches overlap when k > s: neighbouring tokens share
k - s rows/columns of pixels, which is what distinguishes the soft split from ViT's hard split.

Written as k * k strided slices of the padded map (one per kernel tap), stacked on a new last
axis: plain slicing, whose gradient is a scatter-add, with no convolution involved.
"""
from __future__ import annotations

import jax.numpy as jnp


def soft_split_size(n: int, kernel: int, stride: int, padding: int) -> int:
  """Output side H' = floor((H + 2p - k) / s) + 1 of a soft split of side `n`."""
  return (n + 2 * padding - kernel) // stride + 1


def soft_split(x, kernel: int, stride: int, padding: int):
  """(B, H, W, C) -> (B, H', W', C * kernel**2), features in `nn.Unfold`'s (C, i, j) order.

  Raises:
    ValueError: if the padded map is smaller than one kernel.
  """
  b, h, w, c = x.shape
  out_h, out_w = (soft_split_size(n, kernel, stride, padding) for n in (h, w))
  if out_h < 1 or out_w < 1:
    raise ValueError(f"soft_split: a {h}x{w} map padded by {padding} is smaller than the "
                     f"kernel {kernel}; allowed inputs have sides >= {kernel - 2 * padding}")
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = []
  for i in range(kernel):            # kernel row
    for j in range(kernel):          # kernel column
      taps.append(xp[:, i:i + stride * (out_h - 1) + 1:stride,
                     j:j + stride * (out_w - 1) + 1:stride, :])    # (B, H', W', C)
  patches = jnp.stack(taps, axis=-1)                               # (B, H', W', C, k*k)
  return patches.reshape(b, out_h, out_w, c * kernel * kernel)
