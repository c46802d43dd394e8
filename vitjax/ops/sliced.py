"""Sliced group self-attention (Shen, Liu & Xing, 2021, "Sliced Recursive Transformer", SReT).

The N tokens are cut into G contiguous groups of N/G and each group attends only within itself,
which divides the attention cost by G. On SReT's recursive (second) pass the tokens are first
reordered by a permutation pi, so that the groups mix tokens from all over the map, and the
output is put back in the original order:

    y = unpermute(attention within groups(permute(q), permute(k), permute(v)))
    permute(x)[:, j] = x[:, pi[j]],   unpermute(y)[:, pi[j]] = y[:, j]

Equivalently, token a attends to token b iff floor(pos(a) / (N/G)) == floor(pos(b) / (N/G)),
where pos = pi^-1 is each token's place in the permuted order: dense attention with a
block-diagonal mask conjugated by pi (what tests/test_sret.py checks against).

Where the permutation comes from is the caller's choice, always explicit:
  random_permutation(key, n)  - a fresh one from a JAX key (training; the official code draws
                                `torch.randperm(N)` on every recursive pass, one per batch);
  fixed_permutation(n)        - a fixed one (vitjax's deterministic eval, see vitjax.models.sret);
  None                        - no reordering (the first pass, or G = 1 where order is moot).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import kernels


def check_groups(num_tokens: int, num_groups: int, *, where: str = "sliced_group_attn"):
  """One clear error when `num_groups` groups cannot split `num_tokens` tokens evenly."""
  if num_groups < 1 or num_tokens % num_groups:
    allowed = [g for g in range(1, num_tokens + 1) if num_tokens % g == 0]
    raise ValueError(f"{where}: num_groups={num_groups} does not divide the {num_tokens} tokens; "
                     f"allowed group counts: {', '.join(map(str, allowed))}")


def fixed_permutation(n: int, seed: int = 0) -> np.ndarray:
  """A fixed permutation of range(n): numpy's legacy `RandomState(seed).permutation(n)`, whose
  stream numpy keeps unchanged across versions (NEP 19), so the same weights always see the
  same groups."""
  return np.random.RandomState(seed).permutation(n).astype(np.int32)


def random_permutation(key, n: int):
  """A uniformly random permutation of range(n) drawn from `key`."""
  return jax.random.permutation(key, n).astype(jnp.int32)


def inverse_permutation(perm):
  """pi^-1: inverse[perm[j]] = j."""
  return jnp.argsort(perm)


def sliced_group_attention(q, k, v, *, num_groups: int, scale, perm=None, impl: str = "xla"):
  """softmax(q k^T * scale) v within each of `num_groups` contiguous groups of the tokens, after
  reordering them by `perm` (and restoring the order of the output).

  Args:
    q, k, v: (B, N, H, d) queries, keys and values (H heads).
    num_groups: G; must divide N (`check_groups`).
    scale: the logit scale (d^-1/2 for standard attention).
    perm: None, or an (N,) integer permutation applied to the tokens of every example.
    impl: the attention kernel for the (B*G, N/G, H, d) groups ('xla', 'pallas', 'cudnn',
      'auto'; `vitjax.kernels.attention`).

  Returns:
    (B, N, H, d), token order as the input's.
  """
  b, n, h, d = q.shape
  check_groups(n, num_groups)
  if perm is not None:
    q, k, v = (jnp.take(t, perm, axis=1) for t in (q, k, v))
  m = n // num_groups
  grouped = lambda t: t.reshape(b * num_groups, m, h, t.shape[-1])  # noqa: E731
  y = kernels.attention(grouped(q), grouped(k), grouped(v), scale=scale, impl=impl)
  y = y.reshape(b, n, h, v.shape[-1])
  if perm is not None:
    y = jnp.take(y, inverse_permutation(perm), axis=1)
  return y
