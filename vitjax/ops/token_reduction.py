"""Token reduction between blocks in pure jnp: learned merging (LTM) and interpreter-driven
dropping (IA-RED²), plus the information-bottleneck bound of the LTM repository.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging" (2024; TPAMI 2025);
Pan, Panda et al., "IA-RED²: Interpretability-Aware Redundancy Reduction for Vision
Transformers" (NeurIPS 2021).

Shapes: B images, N input tokens, N' merged tokens, H heads of width d. A `valid` (B, N) bool
marks the tokens still in play (a reducer before dropped the others by masking); None means all.

  merge_matrix            M = softmax over the N input tokens of (B, N, N') logits: each column
                          sums to 1 (a merged token is a convex combination of input tokens);
                          tokens out of play get weight 0
  merge_tokens            X' = M^T X                                  (B, N', D)
  assignment_information  I(I; A) of the soft clustering M defines: I an input token (uniform
                          over those in play), p(a | i) = M_ia / sum_a' M_ia' (B,), nats
  interpreter_logits      s_i = mean_h q_h . k_ih / sqrt(d): per-head attention-like scores of
                          each token against one query per image, averaged over heads  (B, N)
  bernoulli_log_prob      sum_i valid_i [a_i log pi_i + (1 - a_i) log(1 - pi_i)], pi = sigmoid(s)
  bucketed_top_k          the k highest-scoring tokens (static k), in token order, and which of
                          them to keep in play (score >= threshold; the best one always)
  cluster_scores          the LTM repository's soft cluster assignment of features
  ib_bound                the LTM repository's variational IB bound per sample (needs labels)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _valid(valid, shape):
  return jnp.ones(shape, bool) if valid is None else valid


def merge_matrix(logits, valid=None):
  """(B, N, N') logits -> M (B, N, N'), softmax over axis 1 (the input tokens), so that every
  column sums to 1. Tokens with valid False get weight 0 in every column."""
  valid = _valid(valid, logits.shape[:2])
  logits = jnp.where(valid[..., None], logits, jnp.finfo(logits.dtype).min)
  m = jax.nn.softmax(logits, axis=1)
  return jnp.where(valid[..., None], m, 0.0)


def merge_tokens(x, m):
  """X' = M^T X: (B, N, D) tokens, (B, N, N') merging matrix -> (B, N', D) merged tokens."""
  return jnp.einsum("bnk,bnd->bkd", m, x)


def assignment_information(m, valid=None):
  """I(I; A) in nats per image for the soft clustering a merging matrix M defines.

  I is an input token drawn uniformly among those in play, A the merged token it goes to with
  p(a | i) = M_ia / sum_a' M_ia'. I(I; A) = sum_i p(i) sum_a p(a | i) log(p(a | i) / p(a)),
  p(a) = sum_i p(i) p(a | i): 0 when every token is spread alike over the merged tokens, at most
  log N' for a hard, balanced assignment.
  """
  valid = _valid(valid, m.shape[:2])
  rows = jnp.sum(m, axis=-1, keepdims=True)
  p_a_i = m / jnp.where(valid[..., None], rows, 1.0)                        # p(a | i)
  p_i = valid / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)      # (B, N)
  p_a = jnp.einsum("bn,bnk->bk", p_i, p_a_i)                               # (B, N')
  log_p_a = jnp.log(jnp.maximum(p_a, jnp.finfo(p_a.dtype).tiny))
  log_ratio = jnp.log(jnp.where(p_a_i > 0, p_a_i, 1.0)) - log_p_a[:, None, :]
  return jnp.einsum("bn,bnk->b", p_i, jnp.where(p_a_i > 0, p_a_i * log_ratio, 0.0))


def interpreter_logits(q, k):
  """Per-head scores of every token against one query per image, averaged over heads.

  q: (B, H, d) the query of each head; k: (B, N, H, d) the tokens' keys.
  Returns s (B, N) = (1/H) sum_h q_h . k_ih / sqrt(d); the keep-probability is sigmoid(s).
  """
  return jnp.einsum("bhd,bnhd->bn", q, k) * (q.shape[-1] ** -0.5 / q.shape[1])


def bernoulli_log_prob(logits, action, valid=None):
  """log pi(action) of independent Bernoulli(sigmoid(logits)) keep decisions, summed over the
  tokens in play: sum_i valid_i [a_i log pi_i + (1 - a_i) log(1 - pi_i)]  -> (B,)."""
  valid = _valid(valid, logits.shape)
  lp = jnp.where(action, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
  return jnp.sum(jnp.where(valid, lp, 0.0), axis=-1)


def bucketed_top_k(scores, k: int, threshold: float, valid=None):
  """A static-size selection: the k tokens of highest score (tokens out of play rank last),
  returned in token order, and which of them stay in play.

  scores: (B, N); k: the bucket size (static); threshold: scores below it are masked.
  Returns index (B, k) int32 ascending and keep (B, k) bool: in play before, and score >=
  threshold or the highest score of the image (so an image keeps at least one token in play).
  """
  valid = _valid(valid, scores.shape)
  ranked = jnp.where(valid, scores, -jnp.inf)
  top, index = jax.lax.top_k(ranked, k)                        # descending
  order = jnp.argsort(index, axis=-1)
  index = jnp.take_along_axis(index, order, axis=-1)
  top = jnp.take_along_axis(top, order, axis=-1)
  keep = jnp.isfinite(top) & ((top >= threshold) | (order == 0))
  return index.astype(jnp.int32), keep


def cluster_scores(feat, centroids, beta: float = 1.0):
  """Soft assignment of features to clusters as the LTM repository computes it: features are
  L2-normalised, then softmax_k(-beta ||f - c_k||^2).  feat (n, F), centroids (K, F) -> (n, K)."""
  f = feat / jnp.maximum(jnp.linalg.norm(feat, axis=-1, keepdims=True), 1e-12)
  sq = jnp.sum(jnp.square(f[:, None, :] - centroids[None]), axis=-1)
  return jax.nn.softmax(-beta * sq, axis=-1)


def ib_bound(score_in, score_out, target, q):
  """The LTM repository's separable variational upper bound of the IB loss, per sample:

    sum_{a,b} phi_out(a) phi_in(b) log phi_in(b)  -  sum_{a,c} phi_out(a) t(c) log Q[a, c]

  score_in (n, K_in): cluster scores of the inputs; score_out (n, K): of the learned features;
  target (n, C): one-hot labels; q (K, C): Q[a, c], which the repository estimates over the data
  as sum_{n: y_n = c} phi_out(n, a) / #{n: y_n = c}. Returns (n,); the loss is its mean.
  """
  neg_entropy_in = jnp.sum(score_in * jnp.log(score_in), axis=-1)               # (n,)
  term_1 = jnp.sum(score_out, axis=-1) * neg_entropy_in
  term_2 = jnp.einsum("na,nc,ac->n", score_out, target, jnp.log(q))
  return term_1 - term_2
