"""'prope_attn': multi-head self-attention with per-token group-action positions (PRoPE / UCPE
form, `vitjax.ops.group_pe`), usable in any ViT:

    create_model('vit_nano4', mixer='prope_attn', mixer_kwargs=dict(transform='rope2d'),
                 posemb='none')

Each patch token t gets a transform T_t from its place on the grid; prefix tokens (CLS) get the
identity. q~ = T^T q, k~ = T^-1 k, v~ = T^-1 v, softmax attention, o = T o~, so logits and
outputs depend only on relative transforms T_i T_j^-1.

transform:
  'rope2d'      2-D RoPE over (row, col) on the whole head (d % 4 == 0), frequencies
                rope_base^(-k/(d/4)) (base 100, as RoPE-ViT's axial form).
  'ray'         UCPE's ray frames on the whole head (d % 4 == 0): the tokens are pixels of a pinhole
                camera with horizontal field of view `fov` degrees (fixed, so a larger image
                samples the same view more finely), identity extrinsics: the logits see the
                relative rotation between the tokens' rays. Cameras of your own (extrinsics,
                fisheye directions) go through `vitjax.ops.group_pe.ray_transforms` and
                `prope_attention` directly.
  'ray_rope2d'  the first half of each head gets the ray frames, the second half 2-D RoPE
                (d % 8 == 0), as PRoPE / UCPE split the head between camera and RoPE.
values=False transforms only q and k (with 'rope2d': plain RoPE). Positions given to the mixer
(`positions=` (B, h*w, 2), e.g. from posemb='rpe2d' with kind='rope') replace the grid's integer
(row, col) in the RoPE part.
Parameters: 'query', 'key', 'value', 'out' as in 'mhsa' (a ViT's attention weights load as is).
"""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import flax.linen as nn

from vitjax import choices, kernels
from vitjax.models.mixers import out_projection, qkv_projections
from vitjax.models.registry import register_mixer
from vitjax.ops import group_pe

TRANSFORMS = ("rope2d", "ray", "ray_rope2d")


def token_transforms(transform: str, grid, num_prefix: int, head_dim: int, *,
                     rope_base: float = 100.0, fov: float = 60.0,
                     positions=None) -> group_pe.Transforms:
  """The mixer's per-token transforms, (N, K, m, m) or (B, N, K, m, m) with `positions`."""
  choices.check("mixer_kwargs.transform", transform, TRANSFORMS)
  h, w = grid
  need = 8 if transform == "ray_rope2d" else 4
  if head_dim % need:
    raise ValueError(f"mixer 'prope_attn' with transform={transform!r} needs a head dim (width "
                     f"/ num_heads) divisible by {need}, got {head_dim}")
  if positions is None:
    positions = group_pe.grid_positions(grid)
  elif positions.shape[-2:] != (h * w, 2):
    raise ValueError(f"positions must be (B, h*w, 2) = (B, {h * w}, 2) for grid {tuple(grid)}, "
                     f"got {positions.shape}")
  rope_dim = {"rope2d": head_dim, "ray": 0, "ray_rope2d": head_dim // 2}[transform]
  parts, dims = [], []
  if transform != "rope2d":
    rays = group_pe.pinhole_rays(grid, math.radians(fov))
    parts.append(group_pe.ray_transforms(rays))
    dims.append(head_dim - rope_dim)
  if rope_dim:
    parts.append(group_pe.rope2d(positions, group_pe.rope_freqs(rope_dim, rope_base)))
    dims.append(rope_dim)
  t = parts[0] if len(parts) == 1 else group_pe.concat_blocks(*parts, head_dims=dims)
  return group_pe.with_prefix(t, num_prefix)


@register_mixer("prope_attn")
class GroupActionAttention(nn.Module):
  """Self-attention with per-token transforms; see the module docstring."""
  scope_name: ClassVar[str] = "MultiHeadDotProductAttention_0"
  needs_grid: ClassVar[bool] = True
  accepts_mask: ClassVar[bool] = True
  accepts_positions: ClassVar[bool] = True
  num_heads: int = 8
  transform: str = "rope2d"
  rope_base: float = 100.0
  fov: float = 60.0
  values: bool = True
  qkv_bias: bool = True
  attn_impl: str = "xla"
  dropout: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False, mask=None,
               positions=None):
    if not 0.0 < self.fov < 180.0:
      raise ValueError(f"mixer_kwargs.fov={self.fov!r}: allowed values are in (0, 180) degrees")
    q, k, v = qkv_projections(x, self.num_heads, qkv_bias=self.qkv_bias,
                              kernel_init=self.kernel_init)           # (B, N, H, d)
    if x.shape[1] != num_prefix + grid[0] * grid[1]:
      raise ValueError(f"mixer 'prope_attn' got {x.shape[1]} tokens for grid {tuple(grid)} and "
                       f"{num_prefix} prefix tokens")
    t = token_transforms(self.transform, grid, num_prefix, q.shape[-1], rope_base=self.rope_base,
                         fov=self.fov, positions=positions)
    attend = functools.partial(kernels.attention, impl=self.attn_impl)
    key_mask = None if mask is None else mask[:, None, None, :]
    y = group_pe.prope_attention(q, k, v, t, mask=key_mask, values=self.values, attend=attend)
    return out_projection(y, x.shape[-1], kernel_init=self.kernel_init, dropout=self.dropout,
                          train=train)
