"""Retention (Sun et al., 2023, "Retentive Network", RetNet), the pure-jnp core of ViR
(Hatamizadeh et al., 2023, "ViR: Vision Retention Networks").

Per head, with a fixed decay gamma in (0, 1), queries q_n, keys k_n (d wide) and values v_n
(dv wide), retention has three forms that compute the same function:

  parallel    O = (Q K^T ⊙ D) V,   D_nm = gamma^(n-m) for n >= m, else 0     (causal, 1-D)
  recurrent   S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n               (S_0 = 0, d x dv)
  chunkwise   chunks of C tokens; inside chunk i the parallel form, across chunks the state
              R_i = gamma^C R_{i-1} + K_i^T (zeta ⊙ V_i),        zeta_j = gamma^(C-1-j)
              O_i = (Q_i K_i^T ⊙ D_C) V_i + (xi ⊙ Q_i) R_{i-1},  xi_j   = gamma^(j+1)

Memory: parallel O(N^2) per head, recurrent O(d dv) state per step (a `lax.scan` over the N
tokens), chunkwise O(N C) inside chunks plus one state per chunk (a `lax.scan` over the N / C
chunks). A sequence that is not a multiple of C is padded at the end (causal: padding never
reaches earlier tokens) and cut back; a chunk larger than the sequence becomes the sequence.

The 2-D variant (ViR's 2-D retention) decays with the Manhattan distance of two grid tokens,
D_nm = gamma^(|row_n - row_m| + |col_n - col_m|), not causal, so only the parallel form exists.
That decay is RMT's, `exp(vitjax.ops.manhattan.decay_mask(...))`: one decay op for both
families, as the multi-scale rates `retnet_log_gammas` are `manhattan.decay_rates` with a = 5,
r = H (gamma_h = 1 - 2^(-5-h)).

`normalize=True` is RetNet's retention-score normalisation (the paper's "Retention Score
Normalization"; torchscale's parallel form): D~_nm = D_nm / sqrt(sum_m D_nm), then each row of
R = Q K^T ⊙ D~ divided by max(|sum_m R_nm|, 1), the divisor held out of the gradient (torchscale
`.detach()`s it). Per row that is one positive factor, so o_n = q_n S_n / max(|q_n z_n|, a_n)
with the key sum z_n = sum_m D_nm k_m and a_n = sqrt(sum_m D_nm). The parallel form takes the
row sums of its score matrix; the recurrent and chunkwise forms carry z_n as one more value
column (v_n extended by a 1): all three forms stay the same function. The GroupNorm (or RMSNorm)
that follows retention is scale-invariant per head, so this changes a block's output only through
the norm's epsilon; RetNet uses it to keep low-precision arithmetic in range.

Layout: q, k (B, N, H, d), v (B, N, H, dv) -> (B, N, H, dv), as `vitjax.ops.attention`.
log_gamma: (H,) log decays (negative).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import choices
from vitjax.ops import manhattan

FORMS = ("parallel", "recurrent", "chunkwise")


def retnet_log_gammas(num_heads: int) -> np.ndarray:
  """RetNet's multi-scale decays log(1 - 2^(-5-h)), h = 0..H-1, float32 (H,)."""
  return manhattan.decay_rates(num_heads, 5.0, float(num_heads))


def log_gammas(gammas, num_heads: int, *, field: str = "gammas") -> np.ndarray:
  """log of user-given decays (one per head), each checked to lie in (0, 1)."""
  g = np.asarray(gammas, dtype=np.float64).reshape(-1)
  if g.shape != (num_heads,):
    raise ValueError(f"{field}={tuple(np.asarray(gammas).reshape(-1).tolist())} needs one decay "
                     f"per head ({num_heads} values)")
  if not np.all((g > 0) & (g < 1)):
    raise ValueError(f"{field}={tuple(g.tolist())}: every retention decay gamma must lie in the "
                     "open interval (0, 1)")
  return np.log(g).astype(np.float32)


def causal_decay(log_gamma, n: int, dtype=jnp.float32):
  """(H, n, n) D_nm = gamma^(n-m) for n >= m, else 0. Built from iotas inside the computation,
  so a long sequence adds no (n, n) constant to the program."""
  idx = jnp.arange(n)
  diff = (idx[:, None] - idx[None, :]).astype(dtype)
  lg = jnp.asarray(log_gamma, dtype)[:, None, None]
  return jnp.where(diff >= 0, jnp.exp(lg * jnp.maximum(diff, 0)), 0).astype(dtype)


def manhattan_decay(log_gamma, h: int, w: int, dtype=jnp.float32):
  """(H, hw, hw) D_nm = gamma^(Manhattan distance) over the row-major grid (RMT's decay)."""
  return jnp.exp(manhattan.decay_mask(jnp.asarray(log_gamma, dtype), h, w)).astype(dtype)


def _check(q, k, v, log_gamma):
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"retention takes q, k (B, N, H, d) and v (B, N, H, dv); got q{q.shape}, "
                     f"k{k.shape}, v{v.shape}")
  if np.shape(log_gamma) != (q.shape[2],):
    raise ValueError(f"log_gamma must hold one decay per head, shape ({q.shape[2]},); got "
                     f"{np.shape(log_gamma)}")


def parallel_retention(q, k, v, decay, *, normalize: bool = False):
  """(Q K^T ⊙ D) V with any (H, N, N) decay matrix (`causal_decay`, `manhattan_decay`)."""
  scores = jnp.einsum("bnhd,bmhd->bhnm", q, k) * decay[None].astype(q.dtype)
  out = jnp.einsum("bhnm,bmhe->bnhe", scores, v)
  if not normalize:
    return out
  a = jnp.sqrt(decay.sum(-1)).astype(q.dtype)                          # (H, N)
  denom = jnp.maximum(jnp.abs(scores.sum(-1)), a[None])                # (B, H, N)
  return out / jax.lax.stop_gradient(denom).transpose(0, 2, 1)[..., None]


