"""Token reducers (`token_reduction=`, `vitjax.models.plugins`): run between blocks on the carry,
returning fewer tokens, or the same tokens with a `mask` of those still in play.

  'random' - the baseline: a uniformly random subset of `keep_ratio` of the patch tokens in
             training (a fresh draw per example), a fixed subset at eval (one seeded draw per
             token count, the same for every example), order kept.
  'ltm'    - Learnable Token Merging (Wang & Yang): a mask module maps the N patch tokens to a
             merging matrix M (N x N', columns summing to 1) and the carry becomes X' = M^T X,
             N' = ceil(keep_ratio * N). In training it sows its information-bottleneck term
             into 'aux_loss'.
  'iared2' - IA-RED² (Pan, Panda et al.): a multi-head interpreter gives each patch token a
             keep-probability pi; training drops by masking with a sampled Bernoulli(pi) policy
             and sows what REINFORCE needs into 'policy'; eval keeps the top
             ceil(keep_ratio * N) tokens by pi and masks those among them with pi < threshold.

Every reducer keeps the prefix tokens (CLS) in front, unchanged. The math is in
`vitjax.ops.token_reduction`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import plugins
from vitjax.ops import token_reduction as ops


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


def _patch_mask(tokens):
  """(B, N) bool: which patch tokens are in play (all when the carry has no mask)."""
  b, n = tokens.x.shape[0], tokens.x.shape[1] - tokens.num_prefix
  if tokens.mask is None:
    return jnp.ones((b, n), bool)
  return tokens.mask[:, tokens.num_prefix:]


def _with_prefix_mask(tokens, patch_mask):
  """The (B, P + N') mask: the prefix tokens' entries (True without a mask) then `patch_mask`."""
  p = tokens.num_prefix
  prefix = (jnp.ones((patch_mask.shape[0], p), bool) if tokens.mask is None
            else tokens.mask[:, :p])
  return jnp.concatenate([prefix, patch_mask], axis=1)


@plugins.register_reducer("ltm")
class LearnableTokenMerging(nn.Module):
  """X' = M^T X over the patch tokens, M = softmax over the N input tokens of LN(X) W_M + b_M.

  The mask module is our choice (the LTM repository holds no merging module, and the paper's
  mask-module equations were not at hand to follow): a LayerNorm and one Dense layer `merge` from each token to N' logits, one
  per merged token, normalised over the input tokens, so that column a of M holds the weights of
  merged token a (a PatchMerger-style learned query per merged token). Its parameters depend on
  N', so the model is tied to the token count it was initialised with. Tokens out of play (a
  mask) get weight 0; every merged token is in play.

  Information bottleneck: in training it sows ib_weight * (mean over images of I(I; A)) as
  'aux_loss'/'ltm_ib', where I is an input token (uniform over those in play) and A the merged
  token it goes to, p(a | i) = M_ia / sum_a' M_ia' (`ops.assignment_information`): the
  compression term of an IB over the soft clustering M defines. The relevance term -I(X'; Y)
  needs the labels, which a reducer does not see; the classifier's cross-entropy (a variational
  bound on it) plays that part. ib_weight's default, 0.1, is the repository's `--ib-weight`. The
  repository's own bound (`ops.ib_bound`) is a network-level loss over k-means clusters of the
  images and of the final features, and the labels: a runner's job, not a reducer's
  (`config.ib`, vitjax/train_plugins.py).
  """
  keep_ratio: float = 1.0
  ib_weight: float = 0.1

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    if not self.ib_weight >= 0:
      raise ValueError(f"reduction_kwargs.ib_weight={self.ib_weight!r}: allowed values are >= 0")
    p = tokens.num_prefix
    x = tokens.x[:, p:]
    valid = _patch_mask(tokens)
    k = plugins.kept_count(x.shape[1], self.keep_ratio)
    logits = nn.Dense(k, name="merge")(nn.LayerNorm(name="norm")(x))      # (B, N, N')
    m = ops.merge_matrix(logits, valid)
    if train and self.ib_weight and not self.is_initializing():
      ib = jnp.mean(ops.assignment_information(m, valid))
      self.sow("aux_loss", "ltm_ib", self.ib_weight * ib)
    merged = ops.merge_tokens(x, m).astype(x.dtype)
    return tokens.replace(x=jnp.concatenate([tokens.x[:, :p], merged], axis=1), grid=None,
                          mask=None)


@plugins.register_reducer("iared2")
class MultiHeadInterpreter(nn.Module):
  """IA-RED²'s multi-head interpreter: pi_i = sigmoid(mean_h q_h . k_ih / sqrt(d) + b).

  The query of each head comes from the CLS token (the first prefix token) or, without one, from
  the mean of the patch tokens in play; the keys from each patch token; both after a LayerNorm
  (`num_heads` heads of width `head_dim`; our choice of sizes, the paper has no code).

  Training: samples a_i ~ Bernoulli(pi_i) (rng 'dropout') and drops by masking: the carry's mask
  becomes (mask AND a); tokens stay in place. It sows into the collection 'policy'
    'log_prob' (B,): sum over the patch tokens in play before it of log pi_i (kept) or
                     log(1 - pi_i) (dropped), the REINFORCE score of the sampled policy;
    'kept'     (B,): patch tokens in play after it / patch tokens entering it (in training
                     every interpreter sees all N, so the last one's is the fraction left).
  Its input is under stop_gradient and the mask is not differentiable, so the interpreter is
  trained by REINFORCE on 'log_prob' only, the backbone by the classification loss only.

  Eval (static shapes, bucketed): keeps the k = ceil(keep_ratio * N) patch tokens of highest pi
  (keep_ratio is the bucket, the budget), gathered in token order, and masks those among them
  with pi < `threshold`, except the best one of each image. It sows 'kept' as in training.
  """
  keep_ratio: float = 1.0
  threshold: float = 0.5
  num_heads: int = 4
  head_dim: int = 16

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"reduction_kwargs.threshold={self.threshold!r}: allowed values are in "
                       "(0, 1)")
    p = tokens.num_prefix
    n = tokens.x.shape[1] - p
    valid = _patch_mask(tokens)
    y = nn.LayerNorm(name="norm")(jax.lax.stop_gradient(tokens.x))
    context = y[:, 0] if p else plugins.masked_mean(y, valid)
    dense = lambda name: nn.DenseGeneral((self.num_heads, self.head_dim), name=name)
    s = ops.interpreter_logits(dense("query")(context), dense("key")(y[:, p:]))
    s = s + self.param("bias", nn.initializers.zeros, (), s.dtype)         # (B, N)
    pi = jax.nn.sigmoid(s)
    if train:
      action = jax.random.uniform(self.make_rng("dropout"), pi.shape) < pi
      kept = valid & action
      if not self.is_initializing():
        self.sow("policy", "log_prob", ops.bernoulli_log_prob(s, action, valid))
        self.sow("policy", "kept", jnp.sum(kept, axis=1) / n)
      return tokens.replace(mask=_with_prefix_mask(tokens, kept))
    k = plugins.kept_count(n, self.keep_ratio)
    index, keep = ops.bucketed_top_k(pi, k, self.threshold, valid)
    if not self.is_initializing():   # init would store it among the variables
      self.sow("policy", "kept", jnp.sum(keep, axis=1) / n)
    gathered = plugins.keep_tokens(tokens, index)
    return gathered.replace(mask=_with_prefix_mask(tokens, keep))
