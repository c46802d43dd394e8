"""ResFormer (Tian et al., "ResFormer: Scaling ViTs with Multi-Resolution Training", CVPR 2023):
a plain ViT whose positions are functions of the current token grid, so one set of weights runs
at any resolution (a multiple of the patch size).

  posemb='resformer'               - the global PE: DWConv3x3 of the DETR-style normalized 2-D
                                     sin-cos table of the current grid, added to the patch tokens
                                     (prefix tokens get 0). Any ViT takes it as a switch.
  mixer_kwargs=dict(local_pe=True) - the local PE inside 'mhsa': softmax(QK^T/sqrt(d)) V +
                                     DWConv3x3(V) (`vitjax.models.mixers`).

    model = vitjax.create_model('vit_s16', posemb='resformer', mixer_kwargs=dict(local_pe=True))

The registered `resformer_{tiny,small,base}_patch16` are the official models (ruitian12/resformer,
image_classification/models.py): vit_ti16 / vit_s16 / vit_b16 with both switches, CLS pooling,
LayerNorm eps 1e-6, no learned position table. Their weights load with
`vitjax.convert.from_official`. The math is in `vitjax.ops.resformer`. The multi-resolution
training recipe (replicas at 224/160/128 px with the scale-consistency loss) belongs to the runner.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import layers, plugins, vit
from vitjax.models.registry import register_model
from vitjax.ops import resformer as resformer_ops


def torch_conv_init(fan_in: int):
  """PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the official global PE
  keeps it), for kernels and biases alike."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@plugins.register_posemb("resformer")
class ResFormerPositions(nn.Module):
  """The global PE (module docstring): parameters `kernel` (3, 3, 1, D) and `bias` (D,) of the
  depthwise 3x3 convolution over the (h, w, D) sin-cos table (`resformer_ops.global_pe`).

  temperature / scale: the table's (10000 and 2*pi, as the official). Needs the tokens on a 2-D
  grid and a width divisible by 4.
  """
  temperature: float = 10_000.0
  scale: float = 2 * math.pi

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train
    if tokens.grid is None:
      raise ValueError("posemb='resformer' needs the tokens on a 2-D grid")
    x = tokens.x
    d = x.shape[-1]
    if d % 4:
      raise ValueError(f"posemb='resformer' needs a width divisible by 4 (sin and cos of each "
                       f"of two axes); got width={d}")
    kernel = self.param("kernel", torch_conv_init(9), (3, 3, 1, d))
    bias = self.param("bias", torch_conv_init(9), (d,))
    pe = resformer_ops.global_pe(tuple(tokens.grid), kernel.astype(x.dtype), bias.astype(x.dtype),
                                 temperature=self.temperature, scale=self.scale)
    pe = jnp.concatenate([jnp.zeros((tokens.num_prefix, d), x.dtype), pe], axis=0)
    return tokens.replace(x=x + pe[None])


# The official models: vitjax's ViT sizes of the same width, depth, heads and MLP.
VARIANTS = {"resformer_tiny_patch16": "vit_ti16", "resformer_small_patch16": "vit_s16",
            "resformer_base_patch16": "vit_b16"}


def _factory(name: str, **overrides):
  """vit.VARIANTS[...] with posemb='resformer' and the local PE; `mixer_kwargs` given by the
  caller are added to local_pe=True (a caller may still set local_pe=False)."""
  mixer_kwargs = {"local_pe": True, **dict(overrides.pop("mixer_kwargs", None) or {})}
  kwargs = {**vit.VARIANTS[VARIANTS[name]], "posemb": "resformer", "pool": "tok",
            "mixer_kwargs": mixer_kwargs, **overrides}
  layers.check_overrides(vit.VisionTransformer, kwargs, what="VisionTransformer")
  return vit.VisionTransformer(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
