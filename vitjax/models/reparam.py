"""Depth by structural reparameterization (Zhou, Chaudhary, Datta, 2025): train a shallow ViT
whose blocks hold B parallel branches, then merge every block, exactly, into one wide ViT block.

Block 'vit_parallel' (`ParallelBlock`): one norm per sub-block, shared by the branches,

    x <- x + DropPath(sum_b MHSA_b(LN_0(x))),     x <- x + DropPath(sum_b FFN_b(LN_1(x))),

each MHSA_b a full-size 'mhsa' (num_heads heads of width d) and each FFN_b a full-size MLP
(mlp_dim hidden units):

    model = vitjax.create_model('vit_ti16', depth=6, block='vit_parallel',
                                block_kwargs=dict(branches=3))

`merge(model, variables) -> (plain_model, plain_variables)` turns such a ViT into the plain ViT
that computes the same function (up to float rounding) with B*H heads and B*F hidden units:

    FFN:  sum_b [s(y W1^b + b1^b) W2^b + b2^b]
            = s(y [W1^1 ... W1^B] + [b1^1 ... b1^B]) [W2^1; ...; W2^B] + sum_b b2^b
          (W1^b (D, F) side by side along the hidden axis, W2^b (F, D) stacked along it; s = GELU)
    MHSA: the heads of all branches side by side (query/key/value kernels (D, H, d) and biases
          (H, d) concatenated along H, out kernels (H, d, D) concatenated along H, out biases
          summed): each head attends on its own, so the sum over branches of the per-branch out
          projections is one out projection over all B*H heads.

Parameters. Branch b of block k is `Transformer/encoderblock_{k}/MultiHeadDotProductAttention_{b}`
and `.../MlpBlock_{b}` (vit_jax's names with the branch as index); the norms are `LayerNorm_0` /
`LayerNorm_1` as in the plain block. With branches=1 the block is the plain 'vit' block, names
included. The merged model is `create_model(same name, <same overrides>, block='vit',
num_heads=B*H, mlp_dim=B*F, mixer_kwargs=dict(head_dim=d))` (built here as `model.clone(...)`,
which is that), so every other switch (pool, patch size, posemb, norm, token reduction) is kept.

In training, dropout draws independent masks per branch before the sum, so train-mode outputs of
the two forms agree in distribution, not draw for draw; at eval (and with dropout 0) they agree.
Drop-path acts on the branch sum, as in the merged block.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers, plugins
from vitjax.models.backbone import call_mixer
from vitjax.models.mixers import MultiHeadSelfAttention
from vitjax.models.registry import display_name, get_block, get_mixer, register_block
from vitjax.models.vit import VisionTransformer

ATTN = "MultiHeadDotProductAttention_{b}"   # branch b's MHSA in a block
MLP = "MlpBlock_{b}"                          # branch b's FFN in a block


def check_branches(branches) -> int:
  if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
    raise ValueError(f"branches={branches!r}: the 'vit_parallel' block needs an integer >= 1 "
                     "(e.g. block_kwargs=dict(branches=3))")
  return branches


def check_mixer(mixer, mixer_kwargs=None) -> None:
  if getattr(get_mixer(mixer), "func", get_mixer(mixer)) is not MultiHeadSelfAttention:
    raise ValueError(f"mixer={display_name(mixer)!r}: the 'vit_parallel' block merges attention "
                     "branches by concatenating heads, which only 'mhsa' has; allowed values: mhsa")
  if (mixer_kwargs or {}).get("local_pe"):
    raise ValueError("mixer_kwargs local_pe=True: each branch's local PE kernel is shared over its own "
                     "heads, so concatenated heads cannot hold them; the 'vit_parallel' block allows "
                     "local_pe=False only")


@register_block("vit_parallel")
class ParallelBlock(nn.Module):
  """Pre-norm block with `branches` parallel MHSA and FFN branches on one shared normalized input
  (see the module docstring). Fields as the 'vit' block's, plus `branches` (B >= 1)."""
  mlp_dim: int
  num_heads: int
  branches: int | None = None
  mixer: Any = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  norm: Any = "ln"
  norm_kwargs: Any = None

  def _attention(self, b: int) -> nn.Module:
    cls = get_mixer(self.mixer)
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    kwargs = {k: v for k, v in shared.items() if k in layers.module_fields(cls)}
    kwargs.update(self.mixer_kwargs or {})
    layers.check_overrides(cls, kwargs, what=f"mixer {display_name(self.mixer)!r}")
    return cls(**kwargs, name=ATTN.format(b=b))

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    branches = check_branches(self.branches)
    check_mixer(self.mixer, self.mixer_kwargs)
    x = tokens.x
    y = plugins.make_norm(self.norm, "LayerNorm_0", self.norm_kwargs)(x, tokens=tokens)
    y = sum(call_mixer(self._attention(b), y, tokens, train=train) for b in range(branches))
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = plugins.make_norm(self.norm, "LayerNorm_1", self.norm_kwargs)(x, tokens=tokens)
    y = sum(layers.MlpBlock(self.mlp_dim, dropout=self.dropout, name=MLP.format(b=b))(
        y, train=train) for b in range(branches))
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return tokens.replace(x=x)


