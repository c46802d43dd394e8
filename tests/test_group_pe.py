"""The group-action position API (vitjax.ops.group_pe) and the 'prope_attn' mixer.

RoPE through the API equals RoPE written out pair by pair (forward and gradients); the mixer
equals attention with each token's transform written as a dense d x d block-diagonal matrix and
inverted by numpy (forward and gradients, every weight perturbed); a global shift of positions /
a global rigid motion of the cameras leaves the output unchanged, a local change does not; ray
frames are orthonormal, right-handed and rotate with the camera; pinhole rays have the stated
field of view; bad input gets one clear error.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import group_pe as prope
from vitjax.ops import group_pe


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _attention(q, k, v, scale):
  logits = jnp.einsum("bihd,bjhd->bhij", q, k) * scale
  return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, -1), v)


def _pair_angles(positions, freqs, head_dim):
  """(N, d/2) RoPE angles written out: pair p < d/4 turns with the column, the others with the
  row, at frequency freqs[p mod d/4]."""
  f = len(freqs)
  return np.array([[pos[1] * freqs[p] if p < f else pos[0] * freqs[p - f]
                    for p in range(head_dim // 2)] for pos in np.asarray(positions)])


def _rotate_pairs(x, angles):
  """Channels (2p, 2p+1) of x (B, N, H, d) rotated by angles[n, p], one pair at a time."""
  out = []
  for p in range(x.shape[-1] // 2):
    c, s = np.cos(angles[:, p])[None, :, None], np.sin(angles[:, p])[None, :, None]
    x0, x1 = x[..., 2 * p], x[..., 2 * p + 1]
    out += [c * x0 - s * x1, s * x0 + c * x1]
  return jnp.stack(out, -1)


def _direct_rope(q, k, v, positions, freqs, values):
  ang = _pair_angles(positions, freqs, q.shape[-1])
  q, k = _rotate_pairs(q, ang), _rotate_pairs(k, ang)
  if values:
    v = _rotate_pairs(v, ang)
  o = _attention(q, k, v, q.shape[-1] ** -0.5)
  return _rotate_pairs(o, -ang) if values else o


def test_rope_through_the_api_is_rope_written_out():
  rng = np.random.default_rng(0)
  b, n, h, d = 2, 5, 2, 8
  q, k, v, w = (_normal(rng, b, n, h, d) for _ in range(4))
  positions = rng.uniform(0, 9, (n, 2)).astype(np.float32)     # real coordinates (RPE-2D)
  freqs = group_pe.rope_freqs(d)
  t = group_pe.rope2d(positions, freqs)
  assert t.mat.shape == (n, d // 2, 2, 2)

  def both(f):
    def loss(q, k, v, values):
      y = f(q, k, v, values)
      return jnp.sum(y * w), y
    grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v: (grads(q, k, v, False), grads(q, k, v, True)))(q, k, v)

  ours = both(lambda q, k, v, values: group_pe.prope_attention(q, k, v, t, values=values))
  ref = both(lambda q, k, v, values: _direct_rope(q, k, v, positions, freqs, values))
  for ((_, y_ours), g_ours), ((_, y_ref), g_ref) in zip(ours, ref):
    np.testing.assert_allclose(y_ours, y_ref, atol=1e-5, rtol=1e-5)
    for a, c in zip(g_ours, g_ref):
      np.testing.assert_allclose(a, c, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(ours[0][0][1] - ours[1][0][1]).max()) > 1e-3   # values=True differs


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q = q * np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


def test_outputs_depend_only_on_relative_transforms():
  """T_t -> T_t G for all t leaves the attention output unchanged: a global shift of RoPE
  positions, a global rigid motion of two cameras; moving one token or one camera does not."""
  rng = np.random.default_rng(1)
  b, h, d = 1, 2, 8
  run = jax.jit(lambda q, k, v, t: group_pe.prope_attention(q, k, v, t))
  # RoPE: 6 tokens at real positions, then all shifted by one vector.
  q, k, v = (_normal(rng, b, 6, h, d) for _ in range(3))
  pos = rng.uniform(0, 8, (6, 2))
  freqs = group_pe.rope_freqs(d)
  y = run(q, k, v, group_pe.rope2d(pos, freqs))
  y_shift = run(q, k, v, group_pe.rope2d(pos + np.array([3.7, -2.2]), freqs))
  moved = pos.copy()
  moved[2] += 1.0
  np.testing.assert_allclose(y, y_shift, atol=2e-5)
  assert float(jnp.abs(y - run(q, k, v, group_pe.rope2d(moved, freqs))).max()) > 1e-3
  # Rays: two pinhole cameras (2 x 3 tokens each) as one sequence of 12 tokens.
  q, k, v = (_normal(rng, b, 12, h, d) for _ in range(3))
  rays = jnp.stack([group_pe.pinhole_rays((2, 3), 1.2)] * 2)             # (2 cams, 6, 3)
  rot = np.stack([_random_rotation(rng) for _ in range(2)])
  trans = rng.normal(size=(2, 3))
  def cams(rot, trans):
    t = group_pe.ray_transforms(rays, rot, trans)                       # (2, 6, 1, 4, 4)
    return group_pe.Transforms(*(a.reshape(12, 1, 4, 4) for a in t))
  y = run(q, k, v, cams(rot, trans))
  a, shift = _random_rotation(rng), rng.normal(size=3)                   # world' = A world + b
  # E' = E M^-1: R' = R A^T, t' = t - R A^T b.
  rot2 = rot @ a.T
  y_moved = run(q, k, v, cams(rot2, trans - np.einsum("cij,j->ci", rot2, shift)))
  np.testing.assert_allclose(y, y_moved, atol=5e-5)
  one = trans.copy()
  one[1] += 0.5
  assert float(jnp.abs(y - run(q, k, v, cams(rot, one))).max()) > 1e-3


def test_ray_frames_are_orthonormal_right_handed_and_rotate_with_the_camera():
  rng = np.random.default_rng(2)
  d = rng.normal(size=(10, 3)) + np.array([0.0, 0.0, 2.0])
  f = np.asarray(group_pe.ray_frames(d))                                 # rows x, y, z
  np.testing.assert_allclose(f @ f.transpose(0, 2, 1), np.broadcast_to(np.eye(3), f.shape),
                             atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(f), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.cross(f[:, 0], f[:, 1]), f[:, 2], atol=1e-6)
  np.testing.assert_allclose(f[:, 2], d / np.linalg.norm(d, axis=-1, keepdims=True), atol=1e-6)
  assert np.abs(f[:, 0, 1]).max() < 1e-6                                 # x is orthogonal to y_cam
  # Built in world coordinates (d and y_cam rotated by R^T), the frame is L R.
  r = _random_rotation(rng)
  np.testing.assert_allclose(group_pe.ray_frames(d @ r, up=r[1]), f @ r, atol=1e-5)
  # T_t maps the camera centre to the origin and a point along the ray onto the ray's +z axis.
  t = rng.normal(size=3)
  tr = group_pe.ray_transforms(d, r, t)
  mat, inv = np.asarray(tr.mat[:, 0]), np.asarray(tr.inv[:, 0])
  centre = -r.T @ t
  d_world = d @ r / np.linalg.norm(d, axis=-1, keepdims=True)
  point = np.concatenate([centre + 2.5 * d_world, np.ones((10, 1))], -1)
  np.testing.assert_allclose(np.einsum("nij,nj->ni", mat, point), np.broadcast_to(
      [0.0, 0.0, 2.5, 1.0], (10, 4)), atol=1e-5)
  np.testing.assert_allclose(mat @ inv, np.broadcast_to(np.eye(4), mat.shape), atol=1e-5)


def test_pinhole_rays_span_the_field_of_view():
  fov, (h, w) = math.radians(70.0), (3, 4)
  rays = np.asarray(group_pe.pinhole_rays((h, w), fov)).reshape(h, w, 3)
  np.testing.assert_allclose(np.linalg.norm(rays, axis=-1), 1.0, atol=1e-6)
  f = (w / 2) / math.tan(fov / 2)
  # Column j's centre is at x = j + 0.5 - w/2 pixels; its ray makes atan(x / f) with the axis.
  np.testing.assert_allclose(np.arctan2(rays[1, :, 0], rays[1, :, 2]),
                             np.arctan((np.arange(w) + 0.5 - w / 2) / f), atol=1e-6)
  assert np.all(np.diff(rays[:, 0, 1]) > 0)                               # rows go down (+y)


def test_concat_blocks_acts_on_consecutive_slices():
  x = _normal(np.random.default_rng(3), 2, 6, 2, 16)

  @jax.jit
  def both_ways(x):
    rays = group_pe.ray_transforms(group_pe.pinhole_rays((2, 3), 1.0))
    rope = group_pe.rope2d(group_pe.grid_positions((2, 3)), group_pe.rope_freqs(8))
    both = group_pe.concat_blocks(rays, rope, head_dims=(8, 8))
    assert both.mat.shape == (6, 4, 4, 4)
    return [(apply(x, both), jnp.concatenate([apply(x[..., :8], rays), apply(x[..., 8:], rope)],
                                             -1))
            for apply in (group_pe.apply_q, group_pe.apply_kv, group_pe.apply_o)]

  for ours, ref in both_ways(x):
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def _dense_transforms(transform, grid, num_prefix, head_dim, positions, fov):
  """Each token's transform as a dense d x d block-diagonal matrix D_n (prefix: the identity)
  and D_n^-1 by numpy, (B, N, d, d) each."""
  t = np.asarray(prope.token_transforms(transform, grid, 0, head_dim, positions=positions,
                                        fov=fov).mat)
  t = np.broadcast_to(t, positions.shape[:1] + t.shape[-4:])            # (B, hw, K, m, m)
  b, n, d = t.shape[0], num_prefix + t.shape[1], head_dim
  dense = np.zeros((b, n, d, d), np.float32)
  for bi in range(b):
    for i in range(n):
      dense[bi, i] = np.eye(d)
      if i >= num_prefix:
        blocks = t[bi, i - num_prefix]                                   # (K, m, m)
        m = blocks.shape[-1]
        for j in range(d // m):
          dense[bi, i, j * m:(j + 1) * m, j * m:(j + 1) * m] = blocks[j % len(blocks)]
  return dense, np.linalg.inv(dense)


def _dense_prope(params, x, dense, inv):
  """The mixer written with dense matrices: q~ = D^T q, k~ = D^-1 k, v~ = D^-1 v, o = D o~."""
  def proj(name):
    return jnp.einsum("bnc,chd->bnhd", x, params[name]["kernel"]) + params[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  q = jnp.einsum("bnji,bnhj->bnhi", dense, q)
  k, v = (jnp.einsum("bnij,bnhj->bnhi", inv, a) for a in (k, v))
  o = jnp.einsum("bnij,bnhj->bnhi", dense, _attention(q, k, v, q.shape[-1] ** -0.5))
  return jnp.einsum("bnhd,hdc->bnc", o, params["out"]["kernel"]) + params["out"]["bias"]


def test_mixer_matches_dense_block_matrices():
  """transform='ray_rope2d' (both members and their concatenation), with real RoPE positions as
  posemb='rpe2d' gives them, one CLS token; every weight perturbed."""
  grid, heads, dim, num_prefix = (2, 3), 2, 16, 1
  rng = np.random.default_rng(4)
  positions = jnp.asarray(rng.uniform(0, 7, (2, 6, 2)), jnp.float32)
  mixer = prope.GroupActionAttention(num_heads=heads, transform="ray_rope2d", fov=80.0)
  x = _normal(rng, 2, 7, dim)
  shapes = jax.eval_shape(functools.partial(mixer.init, grid=grid, num_prefix=num_prefix,
                                            positions=positions), jax.random.key(0), x)
  params = jax.tree.map(lambda s: _normal(rng, *s.shape) * 0.5, shapes)["params"]
  assert set(params) == {"query", "key", "value", "out"}
  w = _normal(rng, 2, 7, dim)
  ours = lambda p, x: mixer.apply({"params": p}, x, grid=grid, num_prefix=num_prefix,  # noqa
                                  positions=positions)
  dense, inv = _dense_transforms("ray_rope2d", grid, num_prefix, dim // heads, positions,
                                 fov=80.0)
  ref = lambda p, x: _dense_prope(p, x, dense, inv)  # noqa: E731
  grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x: (jnp.sum(f(p, x) * w), f(p, x)), argnums=(0, 1), has_aux=True))
  (_, y_ours), g_ours = grad(ours)(params, x)
  (_, y_ref), g_ref = grad(ref)(params, x)
  np.testing.assert_allclose(y_ours, y_ref, atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-3, rtol=1e-3), g_ours, g_ref)


def test_prope_attn_is_a_mixer_for_any_vit():
  """In a ViT with a CLS token, at two grids from one set of parameters, with 'mhsa''s tree."""
  make = functools.partial(vitjax.create_model, "vit_nano4", num_classes=3, width=16, depth=1,
                           num_heads=2, mlp_dim=16, posemb="none")
  model = make(mixer="prope_attn", mixer_kwargs=dict(transform="ray_rope2d"))
  x = jnp.zeros((1, 16, 16, 1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      jax.eval_shape(make().init, jax.random.key(0), x))
  rng = np.random.default_rng(5)
  variables = jax.tree.map(lambda s: _normal(rng, *s.shape), shapes)
  apply = jax.jit(model.apply)
  for size in (16, 24):
    y = apply(variables, _normal(rng, 2, size, size, 1))
    assert y.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y)))


