"""Flash attention as a Pallas kernel, with its own Pallas backward.

FlashAttention: Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", NeurIPS 2022 (arXiv:2205.14135). The work split (grid over queries in the
forward, separate dQ and dK/dV passes in the backward, one log-sum-exp saved per query row)
follows FlashAttention-2: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", 2023 (arXiv:2307.08691), Algorithms 1 and 2.

Layout is that of `jax.nn.dot_product_attention`: q (B, T, H, d), k (B, S, H, d),
v (B, S, H, dv). The logit scale is always explicit.

How arbitrary shapes reach the kernel (all in plain jnp around the custom_vjp, so autodiff
handles the padding and slicing):
  * T and S are zero-padded up to multiples of the query / key block. Padded keys are masked
    out of the softmax inside the kernels; padded query rows are computed and dropped (their
    cotangent is zero, so they add nothing to dK, dV).
  * d and dv are zero-padded to a power of two >= 16, what Triton's `tl.dot` needs. Zero
    columns of q and k leave the logits unchanged; zero columns of v give zero outputs that
    are sliced off.

On CPU the kernels run with `interpret=True` (the tests do that). On GPU they lower through
Pallas' Triton backend: every tile loaded or stored has power-of-two sides >= 16, and the
float32 dots ask for full precision so they are not silently run in TF32. The CPU tests check
that all three kernels lower to Triton IR for CUDA, but the kernels have not been run on a GPU
yet. TPU is not supported (`supports` says so): the Mosaic tiling rules for the squeezed head
axis were not worked out.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

DEFAULT_BLOCK = 128
MIN_BLOCK = 16  # Triton's tl.dot needs every tile side >= 16.
MAX_HEAD_DIM = 256  # Beyond this a (block, d) tile no longer fits comfortably in SRAM.
DTYPES = ("float32", "bfloat16", "float16")
# Finite stand-in for -inf on padded keys: exp(_MASK_VALUE - m) is exactly 0 for any finite
# row max m, and, unlike -inf, it can never produce inf - inf = nan.
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one kernel call (hashable: it is a custom_vjp nondiff argument)."""
  scale: float
  block_q: int
  block_k: int
  kv_len: int  # S before padding; keys at positions >= kv_len are masked out.
  interpret: bool

  @property
  def masks_keys(self) -> bool:
    return self.kv_len % self.block_k != 0


def supports(q, k, v, bias=None, mask=None) -> str | None:
  """Returns None if `attention` can run these inputs, else the reason it cannot."""
  if bias is not None:
    return "the pallas kernel takes no logits bias"
  if mask is not None:
    return "the pallas kernel takes no mask (padding masks are internal)"
  if jax.default_backend() == "tpu":
    return "the pallas kernel is written for GPU (Triton) and CPU interpret mode, not TPU"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    return f"q, k, v must be rank 4 (B, T, H, d), got ranks {q.ndim}, {k.ndim}, {v.ndim}"
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    return f"shapes q{q.shape} k{k.shape} v{v.shape} disagree on batch, length or heads"
  if q.shape[-1] != k.shape[-1]:
    return f"q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})"
  if not q.dtype == k.dtype == v.dtype:
    return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
  if q.dtype.name not in DTYPES:
    return f"dtype {q.dtype} is not one of {', '.join(DTYPES)}"
  if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
    return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds {MAX_HEAD_DIM}"
  return None


