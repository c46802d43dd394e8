"""vitjax.ops.windows against plainly written loops over windows, and window attention against
dense attention over all tokens with an explicit block mask (forward and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.ops import windows


def _rand(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("grid,window", [((6, 8), (3, 4)), ((6, 8), (6, 2)), ((6, 8), (2, 8)),
                                         ((4, 4), (4, 4))])
def test_partition_and_reverse_match_a_loop(grid, window):
  x = _rand(0, (2, *grid, 3, 2))                       # extra trailing axes ride along
  (h, w), (wh, ww) = grid, window
  loop = [x[:, i:i + wh, j:j + ww].reshape(2, wh * ww, 3, 2)
          for i in range(0, h, wh) for j in range(0, w, ww)]
  parts = windows.window_partition(x, window)
  np.testing.assert_array_equal(parts, np.stack(loop, 1))
  np.testing.assert_array_equal(windows.window_reverse(parts, window, grid), x)
  with pytest.raises(ValueError, match=rf"windows of 5x3 do not tile a {h}x{w} map"):
    windows.window_partition(x, (5, 3))


def test_padding_and_its_mask_match_a_loop():
  grid, window, shift = (5, 7), (3, 4), (1, 2)
  x = _rand(1, (1, *grid, 2))
  padded = windows.pad_to_windows(x, window)
  assert padded.shape == (1, 6, 8, 2) and windows.padded_size(grid, window) == (6, 8)
  np.testing.assert_array_equal(padded[:, :5, :7], x)
  assert not np.any(padded[:, 5:]) and not np.any(padded[:, :, 7:])
  mask = windows.padding_mask(grid, window, shift)               # (nW, T)
  for n, (i, j) in enumerate((i, j) for i in range(0, 6, 3) for j in range(0, 8, 4)):
    for t, (a, b) in enumerate((a, b) for a in range(3) for b in range(4)):
      y, z = (i + a + shift[0]) % 6, (j + b + shift[1]) % 8    # where the rolled token came from
      assert mask[n, t] == (y < 5 and z < 7)


def test_shift_mask_matches_swins_region_loop():
  grid, window, shift = (8, 12), (4, 4), (2, 2)
  # Swin's construction: label the rolled map's 3x3 slices, partition, compare labels.
  labels = np.zeros(grid, np.int32)
  n = 0
  for hs in (slice(0, -4), slice(-4, -2), slice(-2, None)):
    for ws in (slice(0, -4), slice(-4, -2), slice(-2, None)):
      labels[hs, ws] = n
      n += 1
  np.testing.assert_array_equal(windows.shift_region_labels(grid, window, shift), labels)
  mask = windows.shifted_window_mask(grid, window, shift)
  assert mask.shape == (6, 16, 16)
  for win, (i, j) in enumerate((i, j) for i in range(0, 8, 4) for j in range(0, 12, 4)):
    lab = labels[i:i + 4, j:j + 4].reshape(-1)
    np.testing.assert_array_equal(mask[win], lab[:, None] == lab[None, :])
  assert windows.window_mask(grid, window, 0) is None          # nothing to mask


def test_relative_position_index_and_bias_match_a_loop():
  wh, ww = 3, 4
  index = windows.relative_position_index((wh, ww))
  cells = [(a, b) for a in range(wh) for b in range(ww)]
  for i, (yi, xi) in enumerate(cells):
    for j, (yj, xj) in enumerate(cells):
      assert index[i, j] == (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
  assert index.min() == 0 and index.max() == (2 * wh - 1) * (2 * ww - 1) - 1
  table = _rand(2, ((2 * wh - 1) * (2 * ww - 1), 2))
  bias = windows.relative_position_bias(table, (wh, ww))
  np.testing.assert_array_equal(bias, table[index].transpose(2, 0, 1))
  with pytest.raises(ValueError, match="35 rows; got 30"):
    windows.relative_position_bias(table[:30], (wh, ww))


def test_fit_window_follows_timm():
  assert windows.fit_window((7, 7), 7, 3) == ((7, 7), (0, 0))    # a window the size of the map
  assert windows.fit_window((4, 14), 7, 3) == ((4, 7), (0, 3))   # clipped per axis
  assert windows.fit_window((14, 14), 7, 3) == ((7, 7), (3, 3))
  assert windows.stripe_windows((8, 6), 2) == ((8, 2), (2, 6))
  assert windows.stripe_windows((4, 4), 7) == ((4, 4), (4, 4))


def dense_reference(q, k, v, table, *, window, shift, scale):
  """Attention over all H*W tokens of the map with an explicit (N, N) block mask: a query sees a
  key when both fall in the same window of the zero-padded, rolled map and in the same shift
  region; the bias is the table entry of their offset inside that window."""
  b, h, w, heads, d = q.shape
  (wh, ww), (sh, sw) = window, shift
  hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
  labels = windows.shift_region_labels((hp, wp), window, shift)
  place = []
  for y in range(h):
    for x in range(w):
      yp, xp = (y - sh) % hp, (x - sw) % wp                    # position on the rolled map
      place.append((yp // wh, xp // ww, yp % wh, xp % ww, labels[yp, xp]))
  n = h * w
  mask = np.zeros((n, n), bool)
  index = np.zeros((n, n), np.int32)
  for i, (wy, wx, ay, ax, ri) in enumerate(place):
    for j, (vy, vx, by, bx, rj) in enumerate(place):
      mask[i, j] = (wy, wx, ri) == (vy, vx, rj)
      index[i, j] = (ay - by + wh - 1) * (2 * ww - 1) + (ax - bx + ww - 1)
  bias = jnp.moveaxis(table[index], -1, 0)                      # (heads, N, N)
  qf, kf, vf = (t.reshape(b, n, heads, d) for t in (q, k, v))
  logits = jnp.einsum("bihd,bjhd->bhij", qf, kf) * scale + bias
  logits = jnp.where(mask, logits, -jnp.inf)
  out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, -1), vf)
  return out.reshape(b, h, w, heads, d)


@pytest.mark.parametrize("grid,window,shift", [
    ((8, 8), (4, 4), (0, 0)),       # W-MSA
    ((8, 8), (4, 4), (2, 2)),       # SW-MSA
    ((7, 5), (4, 4), (2, 2)),       # padded (bottom and right) and shifted
    ((6, 4), (6, 2), (0, 0)),       # vertical stripes
    ((6, 4), (3, 4), (0, 0)),       # horizontal stripes
])
def test_window_attention_matches_dense_masked_attention(grid, window, shift):
  heads, d = 2, 3
  q, k, v = (jnp.asarray(_rand(s, (2, *grid, heads, d))) for s in (3, 4, 5))
  table = jnp.asarray(_rand(6, ((2 * window[0] - 1) * (2 * window[1] - 1), heads)))
  w_out = jnp.asarray(_rand(7, (2, *grid, heads, d)))

  def ours(q, k, v, table):
    bias = windows.relative_position_bias(table, window)
    return windows.window_attention(q, k, v, window=window, shift=shift, scale=0.5, bias=bias)

  def ref(q, k, v, table):
    return dense_reference(q, k, v, table, window=window, shift=shift, scale=0.5)

  np.testing.assert_allclose(ours(q, k, v, table), ref(q, k, v, table), atol=1e-5, rtol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w_out)  # noqa: E731
  g_ours = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(q, k, v, table)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(q, k, v, table)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_window_attention_rejects_a_shift_outside_the_window():
  q = jnp.zeros((1, 8, 8, 1, 2))
  with pytest.raises(ValueError, match=r"shift=\(4, 4\).*window=\(4, 4\)"):
    windows.window_attention(q, q, q, window=4, shift=4, scale=1.0)


@pytest.mark.parametrize("window,impl", [((6, 2), "shift"), ((2, 4), "xla"), ((1, 4), "shift"),
                                         ((6, 1), "xla")])
def test_window_depthwise_conv_matches_a_conv_per_window(window, impl):
  x = _rand(8, (2, 6, 4, 3))
  kernel = _rand(9, (3, 3, 1, 3))
  bias = _rand(10, (3,))
  out = windows.window_depthwise_conv(x, kernel, bias, window=window, impl=impl)
  ref = np.zeros_like(x)
  wh, ww = window
  for i in range(0, 6, wh):
    for j in range(0, 4, ww):
      patch = x[:, i:i + wh, j:j + ww]                           # conv sees only this window
      ref[:, i:i + wh, j:j + ww] = jax.lax.conv_general_dilated(
          patch, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=3) + bias
  np.testing.assert_allclose(out, ref, atol=1e-5)
  g = jax.grad(lambda k: jnp.sum(
      windows.window_depthwise_conv(x, k, None, window=window, impl=impl) ** 2))
  g_ref = jax.grad(lambda k: jnp.sum(jnp.concatenate([
      jax.lax.conv_general_dilated(x[:, i:i + wh, j:j + ww], k, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=3).reshape(-1)
      for i in range(0, 6, wh) for j in range(0, 4, ww)]) ** 2))
  np.testing.assert_allclose(g(jnp.asarray(kernel)), g_ref(jnp.asarray(kernel)), atol=1e-4,
                             rtol=1e-5)