def test_bad_input_gets_one_clear_error():
  x = jnp.zeros((1, 16, 16, 1))
  make = functools.partial(vitjax.create_model, "vit_nano4", num_classes=3, depth=1,
                           mixer="prope_attn", posemb="none")
  cases = [
      (dict(mixer_kwargs=dict(transform="rope3d")), r"transform='rope3d'.*rope2d, ray"),
      (dict(width=48, num_heads=4, mixer_kwargs=dict(transform="ray_rope2d")), r"divisible by 8"),
      (dict(mixer_kwargs=dict(fov=180.0)), r"fov=180.0.*\(0, 180\)"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(make(**kwargs).init, jax.random.key(0), x)
  t = group_pe.rope2d(np.zeros((4, 2)), group_pe.rope_freqs(8))           # 4 blocks of 2x2
  with pytest.raises(ValueError, match="head dim 12"):
    group_pe.apply_q(jnp.zeros((1, 4, 1, 12)), t)
  with pytest.raises(ValueError, match=r"positions must be \(B, h\*w, 2\)"):
    prope.token_transforms("rope2d", (2, 2), 0, 8, positions=jnp.zeros((1, 5, 2)))
  with pytest.raises(ValueError, match="fov"):
    group_pe.pinhole_rays((2, 2), 4.0)
