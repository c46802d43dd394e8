"""ShiftAddViT's PVTv2 models (GATECH-EIC/ShiftAddViT, pvt/pvt_v2.py with the configs
configs/pvt_v2/pvt_v2_b{0,1,2}_LinAngular.py) on the multi-stage backbone.

Structure (NHWC here):
  stem      OverlapPatchEmbed: (2p-1)x(2p-1) conv, stride p = 4, padding p - 1, -> LayerNorm
            (eps 1e-5)                                                     (B, H/4, W/4, C1)
  stage i   (i > 0: 3x3 stride-2 conv, padding 1, -> LayerNorm) then depths[i] 'shift_mlp'
            blocks (LayerNorm eps 1e-6): 'shiftadd_attn' in stages 1..K-1, standard multi-head
            attention ('mhsa') in the last stage as the official Block does for every attention
            type but SRA; MLP fc1 -> DWConv3x3 -> GELU -> fc2 with ratio mlp_ratios[i]; the
            stage's LayerNorm (official norm{i}) after its last block.
  head      mean over the tokens -> Linear.
Features are the stem map and each stage's output after its norm (what PVTv2's dense-prediction
backbones pass on).

Variants and their parameter counts at 1000 classes, each equal to the official model's
`sum(p.numel() for p in model.parameters())` (measured by building the official code;
tests/test_shiftadd.py pins them; the hash state in 'ksh' is not counted: official buffers):
  shiftadd_pvt_v2_b0             MoE projections and MLPs (the full ShiftAddViT)   6,771,484
  shiftadd_pvt_v2_b0_linangular  dense projections and MLPs                        3,136,472
  shiftadd_pvt_v2_b1 / _linangular   (widths 64-128-320-512)             26,386,812 / 11,891,512
  shiftadd_pvt_v2_b2 / _linangular   (b1's widths, depths 3-4-6-3)       49,519,527 / 20,367,897
All use KSH codes (the official configs' attn_type='LinAngular'); `qk_quant='mean'` gives the
official LinAngularAttention_binary, which keeps no hash state, so the runner can train it
(configs/shiftadd.py). `attn_linear` / `mlp_linear` pick 'dense', 'shift' or 'moe'.
XLA GMACs at 224 px (`python -m experiments.gmacs`; both MoE experts run on every token and are
counted): b0 1.03, b0_linangular 0.57.

Against the official code (GATECH-EIC/ShiftAddViT @47671cf, every weight perturbed, random KSH
state, weights mapped by `vitjax.convert.shiftadd.official_variables`), largest logit difference
relative to the largest logit: b0_linangular at 224 px 4.4e-7; b0 4.9e-6 once the official MoE
combine's exp/log round trip is replaced by the identity it stands for (it returns
log(exp(y) + 2.2e-16), which departs from y below about -25 and overflows above 88; with these
random weights some expert outputs fall that low, and the unpatched official b0 differs by 6.9e-2);
reduced MoE models 2e-5, about one 16.16 fixed-point step (2^-16). The KSH fit equals the
official KernelSH fit to 2.4e-7 with the same anchors (codes identical).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import MultiStageModel, StageSpec, Tokens, check_per_stage
from vitjax.models.registry import register_model
from vitjax.models.shiftadd import LINEARS, QK_QUANTS, ShiftMlpBlock
from vitjax.ops import conv, shiftadd as ops

trunc_normal = nn.initializers.truncated_normal
# The official conv init: normal(0, sqrt(2 / fan_out)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ShiftAddPVT(MultiStageModel):
  """PVTv2 with ShiftAddViT's attention and MLPs (module docstring).

  Parameter tree: `stem/{conv,norm}`, `stages_{i}/downsample/{conv,norm}` (i > 0),
  `stages_{i}/blocks_{j}/{norm1,attn|MultiHeadDotProductAttention_0,norm2,mlp[,stage_norm]}`,
  `head`; hash state in 'ksh' under the same paths.
  """
  num_classes: int = 1000
  embed_dims: tuple[int, ...] = (32, 64, 160, 256)
  depths: tuple[int, ...] = (2, 2, 2, 2)
  num_heads: tuple[int, ...] = (1, 2, 5, 8)
  mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)
  patch_size: int = 4
  qk_quant: str = "ksh"
  attn_linear: str = "moe"
  mlp_linear: str = "moe"
  last_stage_mhsa: bool = True
  matmul_impl: str = "dot"
  moe_loss_weight: float = 0.01
  attn_kwargs: Any = None       # more 'shiftadd_attn' fields (nbits, num_anchors, topk, ...)
  dwconv_impl: str = "auto"
  dropout: float = 0.0
  drop_path: float = 0.0

  def check(self):
    check_per_stage(self, ("embed_dims", "num_heads", "mlp_ratios"))
    choices.check("qk_quant", self.qk_quant, QK_QUANTS)
    choices.check("attn_linear", self.attn_linear, LINEARS)
    choices.check("mlp_linear", self.mlp_linear, LINEARS)
    choices.check("matmul_impl", self.matmul_impl, ops.MATMUL_IMPLS)
    choices.check("dwconv_impl", self.dwconv_impl, conv.DWCONV_IMPLS)
    for field in ("depths", "embed_dims", "num_heads", "mlp_ratios"):
      if any(v <= 0 for v in getattr(self, field)):
        raise ValueError(f"ShiftAddPVT: {field}={tuple(getattr(self, field))}; allowed values "
                         "are positive")
    if self.patch_size < 1:
      raise ValueError(f"ShiftAddPVT: patch_size={self.patch_size}; allowed values are >= 1")
    for i, (width, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
      if width % heads:
        raise ValueError(f"ShiftAddPVT stage {i + 1}: embed_dims[{i}]={width} is not divisible "
                         f"by num_heads[{i}]={heads}")

  def stem_stride(self) -> int:
    return self.patch_size

  def stem(self, images, *, train: bool):
    k = 2 * self.patch_size - 1
    return layers.ConvNorm(self.embed_dims[0], stride=self.patch_size, kernel_size=k,
                           padding=k // 2, kernel_init=conv_init, name="stem")(images)

  def stage_mixer(self, i: int) -> tuple[str, dict[str, Any] | None]:
    if self.last_stage_mhsa and i == len(self.depths) - 1:
      return "mhsa", dict(kernel_init=trunc_normal(0.02))
    return "shiftadd_attn", dict(qk_quant=self.qk_quant, linear=self.attn_linear,
                                 matmul_impl=self.matmul_impl,
                                 moe_loss_weight=self.moe_loss_weight, **(self.attn_kwargs or {}))

  def stage_specs(self) -> tuple[StageSpec, ...]:
    specs = []
    for i, (depth, width, heads, ratio) in enumerate(
        zip(self.depths, self.embed_dims, self.num_heads, self.mlp_ratios)):
      mixer, mixer_kwargs = self.stage_mixer(i)
      specs.append(StageSpec(
          depth, width, block=ShiftMlpBlock,
          block_kwargs=dict(mlp_dim=int(width * ratio), num_heads=heads, mixer=mixer,
                            mixer_kwargs=mixer_kwargs, mlp_linear=self.mlp_linear, dwconv=True,
                            dwconv_impl=self.dwconv_impl, moe_loss_weight=self.moe_loss_weight,
                            dropout=self.dropout),
          downsample=None if i == 0 else "conv_norm",
          downsample_kwargs=None if i == 0 else dict(kernel_init=conv_init),
          block_cycle=tuple({"stage_norm": j == depth - 1} for j in range(depth))))
    return tuple(specs)

  def pool(self, tokens: Tokens, *, train: bool):
    return tokens.x.mean(axis=1)          # the last stage's norm is in its last block

  def head_init(self):
    return trunc_normal(0.02)


# The official configs: pvt_v2_b{0,1,2} with attn_type='LinAngular' (nbits 16, m 25, topk 10);
# the full ShiftAddViT adds --moe_attn --moe_mlp.
_SIZES = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
}
VARIANTS = {}
for _size, _fields in _SIZES.items():
  VARIANTS[f"shiftadd_pvt_v2_{_size}"] = dict(_fields, attn_linear="moe", mlp_linear="moe")
  VARIANTS[f"shiftadd_pvt_v2_{_size}_linangular"] = dict(_fields, attn_linear="dense",
                                                          mlp_linear="dense")


def _factory(variant, **overrides):
  kwargs = {**VARIANTS[variant], **overrides}
  layers.check_overrides(ShiftAddPVT, kwargs, what="ShiftAddPVT")
  for field in ("embed_dims", "depths", "num_heads", "mlp_ratios"):   # lists from JSON / flags
    if isinstance(kwargs.get(field), list):
      kwargs[field] = tuple(kwargs[field])
  return ShiftAddPVT(**kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
