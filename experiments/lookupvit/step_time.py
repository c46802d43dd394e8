"""Train-step time of the Fashion-MNIST main jobs' models, per LookupViT grid, next to the ViT.

    python -m experiments.lookupvit.step_time [--batch 128] [--repeats 3] [--grids 3,5,7]
        [--mhbc_impl auto] [--skip_vit]

Times the jitted train step (forward, loss, backward, AdamW update) on random 28x28 images, in one process:
the ViT of configs/vit.py, the same ViT on 20x20 images (25 tokens: the cost of LookupViT's compressed path at
5x5 on its own), and the LookupViT of configs/lookupvit.py at each grid. Prints the best of `repeats` timings
of 8 steps each, in ms per step. `--mhbc_impl` picks LookupViT's MHBC evaluation ('auto', 'project', 'absorb').
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import optim
from vitjax import train
from vitjax.configs import common
from vitjax.models import create_model

DIMS = dict(width=96, depth=3, num_heads=3, mlp_dim=384)


def step_ms(model, grid, image_size, batch, repeats, tx) -> float:
  rng = np.random.default_rng(0)
  data = dict(image=jnp.asarray(rng.random((batch, image_size, image_size, 1)), jnp.float32),
              label=jnp.asarray(rng.integers(0, 10, batch)))
  extra = {} if grid is None else {"grid": grid}
  params = model.init(jax.random.key(0), data["image"][:1], **extra)["params"]
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  fn = jax.jit(train.make_train_step(model, tx), static_argnums=3)
  kwargs = train.static_kwargs(extra)
  state, _ = fn(state, data, jax.random.key(0), kwargs)
  jax.block_until_ready(state)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(8):
      state, _ = fn(state, data, jax.random.key(0), kwargs)
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - t0) / 8)
  return best * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--grids", default="3,5,7")
  parser.add_argument("--mhbc_impl", default="auto", choices=("auto", "project", "absorb"))
  parser.add_argument("--skip_vit", action="store_true", help="time LookupViT only")
  args = parser.parse_args()
  config = common.base_config()
  common.fashion_mnist_recipe(config)
  tx, _ = optim.make_optimizer(config)
  rows = [("vit (configs/vit.py), 49 tokens", create_model("vit_nano4", num_classes=10, pool="gap", **DIMS),
           None, 28),
          ("vit on 20x20 images, 25 tokens", create_model("vit_nano4", num_classes=10, pool="gap", **DIMS),
           None, 20)][2 if args.skip_vit else 0:]
  lookup = create_model("lookupvit_nano4", num_classes=10, mhbc_impl=args.mhbc_impl, **DIMS)
  rows += [(f"lookupvit (configs/lookupvit.py, mhbc_impl={args.mhbc_impl}) at {g}x{g}", lookup, (g, g), 28)
           for g in (int(v) for v in args.grids.split(","))]
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}\n")
  print("| model | ms per train step |\n|---|---|")
  for name, model, grid, size in rows:
    print(f"| {name} | {step_ms(model, grid, size, args.batch, args.repeats, tx):.0f} |", flush=True)


if __name__ == "__main__":
  main()
