"""Times FFT kernelized RPE attention against exact softmax attention with the same RPE.

Luo et al. (NeurIPS 2021) compute attention with relative positions in O(N log N): Performer
random features plus Toeplitz products by FFT (`vitjax.ops.krpe.krpe_attention`). The baseline
is exact softmax(q k^T / sqrt(d) + b_{j-i}) v, chunked over query blocks so that only a
(block, N) slab of logits exists at a time. Both use 1-D RPE (a Toeplitz bias over a sequence
of N tokens), batch 1, one head of width 64, float32, and are jit-compiled; each is warmed up
(compile + one run) before the median of several timed runs is taken, the two methods
alternating run by run so that both see the same background load.

  python -m experiments.attention_scaling.bench_scaling

prints markdown tables and writes a log-log plot to experiments/attention_scaling/scaling.png.
The FFT path is timed for several numbers m of random features: its cost is O(N m d log N),
so m sets where it overtakes the exact O(N^2 d) attention.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.ops import attention as ops_attention
from vitjax.ops import krpe
from vitjax.ops import toeplitz

HERE = os.path.dirname(os.path.abspath(__file__))


def exact_rpe_attention(q, k, v, rel_bias, *, block: int):
  """softmax(q k^T / sqrt(d) + B) v, B_ij = b_{j-i}, one (block, N) slab of logits at a time.

  Args:
    q, k, v: (N, d) one head.
    rel_bias: (2N - 1,) table, b_k at index k + N - 1.
    block: query rows per slab; must divide N.
  """
  n, d = q.shape
  scale = d ** -0.5

  def bias_rows(i):                              # row i of B is table[N-1-i : 2N-1-i]
    return jax.lax.dynamic_slice(rel_bias, (n - 1 - i,), (n,))

  def slab(start):
    rows = start + jnp.arange(block)
    q_blk = jax.lax.dynamic_slice(q, (start, 0), (block, d))
    logits = (q_blk * scale) @ k.T + jax.vmap(bias_rows)(rows)       # (block, N)
    return jax.nn.softmax(logits, axis=-1) @ v                        # (block, d)

  out = jax.lax.map(slab, jnp.arange(0, n, block))                    # (N / block, block, d)
  return out.reshape(n, d)


def fft_rpe_attention(q, k, v, rel_bias, projection):
  """The FFT path on the same single-head inputs (adds the batch and head axes it expects)."""
  y = krpe.krpe_attention(q[None, :, None], k[None, :, None], v[None, :, None],
                          rel_bias[None], projection)
  return y[0, :, 0]


def time_calls(calls: dict, repeats: int) -> dict:
  """Median and min wall time per call; calls alternate within each repeat (same load for all).

  Args:
    calls: name -> zero-argument function returning jax arrays.
    repeats: timed runs per call, after one warm-up run (which also compiles).

  Returns:
    {name: median seconds, name + '_min': fastest run}.
  """
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  out = {name: statistics.median(t) for name, t in times.items()}
  out.update({name + "_min": min(t) for name, t in times.items()})
  return out


def num_repeats(n: int, base: int) -> int:
  """More runs where a run is cheap (short runs are the noisiest), fewer above 16k tokens."""
  if n <= 4096:
    return 3 * base
  return base if n <= 16384 else max(base // 2, 1)


def inputs(n: int, d: int, seed: int = 0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = (jax.random.normal(key, (n, d), jnp.float32) for key in keys[:3])
  rel_bias = 0.1 * jax.random.normal(keys[3], (2 * n - 1,), jnp.float32)
  return q, k, v, rel_bias


def plot(rows, features, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ns = np.array([r["n"] for r in rows], float)
  exact = [(r["n"], r["exact"]) for r in rows if "exact" in r]
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for m in features:
    ax.loglog(ns, [r[f"fft{m}"] for r in rows], "o-", label=f"FFT kernelized RPE, m={m}")
  ax.loglog([n for n, _ in exact], [t for _, t in exact], "s-", color="k",
            label="exact softmax + RPE (chunked)")
  t0 = rows[0][f"fft{features[0]}"]
  ax.loglog(ns, t0 * ns * np.log2(ns) / (ns[0] * np.log2(ns[0])), "k:", lw=1, label="∝ N log N")
  n0, e0 = exact[0]
  ax.loglog(ns, e0 * (ns / n0) ** 2, "k--", lw=1, label="∝ N²")
  ax.set_xlabel("tokens N")
  ax.set_ylabel("seconds per forward (median)")
  ax.set_title("1-D RPE attention, batch 1, 1 head of 64, float32, 2-core CPU", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def vit_layer_times(batch: int, num_features: int, repeats: int) -> dict:
  """One attention core at ViT-S/16 224 px shape: 6 heads of 64, 14 x 14 patches + CLS, 2-D RPE.

  Compares exact softmax + 2-D relative bias (dense (H, N, N) bias) with kernelized RPE using
  the FFT and using the explicit BTTB matrix (`toeplitz_impl='dense'`, same function).
  """
  heads, d, grid = 6, 64, (14, 14)
  n = 1 + grid[0] * grid[1]
  keys = jax.random.split(jax.random.PRNGKey(2), 5)
  q, k, v = (jax.random.normal(key, (batch, n, heads, d), jnp.float32) for key in keys[:3])
  table = 0.1 * jax.random.normal(keys[3], (heads, 2 * grid[0] - 1, 2 * grid[1] - 1))
  prefix = 0.1 * jax.random.normal(keys[4], (heads,))
  projection = krpe.draw_projection(jax.random.PRNGKey(1), num_features, d)

  @jax.jit
  def exact(q, k, v, table, prefix):
    bias = toeplitz.with_prefix(toeplitz.bttb_matrix(table), prefix, 1)   # (H, N, N)
    return ops_attention.dot_product_attention(q, k, v, scale=d ** -0.5, bias=bias)

  def kernelized(impl):
    return jax.jit(lambda q, k, v, table, prefix: krpe.krpe_attention(
        q, k, v, table, projection, grid=grid, num_prefix=1, prefix_bias=prefix,
        toeplitz_impl=impl))

  fns = {"exact": exact, "fft": kernelized("fft"), "dense": kernelized("dense")}
  args = (q, k, v, table, prefix)
  return time_calls({name: functools.partial(fn, *args) for name, fn in fns.items()}, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1024,4096,16384")
  parser.add_argument("--fft_only_sizes", default="65536")
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--num_features", default="8,16,64",
                      help="random-feature counts m to time, each checked against the targets")
  parser.add_argument("--block", type=int, default=512, help="query rows per exact-attention slab")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--plot", default=os.path.join(HERE, "scaling.png"))
  parser.add_argument("--vit_batch", type=int, default=8,
                      help="batch of the ViT-S/16-shape comparison (0 skips it)")
  parser.add_argument("--vit_features", type=int, default=64,
                      help="random features there (the krpe_fft mixer's default)")
  args = parser.parse_args()

  d = args.head_dim
  features = [int(m) for m in args.num_features.split(",") if m]
  projections = {m: krpe.draw_projection(jax.random.PRNGKey(1), m, d) for m in features}
  fft_fn = jax.jit(fft_rpe_attention)
  exact_fn = jax.jit(exact_rpe_attention, static_argnames="block")
  sizes = [int(s) for s in args.sizes.split(",") if s]
  fft_only = [int(s) for s in args.fft_only_sizes.split(",") if s]

  rows = []
  for n in sorted(set(sizes + fft_only)):
    q, k, v, rel_bias = inputs(n, d)
    calls = {f"fft{m}": functools.partial(fft_fn, q, k, v, rel_bias, projections[m])
             for m in features}
    if n in sizes:
      calls["exact"] = functools.partial(exact_fn, q, k, v, rel_bias, block=min(args.block, n))
    row = {"n": n, **time_calls(calls, num_repeats(n, args.repeats))}
    rows.append(row)
    print(f"N={n}: " + ", ".join(f"{k} {row[k]:.4f}s" for k in calls), flush=True)

  print()
  print(f"1-D RPE, batch 1, 1 head, head_dim {d}, float32; m = random features (orthogonal); "
        f"exact attention in slabs of {args.block} query rows; median (min) of "
        f"{num_repeats(4096, args.repeats)} runs up to 4k tokens, {args.repeats} at 16k, "
        f"{num_repeats(65536, args.repeats)} above, after a warm-up, methods alternating run "
        f"by run; jax {jax.__version__}, {jax.devices()[0].platform} ({os.cpu_count()} cores, "
        f"{platform.machine()}); 1-min load average at the end: {os.getloadavg()[0]:.1f}.")
  print()
  print("| N | exact softmax + RPE (s) | " +
        " | ".join(f"FFT kernelized RPE, m={m} (s) | speed-up m={m}" for m in features) + " |")
  print("|---:|---:|" + "---:|---:|" * len(features))
  for r in rows:
    cells = [f"{r['n']:,}",
             f"{r['exact']:.4f} ({r['exact_min']:.4f})" if "exact" in r else "-"]
    for m in features:
      cells.append(f"{r[f'fft{m}']:.4f} ({r[f'fft{m}_min']:.4f})")
      cells.append(f"{r['exact'] / r[f'fft{m}']:.1f}x" if "exact" in r else "-")
    print("| " + " | ".join(cells) + " |")

  by_n = {r["n"]: r for r in rows}
  print()
  for m in features:
    key = f"fft{m}"
    lines = []
    if 4096 in by_n and 16384 in by_n:
      growth = by_n[16384][key] / by_n[4096][key]
      faster = all(r[key] < r["exact"] for r in rows if "exact" in r and r["n"] >= 4096)
      speed = by_n[16384]["exact"] / by_n[16384][key]
      lines += [f"16k/4k time {growth:.2f} (target <= 6, N log N: {4 * 15 / 13:.2f})",
                f"faster than exact from 4k on: {'yes' if faster else 'NO'}",
                f"speed-up at 16k {speed:.1f}x (target >= 5x)"]
    if 16384 in by_n and 65536 in by_n:
      lines.append(f"64k/16k time {by_n[65536][key] / by_n[16384][key]:.2f} "
                   f"(N log N: {4 * 17 / 15:.2f})")
    print(f"- m={m}: " + "; ".join(lines))
  if args.plot:
    plot(rows, features, args.plot)
    print(f"- plot: {os.path.relpath(args.plot)}")

  if args.vit_batch:
    t = vit_layer_times(args.vit_batch, args.vit_features, args.repeats)
    print()
    print(f"ViT-S/16 attention-core shape: batch {args.vit_batch}, 6 heads of 64, 14x14 patches "
          f"+ CLS (197 tokens), 2-D RPE, {args.vit_features} random features; median (min) of "
          f"{args.repeats} runs.")
    print()
    print("| attention core | seconds per call, median (min) | time / exact |")
    print("|---|---:|---:|")
    for name, label in (("exact", "exact softmax + 2-D RPE bias"),
                        ("fft", "kernelized RPE, toeplitz_impl='fft'"),
                        ("dense", "kernelized RPE, toeplitz_impl='dense'")):
      print(f"| {label} | {t[name]:.4f} ({t[name + '_min']:.4f}) | "
            f"{t[name] / t['exact']:.1f}x |")


if __name__ == "__main__":
  main()
