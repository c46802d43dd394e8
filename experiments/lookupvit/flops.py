"""LookupViT-B/16 vs ViT-B/16 at 224 px: GMACs (XLA and analytic), parameters, CPU images/s.

    python -m experiments.lookupvit.flops [--batch 8] [--repeats 7] [--grids 3,5,7,10]
        [--impls auto,project]

GMACs = multiply-accumulates (10^9), the unit the ViT literature calls "GFLOPs"; XLA's
`cost_analysis()['flops']` counts 2 per multiply-add, so XLA GMACs = flops / 2 / batch.
The analytic column is `vitjax.models.lookupvit.analytic_macs` (matmuls only). With the default
head_source='compressed' the last block's propagate step and lookup MLP feed nothing; XLA
removes them under jit, so the analytic column compared with XLA leaves them out, and the
"with dead" column shows the count that includes them.
LookupViT runs once per `mhbc_impl` in --impls: 'auto' (the default, which absorbs MHBC's
lookup-side weights where that pays) and 'project' (MHBC as the paper writes it, the form the
reference notes' formula counts); the two are the same function of the same weights.
Throughput: both models run in this process on the same random batch, with timed calls
interleaved across models and the median taken, so load from other processes hits all alike.
Weights are random normals (values do not change the work done); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import vitjax
from vitjax.models import lookupvit as lv


def random_variables(model, images, seed=0, **init_kwargs):
  """Random-normal variables with the model's tree (no jit of init: that compile is slow)."""
  shapes = jax.eval_shape(functools.partial(model.init, **init_kwargs), jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)), shapes)


def vit_macs(model, image_size: int) -> int:
  """ViT per layer 12 T D^2 + 2 T^2 D (T = N + 1 with CLS), plus patch embedding and head."""
  n = (image_size // model.patch_size) ** 2
  t, d = n + 1, model.width
  per_layer = 4 * t * d * d + 2 * t * d * model.mlp_dim + 2 * t * t * d
  return model.depth * per_layer + n * 3 * model.patch_size ** 2 * d + d * model.num_classes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--grids", default="3,5,7,10")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--impls", default="auto,project", help="LookupViT mhbc_impl values")
  args = parser.parse_args(argv)
  grids = [int(g) for g in args.grids.split(",")]
  size, batch = args.image_size, args.batch

  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)), jnp.float32)
  vit = vitjax.create_model("vit_b16")
  lookups = {impl: vitjax.create_model("lookupvit_b16", mhbc_impl=impl)
             for impl in args.impls.split(",")}
  # One tree for every impl and grid; (1, 1) fits any lookup grid (--image_size below 224 included).
  lookup_vars = random_variables(next(iter(lookups.values())), images, grid=(1, 1))
  rows = []  # name, grid, model, variables, compiled fn
  for name, model, grid in [("vit_b16", vit, None)] + [
      (f"lookupvit_b16 ({impl})", lookup, (g, g)) for impl, lookup in lookups.items()
      for g in grids]:
    variables = random_variables(model, images) if grid is None else lookup_vars
    fn = functools.partial(model.apply, grid=grid) if grid else model.apply
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(variables, images).compile()
    flops = compiled.cost_analysis()["flops"]
    print(f"compiled {name} grid={grid} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    compiled(variables, images).block_until_ready()                 # warm-up
    rows.append([name, grid, model, variables, compiled, flops / 2 / batch, []])

  for r in range(args.repeats):                                      # interleaved timing
    for row in rows:
      t0 = time.perf_counter()
      row[4](row[3], images).block_until_ready()
      row[6].append(time.perf_counter() - t0)
    print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

  base = rows[0]
  base_ips = batch / statistics.median(base[6])
  print(f"Command: python -m experiments.lookupvit.flops --batch {batch} "
        f"--repeats {args.repeats} --grids {args.grids} --impls {args.impls}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), float32, batch {batch}, {size} px.")
  print("GMACs = multiply-accumulates (10^9) per image; XLA = cost_analysis flops / 2. "
        "Analytic counts matmuls only; 'live' leaves out the last block's dead lookup work "
        "(XLA removes it under jit), 'with dead' includes it.\n")
  print("| model (mhbc_impl) | compressed grid (M) | params | GMACs (XLA) | GMACs analytic, live "
        "| XLA / analytic | GMACs analytic, with dead | GMACs vs ViT | images/s (median) "
        "| s/batch median (min-max) | speed vs ViT |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, grid, model, variables, _, macs, times in rows:
    params = sum(math.prod(a.shape) for a in jax.tree.leaves(variables))
    ips = batch / statistics.median(times)
    if grid is None:
      live = dead = vit_macs(model, size)
      grid_txt = f"- (N+1 = {(size // model.patch_size) ** 2 + 1} tokens)"
    else:
      live = lv.analytic_macs(model, size, grid, include_dead=False)
      dead = lv.analytic_macs(model, size, grid, include_dead=True)
      m, n = grid[0] * grid[1], (size // model.patch_size) ** 2
      heads = model.mhbc_heads or model.num_heads
      absorbed = lv.use_absorbed(model.mhbc_impl, m, n, model.width, heads)
      grid_txt = f"{grid[0]}x{grid[1]} ({m}){', absorbed' if absorbed else ''}"
    print(f"| {name} | {grid_txt} | {params:,} | {macs / 1e9:.2f} | {live / 1e9:.2f} "
          f"| {macs / live:.3f} | {dead / 1e9:.2f} | {macs / base[5]:.2f}x | {ips:.2f} "
          f"| {statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) "
          f"| {ips / base_ips:.2f}x |")


if __name__ == "__main__":
  main()
