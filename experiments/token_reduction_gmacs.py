"""XLA-counted GMACs per image of the Fashion-MNIST ViT (configs/vit.py: vit_nano4, 96 wide, 3
blocks, 3 heads, MLP 384, 'gap', 28 px, 49 patch tokens) with each token reducer, per keep ratio
and reduction blocks.

    python -m experiments.token_reduction_gmacs
    python -m experiments.token_reduction_gmacs --keep_ratios=0.5,0.7 --blocks=1:1,2

GMACs are multiply-accumulates, `compiled.cost_analysis()['flops'] / 2` of one image's forward
pass: 'eval' through `vitjax.train.gmacs` (the figure the runner logs), 'train' the same count of
the forward pass with train=True. IA-RED² masks in training (every token is still computed, so
no saving) and gathers its top-k bucket at eval; 'random' and 'ltm' gather / merge in both.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import vitjax
from vitjax import train
from vitjax.configs import vit as vit_config

REDUCERS = ("random", "ltm", "iared2")


def fashion_mnist_model(**plugins):
  """The model of configs/vit.py (10 classes) with the given plug-in switches."""
  config = vit_config.get_config()
  overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
  return vitjax.create_model(config.model_name, num_classes=10, **overrides, **plugins)


def train_gmacs(model, variables, image_shape) -> float:
  """GMACs of one image's forward pass with train=True (dropout rng given, sown values kept)."""
  fn = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k},
                                           mutable=["aux_loss", "policy"])[0])
  cost = fn.lower(variables, jnp.zeros((1, *image_shape)), jax.random.key(0)).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / 2e9


def measure(model, image_shape=(28, 28, 1)) -> tuple[float, float]:
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
  return train.gmacs(model, variables, image_shape), train_gmacs(model, variables, image_shape)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--keep_ratios", default="0.5,0.7,0.9")
  parser.add_argument("--blocks", default="1:1,2", help="reduction_blocks settings, ':'-separated")
  args = parser.parse_args(argv)
  keeps = [float(k) for k in args.keep_ratios.split(",")]
  settings = [tuple(int(b) for b in s.split(",")) for s in args.blocks.split(":")]
  plain_eval, plain_train = measure(fashion_mnist_model())
  print(f"GMACs/image (multiply-accumulates, XLA), eval / train; no reduction: "
        f"{plain_eval:.5f} / {plain_train:.5f}\n")
  print("| reducer | before blocks | " + " | ".join(f"keep {k:g}" for k in keeps) + " |")
  print("|---|---|" + "---:|" * len(keeps))
  for name in REDUCERS:
    for blocks in settings:
      cells = []
      for keep in keeps:
        model = fashion_mnist_model(token_reduction=name, reduction_blocks=blocks, keep_ratio=keep)
        cells.append("{:.5f} / {:.5f}".format(*measure(model)))
      print(f"| {name} | {', '.join(map(str, blocks))} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