def attention(q, k, v, *, scale, block_q: int | None = None, block_k: int | None = None,
              interpret: bool | None = None):
  """softmax(q k^T * scale) v by flash attention; differentiable through a custom_vjp.

  Args:
    q: (B, T, H, d) queries.
    k: (B, S, H, d) keys.
    v: (B, S, H, dv) values.
    scale: the logit scale, a Python number (1/sqrt(d) for standard attention).
    block_q: query rows per program (power of two >= 16); default min(128, next pow2 of T).
    block_k: keys per inner step (power of two >= 16); default min(128, next pow2 of S).
    interpret: run the Pallas interpreter; default True exactly when the backend is CPU.

  Returns:
    (B, T, H, dv) attended values, in q's dtype.
  """
  why = supports(q, k, v)
  if why is not None:
    raise ValueError(f"pallas attention cannot run this call: {why}.")
  try:
    scale = float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"scale must be a concrete Python number, got {scale!r}") from e
  _, t, _, d = q.shape
  s, dv = k.shape[1], v.shape[-1]
  block_q = _block_size("block_q", block_q, t)
  block_k = _block_size("block_k", block_k, s)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  cfg = _Config(scale=scale, block_q=block_q, block_k=block_k, kv_len=s,
                interpret=bool(interpret))
  d_pad, dv_pad = _tile_dim(d), _tile_dim(dv)
  out = _flash(_pad(q, block_q, d_pad), _pad(k, block_k, d_pad), _pad(v, block_k, dv_pad), cfg)
  return out[:, :t, :, :dv]


def _block_size(name: str, block: int | None, length: int) -> int:
  if block is None:
    return min(DEFAULT_BLOCK, max(MIN_BLOCK, pl.next_power_of_2(length)))
  if block < MIN_BLOCK or block & (block - 1):
    raise ValueError(f"{name}={block} must be a power of two >= {MIN_BLOCK} (16, 32, 64, ...)")
  return block


def _tile_dim(d: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(d))


def _pad(x, block: int, dim: int):
  """Zero-pads (B, L, H, d) to (B, ceil(L / block) * block, H, dim)."""
  length = pl.cdiv(x.shape[1], block) * block
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[-1])))


# ---------------------------------------------------------------------------------------------
# Tile math shared by the three kernels. Tiles are 2-D (rows, features); dots accumulate in f32.