# ---------------------------------------------------------------------------------------------
# The merge.

def merge_attention(branches: list[Mapping[str, Any]]) -> dict[str, Any]:
  """B 'mhsa' parameter dicts (query/key/value kernels (D, H, d), biases (H, d); out kernel
  (H, d, D), bias (D,)) -> one with B*H heads."""
  out = {}
  for proj in ("query", "key", "value"):
    out[proj] = {k: jnp.concatenate([p[proj][k] for p in branches], axis=-2 if k == "kernel"
                                    else 0) for k in branches[0][proj]}
  out["out"] = {"kernel": jnp.concatenate([p["out"]["kernel"] for p in branches], axis=0)}
  if "bias" in branches[0]["out"]:
    out["out"]["bias"] = sum(p["out"]["bias"] for p in branches)
  return out


def merge_mlp(branches: list[Mapping[str, Any]]) -> dict[str, Any]:
  """B MlpBlock parameter dicts (Dense_0: W1 (D, F), b1 (F,); Dense_1: W2 (F, D), b2 (D,)) ->
  one with B*F hidden units: [W1^1 ... W1^B], [b1^1 ... b1^B], [W2^1; ...; W2^B], sum_b b2^b."""
  return {"Dense_0": {"kernel": jnp.concatenate([p["Dense_0"]["kernel"] for p in branches], 1),
                      "bias": jnp.concatenate([p["Dense_0"]["bias"] for p in branches], 0)},
          "Dense_1": {"kernel": jnp.concatenate([p["Dense_1"]["kernel"] for p in branches], 0),
                      "bias": sum(p["Dense_1"]["bias"] for p in branches)}}


def merge_block(params: Mapping[str, Any], branches: int, *, where: str = "block") -> dict:
  """One 'vit_parallel' block's params -> the plain 'vit' block's (norms copied unchanged)."""
  attn = [ATTN.format(b=b) for b in range(branches)]
  mlp = [MLP.format(b=b) for b in range(branches)]
  expected = {"LayerNorm_0", "LayerNorm_1", *attn, *mlp}
  if set(params) != expected:
    raise ValueError(f"{where}: expected the parameters {sorted(expected)} of a 'vit_parallel' "
                     f"block with branches={branches}; got {sorted(params)}")
  return {"LayerNorm_0": params["LayerNorm_0"], "LayerNorm_1": params["LayerNorm_1"],
          ATTN.format(b=0): merge_attention([params[n] for n in attn]),
          MLP.format(b=0): merge_mlp([params[n] for n in mlp])}


def check_model(model) -> int:
  """The branch count B of a ViT with 'vit_parallel' blocks; a clear error for anything else."""
  if not isinstance(model, VisionTransformer):
    raise ValueError(f"merge takes a VisionTransformer built with block='vit_parallel' (e.g. "
                     f"create_model('vit_ti16', block='vit_parallel', block_kwargs=dict("
                     f"branches=3))); got {type(model).__name__}")
  if getattr(get_block(model.block), "func", get_block(model.block)) is not ParallelBlock:
    raise ValueError(f"block={display_name(model.block)!r}: merge needs a ViT whose blocks are "
                     "'vit_parallel' (allowed values: vit_parallel)")
  check_mixer(model.mixer, model.mixer_kwargs)
  return check_branches(dict(model.block_kwargs or {}).get("branches"))


def merged_model(model: VisionTransformer) -> VisionTransformer:
  """The plain ViT a 'vit_parallel' ViT merges into: B*H heads of the same width d, B*F hidden
  units, every other field kept (`create_model(same name, ..., block='vit', num_heads=B*H,
  mlp_dim=B*F, mixer_kwargs=dict(head_dim=d))`)."""
  branches = check_model(model)
  mixer_kwargs = dict(model.mixer_kwargs or {})
  head_dim = mixer_kwargs.get("head_dim") or model.width // model.num_heads
  block_kwargs = {k: v for k, v in dict(model.block_kwargs).items() if k != "branches"}
  return model.clone(block="vit", block_kwargs=block_kwargs or None,
                     num_heads=branches * model.num_heads, mlp_dim=branches * model.mlp_dim,
                     mixer_kwargs={**mixer_kwargs, "head_dim": head_dim})


def merge(model: VisionTransformer, variables: Mapping[str, Any]):
  """(ViT with 'vit_parallel' blocks, its variables) -> (plain ViT, its variables), same function.

  Collections other than 'params' (none for the built-in norms) are passed on unchanged: the
  norms keep their names and the branches hold no other state.
  """
  branches = check_model(model)
  params = flax.core.unfreeze(variables["params"])
  encoder = dict(params["Transformer"])
  names = [f"encoderblock_{k}" for k in range(model.depth)]
  missing = [name for name in names if name not in encoder]
  if missing:
    raise ValueError(f"params['Transformer'] has no {', '.join(map(repr, missing))}, but the "
                     f"model has depth {model.depth}")
  for name in names:
    encoder[name] = merge_block(encoder[name], branches, where=f"Transformer/{name}")
  params["Transformer"] = encoder
  out = {**variables, "params": params}
  if isinstance(variables, flax.core.FrozenDict):
    out = flax.core.freeze(out)
  return merged_model(model), out