def _row_scale(log_gamma, n: int, dtype):
  """(N, H) a_n = sqrt(sum_{m <= n} gamma^(n-m)) = sqrt((1 - gamma^(n+1)) / (1 - gamma))."""
  lg = jnp.asarray(log_gamma, dtype)
  steps = jnp.arange(1, n + 1, dtype=dtype)[:, None]
  return jnp.sqrt(jnp.expm1(steps * lg) / jnp.expm1(lg))


def _with_key_sum(form):
  """Runs a causal `form` on v extended by a column of ones (its output column is q_n z_n) and
  applies the normalisation of the module docstring."""
  def run(q, k, v, log_gamma, normalize: bool, **kw):
    if not normalize:
      return form(q, k, v, log_gamma, **kw)
    ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
    out = form(q, k, jnp.concatenate([v, ones], -1), log_gamma, **kw)
    qz = jax.lax.stop_gradient(out[..., -1:])
    a = _row_scale(log_gamma, q.shape[1], q.dtype)[None, :, :, None]    # (1, N, H, 1)
    return out[..., :-1] / jax.lax.stop_gradient(jnp.maximum(jnp.abs(qz), a))
  return run


def _recurrent(q, k, v, log_gamma):
  b, _, h, d = q.shape
  gamma = jnp.exp(jnp.asarray(log_gamma, q.dtype))[None, :, None, None]  # (1, H, 1, 1)

  def step(s, qkv):
    qn, kn, vn = qkv                                                     # (B, H, d|dv)
    s = gamma * s + kn[..., :, None] * vn[..., None, :]                  # S_n (B, H, d, dv)
    return s, jnp.einsum("bhd,bhde->bhe", qn, s)

  s0 = jnp.zeros((b, h, d, v.shape[-1]), q.dtype)
  _, out = jax.lax.scan(step, s0, tuple(jnp.swapaxes(t, 0, 1) for t in (q, k, v)))
  return jnp.swapaxes(out, 0, 1)


def _chunkwise(q, k, v, log_gamma, *, chunk_size: int):
  b, n, h, d = q.shape
  dv = v.shape[-1]
  c = min(int(chunk_size), n)
  pad = (-n) % c
  if pad:
    q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  m = (n + pad) // c
  q, k, v = (t.reshape(b, m, c, h, t.shape[-1]) for t in (q, k, v))   # (B, m, C, H, .)
  lg = jnp.asarray(log_gamma, q.dtype)
  j = jnp.arange(c, dtype=q.dtype)
  inner = jnp.einsum("bmihd,bmjhd->bmhij", q, k) * causal_decay(lg, c, q.dtype)[None, None]
  out = jnp.einsum("bmhij,bmjhe->bmihe", inner, v)
  zeta = jnp.exp(lg[:, None] * (c - 1 - j))                              # (H, C)
  kv = jnp.einsum("bmjhd,bmjhe,hj->mbhde", k, v, zeta)                  # each chunk's K^T(zeta V)
  chunk_decay = jnp.exp(lg * c)[None, :, None, None]                     # gamma^C

  def step(r, kv_i):
    return chunk_decay * r + kv_i, r                                     # emits R_{i-1}

  _, r_prev = jax.lax.scan(step, jnp.zeros((b, h, d, dv), q.dtype), kv)  # (m, B, H, d, dv)
  xi = jnp.exp(lg[:, None] * (j + 1))                                    # (H, C)
  out = out + jnp.einsum("bmihd,hi,mbhde->bmihe", q, xi, r_prev)
  return out.reshape(b, m * c, h, dv)[:, :n]


def _parallel_causal(q, k, v, log_gamma, normalize: bool):
  """The parallel form normalises with the row sums of its own score matrix (the formula as
  written); the other two with the key-sum column: the form tests compare both."""
  return parallel_retention(q, k, v, causal_decay(log_gamma, q.shape[1], q.dtype),
                            normalize=normalize)


_FORMS = {"parallel": _parallel_causal, "recurrent": _with_key_sum(_recurrent),
          "chunkwise": _with_key_sum(_chunkwise)}


def causal_retention(q, k, v, log_gamma, *, form: str = "chunkwise", chunk_size: int = 256,
                     normalize: bool = False):
  """1-D causal retention in one of FORMS (module docstring); all give the same result.

  Args:
    q, k: (B, N, H, d); v: (B, N, H, dv).
    log_gamma: (H,) log decays.
    form: 'parallel', 'recurrent' or 'chunkwise'.
    chunk_size: tokens per chunk of the chunkwise form (>= 1; larger than N means one chunk).
    normalize: RetNet's score normalisation (module docstring).
  """
  _check(q, k, v, log_gamma)
  choices.check("form", form, FORMS)
  if form == "chunkwise" and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r}: allowed values are integers >= 1")
  kw = dict(chunk_size=chunk_size) if form == "chunkwise" else {}
  return _FORMS[form](q, k, v, log_gamma, normalize, **kw)


def manhattan_retention(q, k, v, log_gamma, grid: tuple[int, int], *, normalize: bool = False):
  """2-D retention over an (h, w) grid of h*w row-major tokens (parallel form only)."""
  _check(q, k, v, log_gamma)
  h, w = grid
  if h * w != q.shape[1]:
    raise ValueError(f"grid={grid} has {h * w} tokens, but q has {q.shape[1]}")
  return parallel_retention(q, k, v, manhattan_decay(log_gamma, h, w, q.dtype),
                            normalize=normalize)
