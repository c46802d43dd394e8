"""Recursive gated convolution gnConv (Rao et al., "HorNet: Efficient High-Order Spatial
Interactions with Recursive Gated Convolutions", NeurIPS 2022).

Order-n gnConv on a C-channel map, with channel widths dims = [C/2^(n-1), ..., C/2, C]:

    [p_0, q] = proj_in(x)                 p_0: dims[0] channels, q: sum(dims) channels
    q        = s * f(q)                   f: depthwise 7x7 conv, or the GF layer (below)
    q_0..q_{n-1} = split(q, dims)
    p_1      = p_0 * q_0
    p_{k+1}  = g_k(p_k) * q_k             g_k: 1x1 conv dims[k-1] -> dims[k], k = 1..n-1
    y        = proj_out(p_n)

Each step doubles the width and adds one more order of spatial interaction. The GF layer
("global-local filter") normalizes, sends the first half of the channels through a depthwise
3x3 conv and the second half through a global Fourier filter (`vitjax.ops.spectral`), then
*interleaves* the halves channel by channel (out[2i] = local[i], out[2i+1] = global[i]) and
normalizes again; the interleave is what the official code does and it decides which channels
of each q_k are local and which are global.
This file holds the parameter-free math; `vitjax.models.spectral_mixers.GnConv` owns weights.
"""
from __future__ import annotations

import jax.numpy as jnp

from vitjax.ops import conv as conv_ops


def gnconv_dims(dim: int, order: int) -> list[int]:
  """Channel widths [dim / 2^(order-1), ..., dim / 2, dim] of an order-`order` gnConv."""
  if order < 1:
    raise ValueError(f"gnconv order must be >= 1; got order={order}")
  if dim % (2 ** (order - 1)):
    raise ValueError(
        f"gnconv width {dim} must be divisible by 2^(order-1) = {2 ** (order - 1)} "
        f"(order={order})")
  return [dim // 2 ** i for i in range(order - 1, -1, -1)]


def split_channels(x, sizes):
  """Splits the last axis of x into consecutive pieces of the given sizes."""
  bounds, acc = [], 0
  for s in sizes[:-1]:
    acc += s
    bounds.append(acc)
  return jnp.split(x, bounds, axis=-1)


def recursive_gating(p0, gates, pw_kernels, pw_biases):
  """p_1 = p_0 * q_0, p_{k+1} = (p_k W_k + b_k) * q_k: the gnConv recursion.

  Args:
    p0: (..., dims[0]) the un-convolved half of proj_in's output.
    gates: list of n arrays (..., dims[k]), the spatially mixed and scaled q_k.
    pw_kernels: list of n-1 (dims[k-1], dims[k]) 1x1-conv kernels.
    pw_biases: list of n-1 (dims[k],) biases.

  Returns:
    (..., dims[-1]) p_n, ready for proj_out.
  """
  if not (len(gates) == len(pw_kernels) + 1 == len(pw_biases) + 1):
    raise ValueError(
        f"gnconv of order {len(gates)} needs {len(gates) - 1} pointwise kernels and biases; "
        f"got {len(pw_kernels)} and {len(pw_biases)}")
  p = p0 * gates[0]
  for kernel, bias, q in zip(pw_kernels, pw_biases, gates[1:]):
    p = (jnp.einsum("...i,io->...o", p, kernel) + bias) * q
  return p


def depthwise_conv2d(x, kernel, bias=None, *, impl: str = "auto"):
  """'SAME' depthwise convolution (cross-correlation, as in every deep-learning framework).

  Args:
    x: (B, h, w, C).
    kernel: (k_h, k_w, C) one filter per channel (odd sizes).
    bias: optional (C,).
    impl: `vitjax.ops.conv.depthwise_conv_same`'s ('auto': shifted slices on CPU, XLA's grouped
      convolution elsewhere).
  """
  return conv_ops.depthwise_conv_same(x, kernel[:, :, None, :], bias, impl=impl)


def interleave_channels(a, b):
  """(..., C), (..., C) -> (..., 2C) with out[..., 2i] = a[..., i], out[..., 2i + 1] = b[..., i]."""
  if a.shape != b.shape:
    raise ValueError(f"interleaved halves must match; got {a.shape} and {b.shape}")
  return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
