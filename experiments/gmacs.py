"""XLA-counted GMACs (multiply-accumulates, the ViT literature's "GFLOPs") of registered models.

    python -m experiments.gmacs --models=convnext_tiny,cvt_13,crossvit_9_240@240 --image_size=224

NAME@SIZE measures NAME at SIZE px (CrossViT's reference input is 240); NAME/KEY=VALUE/... passes
`create_model` overrides (values read as Python literals, else as strings), e.g. the DTN paper's ViT-S*
with and without DTN:

    python -m experiments.gmacs \
      --models=vit_ti16_star_dtn/width=432/mlp_dim=1728/num_heads=9/norm=ln,vit_ti16_star_dtn/width=432/mlp_dim=1728/num_heads=9

One image, inference, `compiled.cost_analysis()['flops'] / 2`, through `vitjax.train.gmacs` (the
figure the runner logs). Depthwise convolutions use XLA's convolution (`dwconv_impl='xla'` where a
model has the field): the CPU 'shift' form also counts the taps that fall on the zero padding.
"""
from __future__ import annotations

import argparse
import ast

import jax
import jax.numpy as jnp

import vitjax
from vitjax import train

DEFAULT = ("convnext_tiny", "cvt_13", "swin_tiny_patch4_window7_224", "cswin_tiny_224", "rmt_t",
           "crossvit_9_240@240", "t2t_vit_14", "sret_s", "soft_tiny", "vir_s16",
           "shiftadd_pvt_v2_b0")


def _override(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep:
    raise ValueError(f"--models: override {text!r} is not KEY=VALUE")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT))
  parser.add_argument("--image_size", type=int, default=224)
  args = parser.parse_args(argv)
  print("| model | GMACs (XLA) |\n|---|---:|")
  for entry in filter(None, args.models.split(",")):
    name, *overrides = entry.split("/")
    name, _, size = name.partition("@")
    size = int(size) if size else args.image_size
    model = vitjax.create_model(name, **dict(_override(o) for o in overrides))
    if "dwconv_impl" in vitjax.models.layers.module_fields(type(model)):
      model = model.clone(dwconv_impl="xla")
    shape = (size, size, 3)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    label = "/".join([name, *overrides]) + ("" if size == 224 else f" ({size} px)")
    print(f"| {label} | {train.gmacs(model, variables, shape):.2f} |", flush=True)


if __name__ == "__main__":
  main()
