"""Group-action positions in attention (GTA / PRoPE form), with two members: 2-D RoPE and UCPE's
ray frames.

Each token t carries a transform T_t, an invertible m x m matrix acting on every m-channel block
of the attention head (the head dimension d is K blocks of m channels; block k may have its own
matrix, as RoPE's frequencies do, or all blocks share one). T_t maps "world" coordinates into the
token's own frame (world -> camera -> ray for UCPE; a shift by -p_t for RoPE). Attention becomes

    q~_i = T_i^T q_i,   k~_j = T_j^-1 k_j,   v~_j = T_j^-1 v_j          (apply_q, apply_kv)
    o~_i = sum_j softmax_j(q~_i . k~_j * scale) v~_j                    (any attention kernel)
    o_i  = T_i o~_i                                                     (apply_o)

so the logit q_i^T (T_i T_j^-1) k_j and the output sum_j a_ij (T_i T_j^-1) v_j depend on the
tokens' transforms only through the relative transforms T_i T_j^-1 (PRoPE's convention). A
global change of world frame, T_t -> T_t G for every t (a rigid motion of the whole scene; a
shift of every position for RoPE), leaves the attention output unchanged.

Members (each returns `Transforms(mat, inv)`, shapes (..., N, K, m, m) with K = 1 for a matrix
shared by all blocks):
  rope2d(positions, freqs)   2x2 rotations R(-p_t,a * f) for axis a (col, then row) and
                             frequency f: through the API, exactly RoPE (q and k rotated by
                             +p * f; with `values=True` also v, and the output rotated back).
  ray_transforms(dirs, R, t) UCPE's world -> ray transforms T_t = L_t E: E = [R | t] the
                             world -> camera extrinsics (x_cam = R x_world + t), L_t the rotation
                             whose rows are the ray frame z = d, x = unit(y_cam x z), y = z x x.
  pinhole_rays(grid, fov)    unit directions (camera frame, OpenCV axes: x right, y down, z
                             forward) through the centres of an h x w grid of tokens.

The convention and the ray frames are those of PRoPE's and UCPE's reference code (a checkout of
chengzhag/UCPE: `thirdparty/prope/torch.py`, `world_to_ray_mats` in `src/camera_control.py`).
Its RoPE part differs only in layout: it takes T = R(+p f) (q, k rotated by -p f) and pairs
channel i with i + n/2 of each axis' n channels; here T = R(-p f), as plain RoPE, and pairs are
adjacent channels: the same encoding for positions -p, with the channels permuted.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from vitjax.ops import attention as ops_attention

Attend = Callable[..., jnp.ndarray]


class Transforms(NamedTuple):
  """Per-token transforms T_t and their inverses, each (..., N, K, m, m)."""
  mat: jnp.ndarray
  inv: jnp.ndarray


def _blocks(x, t: Transforms, what: str):
  """x (..., N, H, d) -> (..., N, H, d/m, m), checking that t's blocks tile the head dim."""
  k, m = t.mat.shape[-3], t.mat.shape[-1]
  d = x.shape[-1]
  if t.mat.shape[-2] != m or t.inv.shape != t.mat.shape:
    raise ValueError(f"transforms must be square (..., N, K, m, m) with inverses of the same "
                     f"shape; got mat{t.mat.shape}, inv{t.inv.shape}")
  if d % m or k not in (1, d // m):
    raise ValueError(f"{what} has head dim {d}, which transforms of K={k} blocks of {m}x{m} do "
                     f"not tile (need d % {m} == 0 and K in (1, d/{m} = {d // m}))")
  if t.mat.shape[-4] not in (1, x.shape[-3]):
    raise ValueError(f"{what} has {x.shape[-3]} tokens but the transforms {t.mat.shape[-4]}")
  return x.reshape(*x.shape[:-1], d // m, m)


def _act(mat, x, what: str, t: Transforms):
  """Each m-block of x's head dim times its matrix: y_b = mat_b x_b (mat already picked)."""
  xb = _blocks(x, t, what)                                   # (..., N, H, K, m)
  y = jnp.sum(mat[..., :, None, :, :, :].astype(x.dtype) * xb[..., None, :], axis=-1)
  return y.reshape(x.shape)


def apply_q(q, t: Transforms):
  """q~ = T^T q on each block; q (..., N, H, d)."""
  return _act(jnp.swapaxes(t.mat, -1, -2), q, "q", t)


def apply_kv(x, t: Transforms):
  """k~ = T^-1 k (and v~ = T^-1 v) on each block; x (..., N, H, d)."""
  return _act(t.inv, x, "k/v", t)


def apply_o(o, t: Transforms):
  """o = T o~ on each block; o (..., N, H, d)."""
  return _act(t.mat, o, "o", t)


def prope_attention(q, k, v, transforms: Transforms, *, scale=None, mask=None,
                    values: bool = True, attend: Attend | None = None):
  """Self-attention with per-token transforms (module docstring), q, k, v (B, N, H, d).

  values=False transforms only q and k (the logits are relative, the values are not: with
    rope2d this is plain RoPE). mask: (B, 1, 1, N) or broadcastable key mask, as the kernels
    take it. attend: the attention core `attend(q, k, v, *, scale, mask)` on (B, N, H, d)
    (default `vitjax.ops.attention.dot_product_attention`).
  """
  attend = attend or ops_attention.dot_product_attention
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k = apply_q(q, transforms), apply_kv(k, transforms)
  if values:
    v = apply_kv(v, transforms)
  kwargs = {} if mask is None else {"mask": mask}
  o = attend(q, k, v, scale=scale, **kwargs)
  return apply_o(o, transforms) if values else o


def with_prefix(t: Transforms, num_prefix: int) -> Transforms:
  """`num_prefix` identity transforms (CLS and other non-patch tokens) put before the tokens."""
  if not num_prefix:
    return t
  shape = t.mat.shape[:-4] + (num_prefix,) + t.mat.shape[-3:]
  eye = jnp.broadcast_to(jnp.eye(t.mat.shape[-1], dtype=t.mat.dtype), shape)
  return Transforms(jnp.concatenate([eye, t.mat], -4), jnp.concatenate([eye, t.inv], -4))


def concat_blocks(*parts: Transforms, head_dims) -> Transforms:
  """Transforms acting on consecutive slices of the head dim (`head_dims` channels each), as one
  block-diagonal family: blocks are grouped into the largest block size m (which every part's
  size must divide) and shared (K = 1) parts are repeated. PRoPE / UCPE give half the head to
  the camera transform and half to RoPE this way."""
  m = max(p.mat.shape[-1] for p in parts)
  mats, invs = [], []
  for p, dim in zip(parts, head_dims, strict=True):
    m0, k0 = p.mat.shape[-1], p.mat.shape[-3]
    if m % m0 or dim % m or k0 not in (1, dim // m0):
      raise ValueError(f"a part of {k0} blocks of {m0}x{m0} cannot fill {dim} channels in "
                       f"blocks of {m}")
    r = m // m0
    for a, out in ((p.mat, mats), (p.inv, invs)):
      lead = a.shape[:-3]
      a = jnp.broadcast_to(a, lead + (dim // m0, m0, m0)).reshape(lead + (dim // m, r, m0, m0))
      eye = jnp.eye(r, dtype=a.dtype)                           # block-diagonal of r blocks
      big = jnp.einsum("...grij,rs->...grisj", a, eye).reshape(lead + (dim // m, m, m))
      out.append(big)
  lead = jnp.broadcast_shapes(*(a.shape[:-3] for a in mats))
  cat = lambda xs: jnp.concatenate([jnp.broadcast_to(a, lead + a.shape[-3:]) for a in xs], -3)
  return Transforms(cat(mats), cat(invs))


# ---------------------------------------------------------------------------------------------
# 2-D RoPE.

def rope_freqs(head_dim: int, base: float = 100.0) -> np.ndarray:
  """The d/4 frequencies f_k = base^(-k / (d/4)) of 2-D RoPE (each axis gets half the head)."""
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
  n = head_dim // 4
  return (base ** -(np.arange(n) / n)).astype(np.float32)


def rotation_2x2(angle):
  """(...,) angles -> (..., 2, 2) rotations [[cos, -sin], [sin, cos]]."""
  c, s = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def rope2d(positions, freqs) -> Transforms:
  """positions (..., N, 2) as (row, col), real or integer; freqs (F,). Returns K = 2F blocks of
  2x2: blocks 0..F-1 rotate by the column (x), F..2F-1 by the row (y), as `posemb_sincos_2d`
  orders its channels. T_t = R(-p f) (a shift by -p), so through `prope_attention` q and k are
  rotated by +p f."""
  positions = jnp.asarray(positions, jnp.float32)
  freqs = jnp.asarray(freqs, jnp.float32)
  angle = jnp.concatenate([positions[..., 1:2] * freqs, positions[..., 0:1] * freqs], -1)
  return Transforms(rotation_2x2(-angle), rotation_2x2(angle))


def grid_positions(grid) -> np.ndarray:
  """(h*w, 2) integer (row, col) of a raster-ordered grid."""
  h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# UCPE ray frames.

def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def pinhole_rays(grid, fov: float):
  """Unit ray directions (h*w, 3) in the camera frame (x right, y down, z forward) through the
  centres of an h x w grid of square pixels; `fov` is the horizontal field of view in radians
  (across the w columns, edge to edge), so the focal length is (w/2) / tan(fov/2) pixels."""
  h, w = grid
  if not 0.0 < fov < np.pi:
    raise ValueError(f"fov={fov!r}: a pinhole's field of view is in (0, pi) radians")
  f = (w / 2) / np.tan(fov / 2)
  pos = grid_positions(grid)
  d = np.stack([pos[:, 1] + 0.5 - w / 2, pos[:, 0] + 0.5 - h / 2, np.full(h * w, f)], -1)
  return _unit(jnp.asarray(d, jnp.float32))


def ray_frames(directions, up=(0.0, 1.0, 0.0)):
  """(..., 3) directions d -> (..., 3, 3) rotations whose rows are the ray frame x, y, z:
  z = d/|d|, x = unit(up x z), y = z x x (right-handed; `up` is the camera's y axis in the
  directions' coordinates, which must not be parallel to any d). The matrix maps vectors into
  the ray frame."""
  z = _unit(jnp.asarray(directions, jnp.float32))
  up = jnp.broadcast_to(jnp.asarray(up, jnp.float32), z.shape)
  x = _unit(jnp.cross(up, z))
  y = jnp.cross(z, x)
  return jnp.stack([x, y, z], -2)


def extrinsics(rotation, translation):
  """World -> camera E = [[R, t], [0, 1]] and its inverse [[R^T, -R^T t], [0, 1]], (..., 4, 4)."""
  r = jnp.asarray(rotation, jnp.float32)
  t = jnp.asarray(translation, jnp.float32)
  def rigid(rot, tr):
    top = jnp.concatenate([rot, tr[..., :, None]], -1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0]), top.shape[:-2] + (1, 4))
    return jnp.concatenate([top, bottom], -2)
  rt = jnp.swapaxes(r, -1, -2)
  return rigid(r, t), rigid(rt, -jnp.einsum("...ij,...j->...i", rt, t))


def ray_transforms(directions, rotation=None, translation=None) -> Transforms:
  """UCPE's per-token world -> ray transforms T_t = L_t E (module docstring), K = 1.

  directions: (..., N, 3) ray directions in the camera frame (any lens: pinhole, fisheye,
    panorama). rotation (..., 3, 3) / translation (..., 3): the world -> camera extrinsics of
    each example (default identity); broadcast against the directions' leading axes.
  """
  frames = ray_frames(directions)                                 # (..., N, 3, 3) camera -> ray
  rotation = jnp.eye(3) if rotation is None else rotation
  translation = jnp.zeros(3) if translation is None else translation
  e, e_inv = extrinsics(rotation, translation)                    # (..., 4, 4)
  e, e_inv = e[..., None, :, :], e_inv[..., None, :, :]           # one per example, every token
  local = jnp.zeros(frames.shape[:-2] + (4, 4)).at[..., :3, :3].set(frames).at[..., 3, 3].set(1.0)
  mm = lambda a, b: jnp.einsum("...ij,...jk->...ik", a, b, precision="highest")  # noqa: E731
  mat = mm(local, e)                                              # (..., N, 4, 4)
  inv = mm(e_inv, jnp.swapaxes(local, -1, -2))                    # L_t^-1 = L_t^T
  return Transforms(mat[..., None, :, :], inv[..., None, :, :])
