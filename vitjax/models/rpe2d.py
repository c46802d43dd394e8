"""posemb='rpe2d': RPE-2D's randomized 2-D positions (Hou, Liu et al., 2025) as a ViT plug-in.

    model = vitjax.create_model('vit_nano4', posemb='rpe2d', posemb_kwargs=dict(range=14))

In training each example draws h sorted distinct row positions from {0..L-1} and w sorted
distinct column positions (`vitjax.ops.rpe2d.sample_positions`, the 'dropout' rng stream); at
evaluation the rows sit at the mean of those draws, (i + 1)(L + 1)/(h + 1) - 1, columns likewise
(`eval_positions`). So a grid larger than the training grid, up to L per side, gets positions of
the same range, interpolated rather than extrapolated. Nothing is learned: one set of parameters
serves every grid up to L x L.

Fields:
  range - L, the enlarged position range per axis (an int, or (L_h, L_w)). Default 32: about
          twice the 14 x 14 grid of a patch-16 ViT at 224 px, so such a model evaluates up to
          512 px. Set it to about twice your training grid side (e.g. 14 for a 7 x 7 grid); a
          grid larger than the range is an error.
  kind  - 'sincos' (default): the fixed 2-D sin-cos table of `posemb='sincos2d'` evaluated at
          the drawn coordinates and added to the patch tokens (prefix tokens get zeros).
          'rope': nothing is added; the (B, h*w, 2) coordinates go to
          `tokens.extra['positions']` for a mixer that takes them (the 'prope_attn' mixer's RoPE
          part, `vitjax.models.group_pe`).
  temperature - the sin-cos table's frequency base (10000, as 'sincos2d').

Per example, not per batch: every example of a step sees its own spacing, so one step covers
more of the position distribution (the draws cost one top-k over L per axis and example).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import plugins
from vitjax.ops import rpe2d as rpe2d_ops

KINDS = ("sincos", "rope")
POSITIONS = "positions"   # the key of tokens.extra that kind='rope' fills


@plugins.register_posemb("rpe2d")
class RandomizedPositions2D(nn.Module):
  """RPE-2D positions; see the module docstring for the fields and the eval spacing."""
  range: Any = 32
  kind: str = "sincos"
  temperature: float = 10_000.0

  def coords(self, batch: int, grid, *, train: bool):
    """(B or 1, h*w, 2) (row, col) of the patch tokens: drawn in training, fixed at eval."""
    (h, w), (lh, lw) = grid, rpe2d_ops.check_range(self.range, grid)
    if train:
      key_rows, key_cols = jax.random.split(self.make_rng("dropout"))
      rows = rpe2d_ops.sample_positions(key_rows, batch, h, lh)
      cols = rpe2d_ops.sample_positions(key_cols, batch, w, lw)
    else:
      rows, cols = rpe2d_ops.eval_positions(h, lh)[None], rpe2d_ops.eval_positions(w, lw)[None]
    return rpe2d_ops.grid_coords(rows, cols)

  def __call__(self, tokens, *, train: bool = False):
    choices.check("posemb_kwargs.kind", self.kind, KINDS)
    if tokens.grid is None:
      raise ValueError("posemb='rpe2d' needs tokens on a 2-D grid")
    x = tokens.x
    b, _, dim = x.shape
    if self.kind == "sincos" and dim % 4:
      raise ValueError(f"posemb='rpe2d' with kind='sincos' needs a width divisible by 4, got "
                       f"width={dim}")
    coords = self.coords(b, tokens.grid, train=train)
    if self.kind == "rope":
      coords = jnp.broadcast_to(coords, (b,) + coords.shape[1:])
      return tokens.replace(extra={**tokens.extra, POSITIONS: coords})
    pe = rpe2d_ops.sincos_2d(coords, dim, self.temperature).astype(x.dtype)   # (B|1, h*w, D)
    pe = jnp.broadcast_to(pe, (b,) + pe.shape[1:])
    pe = jnp.concatenate([jnp.zeros((b, tokens.num_prefix, dim), x.dtype), pe], axis=1)
    return tokens.replace(x=x + pe)
