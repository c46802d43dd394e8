"""Token reducers (`token_reduction=`, `vitjax.models.plugins`): run between blocks on the carry,
returning fewer tokens, or the same tokens with a `mask` of those still in play.

  'random' - the baseline: a uniformly random subset of `keep_ratio` of the patch tokens in
             training (a fresh draw per example), a fixed subset at eval (one seeded draw per
             token count, the same for every example), order kept.

Every reducer keeps the prefix tokens (CLS) in front, unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import plugins


@plugins.register_reducer("random")
class RandomDrop(nn.Module):
  """Keeps ceil(keep_ratio * n) of the n patch tokens, chosen at random (see module docstring)."""
  keep_ratio: float = 1.0
  seed: int = 0

  def __call__(self, tokens, *, train: bool = False):
    b, n = tokens.x.shape[0], tokens.x.shape[1] - tokens.num_prefix
    k = plugins.kept_count(n, self.keep_ratio)
    if k == n:
      return tokens
    if train:
      noise = jax.random.uniform(self.make_rng("dropout"), (b, n))
      index = jnp.sort(jax.lax.top_k(noise, k)[1], axis=-1)
    else:
      fixed = np.sort(np.random.default_rng(self.seed).permutation(n)[:k])
      index = jnp.broadcast_to(jnp.asarray(fixed, jnp.int32), (b, k))
    return plugins.keep_tokens(tokens, index)
