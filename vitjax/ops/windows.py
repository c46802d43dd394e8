"""Attention inside rectangular windows of a 2-D token map: Swin's (shifted) windows and CSWin's
stripes.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (ICCV
2021); Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
Windows" (CVPR 2022).

A window is (wh, ww) tokens of an (H, W) map: a square (7, 7) for Swin, a stripe (sw, W) or
(H, sw) for CSWin. Windows tile the map in row-major order; inside a window tokens are
row-major too (the order of timm's and the official `window_partition`).

  window_partition / window_reverse  (B, H, W, ...) <-> (B, nW, wh*ww, ...)
  fit_window                         Swin's rule for a window larger than the map (clip, no shift)
  pad_to_windows / padding_mask      zero-pad H, W up to multiples of the window; which padded
                                     positions are real tokens
  cyclic_shift                       roll the map by -shift (Swin's SW-MSA); undo with -shift
  shift_region_labels /              Swin's 3x3 regions of the rolled map, and the (nW, T, T)
  shifted_window_mask                same-region mask that keeps wrapped tokens apart
  relative_position_index /          Swin's (2wh-1)(2ww-1) table of per-head biases B and the
  relative_position_bias             (T, T) index that gathers it into B[h, i, j]
  window_attention                   softmax(q k^T * scale + B) v inside each window, with the
                                     padding and shift masks
  window_depthwise_conv              a depthwise k x k convolution applied separately inside each
                                     window (CSWin's LePE, `get_lepe`: zero padding at window
                                     borders), `ops.conv.depthwise_conv_same` on the windows

Masks are boolean, True where a query may attend a key. The masks and indices are numpy
constants (they depend on static shapes only), everything else is jnp.

Padding: when H or W is not a multiple of the window, the map is zero-padded at the bottom and
right (then shifted, when shifted), and padded positions are never attended: they are masked as
keys, and their query rows are cropped away. (timm pads after the shift and lets real tokens
attend to the padded zeros; the results differ only on such maps.)
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from vitjax.ops import attention, conv

Pair = tuple[int, int]


def _pair(x) -> Pair:
  if isinstance(x, (int, np.integer)):
    return int(x), int(x)
  a, b = x
  return int(a), int(b)


def _xp(x):
  """numpy for numpy inputs (the static masks stay constants under jit), else jax.numpy."""
  return np if isinstance(x, np.ndarray) else jnp


def _check_tiles(grid: Pair, window: Pair):
  if grid[0] % window[0] or grid[1] % window[1]:
    raise ValueError(f"windows of {window[0]}x{window[1]} do not tile a {grid[0]}x{grid[1]} map "
                     "(pad it first: pad_to_windows)")


def window_partition(x, window):
  """(B, H, W, *rest) -> (B, nW, wh*ww, *rest): windows in row-major order, tokens row-major
  inside each window. H and W must be multiples of the window."""
  wh, ww = _pair(window)
  b, h, w = x.shape[:3]
  rest = x.shape[3:]
  _check_tiles((h, w), (wh, ww))
  x = x.reshape(b, h // wh, wh, w // ww, ww, *rest)
  x = _xp(x).moveaxis(x, 3, 2)                                # (B, nh, nw, wh, ww, *rest)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, *rest)


def window_reverse(windows, window, grid):
  """(B, nW, wh*ww, *rest) -> (B, H, W, *rest); the inverse of `window_partition`."""
  wh, ww = _pair(window)
  h, w = _pair(grid)
  _check_tiles((h, w), (wh, ww))
  b, rest = windows.shape[0], windows.shape[3:]
  x = windows.reshape(b, h // wh, w // ww, wh, ww, *rest)
  x = _xp(x).moveaxis(x, 2, 3)                                # (B, nh, wh, nw, ww, *rest)
  return x.reshape(b, h, w, *rest)


def fit_window(grid, window, shift=0) -> tuple[Pair, Pair]:
  """Swin's (timm's) rule per axis: a window at least as large as the map becomes the map and
  is not shifted. Returns (window, shift)."""
  grid, window, shift = _pair(grid), _pair(window), _pair(shift)
  win = tuple(min(g, w) for g, w in zip(grid, window))
  sh = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
  return win, sh


def padded_size(grid, window) -> Pair:
  """(H, W) rounded up to multiples of the window."""
  (h, w), (wh, ww) = _pair(grid), _pair(window)
  return -(-h // wh) * wh, -(-w // ww) * ww


def pad_to_windows(x, window):
  """Zero-pads a (B, H, W, *rest) map at the bottom and right to multiples of the window."""
  h, w = x.shape[1:3]
  hp, wp = padded_size((h, w), window)
  if (hp, wp) == (h, w):
    return x
  pads = [(0, 0), (0, hp - h), (0, wp - w)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pads)


def cyclic_shift(x, shift):
  """Rolls a (B, H, W, ...) map up and left by `shift` (Swin's cyclic shift); `-shift` undoes it."""
  sh, sw = _pair(shift)
  if (sh, sw) == (0, 0):
    return x
  return jnp.roll(x, (-sh, -sw), axis=(1, 2))


def padding_mask(grid, window, shift=0) -> np.ndarray:
  """(nW, T) bool: True where a window position holds a real token of the (H, W) map, after
  padding to windows and the cyclic shift."""
  grid = _pair(grid)
  hp, wp = padded_size(grid, window)
  real = np.zeros((1, hp, wp), bool)
  real[:, :grid[0], :grid[1]] = True
  real = np.roll(real, tuple(-s for s in _pair(shift)), axis=(1, 2))
  return window_partition(real, window)[0]


def shift_region_labels(grid, window, shift) -> np.ndarray:
  """(H, W) int: Swin's region of each position of the rolled map. Rows (and columns) split at
  H - wh and H - shift into three bands; the last band holds the rows that wrapped around."""
  (h, w), (wh, ww), (sh, sw) = _pair(grid), _pair(window), _pair(shift)
  labels = np.zeros((h, w), np.int32)
  rows = [(0, h - wh), (h - wh, h - sh), (h - sh, h)] if sh else [(0, h)]
  cols = [(0, w - ww), (w - ww, w - sw), (w - sw, w)] if sw else [(0, w)]
  n = 0
  for r0, r1 in rows:
    for c0, c1 in cols:
      labels[r0:r1, c0:c1] = n
      n += 1
  return labels


def shifted_window_mask(grid, window, shift) -> np.ndarray:
  """(nW, T, T) bool: True where query i and key j of a window lie in the same region of the
  rolled (H, W) map (H, W multiples of the window), so tokens that wrapped around the border
  only attend to each other."""
  labels = shift_region_labels(grid, window, shift)[None]
  windows = window_partition(labels, window)[0]                     # (nW, T)
  return windows[:, :, None] == windows[:, None, :]


def window_mask(grid, window, shift=0) -> np.ndarray | None:
  """(nW, T, T) bool mask of `window_attention` on an (H, W) map: same shift region and a real
  (unpadded) key. None when nothing is masked."""
  grid, shift = _pair(grid), _pair(shift)
  padded = padded_size(grid, window)
  mask = None
  if any(shift):
    mask = shifted_window_mask(padded, window, shift)
  if padded != grid:
    keys = padding_mask(grid, window, shift)[:, None, :]          # (nW, 1, T)
    mask = keys if mask is None else mask & keys
    mask = np.broadcast_to(mask, (mask.shape[0], mask.shape[2], mask.shape[2]))
  return mask


def relative_position_index(window) -> np.ndarray:
  """(T, T) int32: the row of the (2wh-1)(2ww-1) bias table for query i and key j of a window,
  (y_i - y_j + wh - 1) * (2ww - 1) + (x_i - x_j + ww - 1)."""
  wh, ww = _pair(window)
  ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + wh - 1
  dx = xs[:, None] - xs[None, :] + ww - 1
  return (dy * (2 * ww - 1) + dx).astype(np.int32)


def relative_position_bias(table, window):
  """Bias table ((2wh-1)(2ww-1), heads) -> (heads, T, T) logits bias B[h, i, j]."""
  wh, ww = _pair(window)
  if table.shape[0] != (2 * wh - 1) * (2 * ww - 1):
    raise ValueError(f"a relative position table for {wh}x{ww} windows has "
                     f"{(2 * wh - 1) * (2 * ww - 1)} rows; got {table.shape[0]}")
  index = relative_position_index((wh, ww))
  return jnp.moveaxis(table[index], -1, 0)


def window_attention(q, k, v, *, window, shift=0, scale, bias=None):
  """softmax(q k^T * scale + bias) v inside each window of a (B, H, W) token map.

  Args:
    q, k, v: (B, H, W, heads, d) queries, keys, values on the map.
    window: (wh, ww) window (or an int for a square one); H and W need not be multiples of it
      (the map is padded; padded positions are never attended).
    shift: Swin's cyclic shift (sh, sw) (0 = plain windows), each below the window.
    scale: the logit scale (1/sqrt(d) for standard attention).
    bias: optional (heads, T, T) logits bias shared by every window (T = wh*ww), e.g.
      `relative_position_bias`.

  Returns:
    (B, H, W, heads, d).
  """
  window, shift = _pair(window), _pair(shift)
  if any(not 0 <= s < w for s, w in zip(shift, window)):
    raise ValueError(f"shift={shift}: allowed values are 0 <= shift < window={window}")
  b, h, w, heads, d = q.shape
  mask = window_mask((h, w), window, shift)
  hp, wp = padded_size((h, w), window)

  def windows(x):                                             # -> (B*nW, T, heads, d)
    x = window_partition(cyclic_shift(pad_to_windows(x, window), shift), window)
    return x.reshape(-1, *x.shape[2:])

  qw, kw, vw = windows(q), windows(k), windows(v)
  logits = attention.attention_logits(qw, kw, scale)          # (B*nW, heads, T, T)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    nw, t = mask.shape[0], mask.shape[-1]
    logits = logits.reshape(b, nw, heads, t, t)
    logits = jnp.where(mask[None, :, None], logits, jnp.finfo(logits.dtype).min)
    logits = logits.reshape(b * nw, heads, t, t)
  out = attention.softmax_weighted_sum(logits, jnp.swapaxes(vw, 1, 2))   # (B*nW, heads, T, d)
  out = jnp.swapaxes(out, 1, 2).reshape(b, -1, out.shape[2], heads, out.shape[-1])
  out = cyclic_shift(window_reverse(out, window, (hp, wp)), tuple(-s for s in shift))
  return out[:, :h, :w]


def window_depthwise_conv(x, kernel, bias=None, *, window, impl: str = "auto"):
  """A stride-1 depthwise k x k convolution applied separately inside each window of a
  (B, H, W, C) map, zero-padded at every window border (CSWin's LePE on V, official
  `get_lepe`). H and W must be multiples of the window.

  kernel: (k, k, 1, C) (Flax's depthwise layout), k odd; bias: (C,) or None.
  out[y, x, c] = bias[c] + sum_{i, j} in[y + i - k//2, x + j - k//2, c] * kernel[i, j, 0, c],
  with `in` zero outside the window of (y, x): `vitjax.ops.conv.depthwise_conv_same` (and its
  `impl` switch) over the windows stacked along the batch axis.
  """
  b, h, w, c = x.shape
  wh, ww = _pair(window)
  xw = window_partition(x, (wh, ww)).reshape(-1, wh, ww, c)     # (B*nW, wh, ww, C)
  y = conv.depthwise_conv_same(xw, kernel, bias, impl=impl)
  return window_reverse(y.reshape(b, -1, wh * ww, c), (wh, ww), (h, w))


def stripe_windows(grid, stripe: int) -> Sequence[Pair]:
  """CSWin's two stripe windows on an (H, W) map: vertical (H, sw) and horizontal (sw, W),
  the stripe width clipped to the map (a stripe as wide as the map is the whole map)."""
  h, w = _pair(grid)
  return (h, min(stripe, w)), (min(stripe, h), w)