def _dot(a, b, contract_a: int, contract_b: int):
  """A 2-D matmul contracting the given axes; float32 inputs stay in full float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _logits(q, k, key_start, cfg: _Config):
  """S = q k^T * scale for a (bq, d) query tile and a (bk, d) key tile, padded keys masked."""
  s = _dot(q, k, 1, 1) * cfg.scale  # (bq, bk)
  if cfg.masks_keys:
    key_pos = key_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(key_pos < cfg.kv_len, s, _MASK_VALUE)
  return s


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  """One query tile against all keys with the online softmax (FlashAttention-2, Alg. 1).

  q_ref (bq, d), k_ref (S, d), v_ref (S, dv) -> o_ref (bq, dv), lse_ref (bq,).
  """
  q = q_ref[...]
  bk = cfg.block_k

  def step(j, carry):
    acc, m, l = carry  # (bq, dv) unnormalised output, (bq,) running max, (bq,) running sum
    s = _logits(q, k_ref[pl.ds(j * bk, bk), :], j * bk, cfg)  # (bq, bk)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # Rescale what was accumulated under the old max; exp(-inf) = 0 on the first step.
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])  # (bq, bk)
    v = v_ref[pl.ds(j * bk, bk), :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  bq, dv = q.shape[0], o_ref.shape[-1]
  init = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, k_ref.shape[0] // bk, step, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  # log sum_j exp(s_ij): the backward rebuilds P = exp(S - lse) from it without a max pass.
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
  """dQ for one query tile, looping over key tiles (FlashAttention-2, Alg. 2, dQ part).

  With P = exp(S - lse), dP = dO V^T and dS = P * (dP - delta):  dQ = scale * dS K.
  """
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]  # (bq,)
  bk = cfg.block_k

  def step(j, dq):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    p = jnp.exp(_logits(q, k, j * bk, cfg) - lse[:, None])  # (bq, bk)
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  dq = lax.fori_loop(0, k_ref.shape[0] // bk, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: _Config):
  """dK, dV for one key tile, looping over query tiles (FlashAttention-2, Alg. 2, dK/dV part).

  dV = P^T dO and dK = scale * dS^T Q, summed over all query tiles.
  """
  k, v = k_ref[...], v_ref[...]  # (bk, d), (bk, dv)
  key_start = pl.program_id(2) * cfg.block_k
  bq = cfg.block_q

  def step(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p = jnp.exp(_logits(q, k, key_start, cfg) - lse_ref[rows][:, None])  # (bq, bk)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    ds = p * (_dot(do, v, 1, 1) - delta_ref[rows][:, None])
    return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, step, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wiring. Arrays are padded: q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv) with
# T, S block multiples. Grids are (B, H, tiles); the head axis is squeezed out of each block,
# so kernels see 2-D (rows, features) tiles without any transpose of the inputs.

def _tiles(block: int, width: int):
  """BlockSpec for a (block, width) tile of a (B, L, H, width) array, tile index on grid axis 2."""
  return pl.BlockSpec((None, block, None, width), lambda b, h, i: (b, i, h, 0))


def _whole(length: int, width: int):
  """BlockSpec for the full (length, width) sequence of one (batch, head)."""
  return pl.BlockSpec((None, length, None, width), lambda b, h, i: (b, 0, h, 0))


def _row_stats(block: int):
  """BlockSpec for a (block,) slice of a per-row statistic stored as (B, H, T)."""
  return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _whole_row_stats(length: int):
  """BlockSpec for all (length,) rows of a per-row statistic of one (batch, head)."""
  return pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: _Config, name: str, width: int):
  compiler_params = None
  if not cfg.interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=2)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret, compiler_params=compiler_params,
      name=name)


def _forward(q, k, v, cfg: _Config):
  b, t, h, d = q.shape
  s, dv = k.shape[1], v.shape[-1]
  return _call(
      _fwd_kernel, (b, h, t // cfg.block_q),
      in_specs=[_tiles(cfg.block_q, d), _whole(s, d), _whole(s, dv)],
      out_specs=[_tiles(cfg.block_q, dv), _row_stats(cfg.block_q)],
      out_shape=[jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      cfg=cfg, name="vitjax_flash_fwd", width=max(d, dv))(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
  return _forward(q, k, v, cfg)[0]


def _flash_fwd(q, k, v, cfg: _Config):
  o, lse = _forward(q, k, v, cfg)
  return o, (q, k, v, o, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, o, lse = res
  b, t, h, d = q.shape
  s, dv = k.shape[1], v.shape[-1]
  # delta_i = sum_c O_ic dO_ic = sum_j P_ij dP_ij, the softmax-Jacobian term of every row. It
  # is one elementwise product and reduction, which XLA fuses well, so it stays in jnp.
  delta = jnp.einsum("bthc,bthc->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  args = (q, k, v, do, lse, delta)
  width = max(d, dv)
  dq = _call(
      _dq_kernel, (b, h, t // cfg.block_q),
      in_specs=[_tiles(cfg.block_q, d), _whole(s, d), _whole(s, dv), _tiles(cfg.block_q, dv),
                _row_stats(cfg.block_q), _row_stats(cfg.block_q)],
      out_specs=_tiles(cfg.block_q, d), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      cfg=cfg, name="vitjax_flash_bwd_dq", width=width)(*args)
  dk, dv_ = _call(
      _dkv_kernel, (b, h, s // cfg.block_k),
      in_specs=[_whole(t, d), _tiles(cfg.block_k, d), _tiles(cfg.block_k, dv), _whole(t, dv),
                _whole_row_stats(t), _whole_row_stats(t)],
      out_specs=[_tiles(cfg.block_k, d), _tiles(cfg.block_k, dv)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      cfg=cfg, name="vitjax_flash_bwd_dkv", width=width)(*args)
  return dq, dk, dv_


_flash.defvjp(_flash_fwd, _flash_bwd)
