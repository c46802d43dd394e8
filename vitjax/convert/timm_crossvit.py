"""timm's CrossViT state dicts: the renaming rules and what is read off the weights (the `crossvit`
entry of `vitjax.convert.timm.FAMILIES`; that module's docstring has the layout notes).

Each branch's position table (1, 1 + N_i, C_i) fixes its grid, so img_scale (and the 408 px
fine-tunes) are read off them; the official checkpoints' `pos_embed.i` / `cls_token.i` load like
timm's `pos_embed_i` / `cls_token_i`. The dagger patch embedding's Sequential convs `proj.{0,2,4}`
become `proj_{0,1,2}`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from vitjax.convert import mapping
from vitjax.convert.mapping import Rule, conv, linear, rule, split

Overrides = dict[str, Any]
ImageShape = tuple[int, int, int, int]

_CV_BLOCK = r"blocks\.(\d+)\."
_CV = "blocks_{0}/"
_CV_INNER = _CV_BLOCK + r"blocks\.(\d+)\.(\d+)\."
_CV_BRANCH = _CV + "branch{1}_{2}/"
_CV_ATTN = _CV_BRANCH + "attn/"
_CV_FUSION = _CV_BLOCK + r"fusion\.(\d+)\."


def _cv_pos_embeds(state: Mapping[str, Any]) -> list[tuple[int, ...]]:
  """Shapes (1, 1 + N_i, C_i) of the branches' position tables: timm's `pos_embed_i` or the
  official `pos_embed.i`."""
  keys = sorted((int(m.group(1)), k) for k in state
                if (m := re.fullmatch(r"pos_embed[._](\d+)", k)))
  return [tuple(state[k].shape) for _, k in keys] or [mapping.state_shape(state, "pos_embed_0", "timm CrossViT")]


def overrides(state: Mapping[str, Any]) -> Overrides:
  """Widths, depths, MLP ratios, patch sizes, the dagger embedding, img_scale (each branch's grid
  times its patch over branch 0's image) and classes, read off the weights. The heads cannot be
  read (pass num_heads for heads other than the registered variant's)."""
  tables = _cv_pos_embeds(state)
  n = len(tables)
  found: Overrides = {"embed_dim": tuple(t[2] for t in tables),
                      "multi_conv": "patch_embed.0.proj.0.weight" in state}
  convs = [f"patch_embed.{i}.proj.weight" for i in range(n)]
  if all(k in state for k in convs):
    found["patch_size"] = tuple(mapping.state_shape(state, k, "timm CrossViT")[2] for k in convs)
  depth: dict[tuple[int, int], int] = {}
  for k in state:
    if m := re.match(_CV_INNER, k):
      blk, i, j = (int(g) for g in m.groups())
      depth[blk, i] = max(depth.get((blk, i), 0), j + 1)
  if depth:
    found["depth"] = tuple(tuple(depth.get((b, i), 0) for i in range(n)) + (0,)
                           for b in range(max(b for b, _ in depth) + 1))
    fc1 = [f"blocks.0.blocks.{i}.0.mlp.fc1.weight" for i in range(n)]
    if all(k in state for k in fc1):
      found["mlp_ratio"] = tuple(state[k].shape[0] / c for k, c in zip(fc1, found["embed_dim"]))
  patches = found.get("patch_size", (12, 16))     # the dagger models' (their convs hide it)
  grids = [math.isqrt(t[1] - 1) for t in tables]
  if len(patches) == n and grids[0]:
    found["img_scale"] = tuple(g * p / (grids[0] * patches[0]) for g, p in zip(grids, patches))
  if "head.0.weight" in state:
    found["num_classes"] = mapping.state_shape(state, "head.0.weight", "timm CrossViT")[0]
  elif "norm.0.weight" in state:
    found["num_classes"] = 0
  return found


def example_input(state: Mapping[str, Any], model) -> ImageShape:
  """(1, s, s, C) with s = branch 0's grid (from its position table) times its patch size."""
  first = "patch_embed.0.proj.0.weight" if model.multi_conv else "patch_embed.0.proj.weight"
  size = math.isqrt(_cv_pos_embeds(state)[0][1] - 1) * model.patch_size[0]
  return (1, size, size, mapping.state_shape(state, first, "timm CrossViT")[1])


def _norm_linear(prefix: str, target: str) -> tuple[Rule, ...]:
  """A Sequential(LayerNorm, GELU, Linear) at `prefix` -> `target`/norm, `target`/dense."""
  return (rule(prefix + r"0\.weight", target + "norm/scale"),
          rule(prefix + r"0\.bias", target + "norm/bias"),
          rule(prefix + r"2\.weight", target + "dense/kernel", transform=linear),
          rule(prefix + r"2\.bias", target + "dense/bias"))


RULES = (
    rule(r"pos_embed[._](\d+)", "pos_embed_{0}"),
    rule(r"cls_token[._](\d+)", "cls_token_{0}"),
    rule(r"patch_embed\.(\d+)\.proj\.weight", "patch_embed_{0}/proj/kernel", transform=conv),
    rule(r"patch_embed\.(\d+)\.proj\.bias", "patch_embed_{0}/proj/bias"),
    *(rule(rf"patch_embed\.(\d+)\.proj\.{2 * c}\.{w}", f"patch_embed_{{0}}/proj_{c}/{t}",
           transform=conv if w == "weight" else mapping.copy)
      for c in range(3) for w, t in (("weight", "kernel"), ("bias", "bias"))),
    rule(_CV_INNER + r"(norm[12])\.weight", _CV_BRANCH + "{3}/scale"),
    rule(_CV_INNER + r"(norm[12])\.bias", _CV_BRANCH + "{3}/bias"),
    rule(_CV_INNER + r"attn\.qkv\.weight", _CV_ATTN + "query/kernel", _CV_ATTN + "key/kernel",
         _CV_ATTN + "value/kernel", transform=split(3, linear)),
    rule(_CV_INNER + r"attn\.qkv\.bias", _CV_ATTN + "query/bias", _CV_ATTN + "key/bias",
         _CV_ATTN + "value/bias", transform=split(3, mapping.copy)),
    rule(_CV_INNER + r"attn\.proj\.weight", _CV_ATTN + "out/kernel", transform=linear),
    rule(_CV_INNER + r"attn\.proj\.bias", _CV_ATTN + "out/bias"),
    rule(_CV_INNER + r"mlp\.fc1\.weight", _CV_BRANCH + "mlp/Dense_0/kernel", transform=linear),
    rule(_CV_INNER + r"mlp\.fc1\.bias", _CV_BRANCH + "mlp/Dense_0/bias"),
    rule(_CV_INNER + r"mlp\.fc2\.weight", _CV_BRANCH + "mlp/Dense_1/kernel", transform=linear),
    rule(_CV_INNER + r"mlp\.fc2\.bias", _CV_BRANCH + "mlp/Dense_1/bias"),
    *_norm_linear(_CV_BLOCK + r"projs\.(\d+)\.", _CV + "proj_{1}/"),
    *_norm_linear(_CV_BLOCK + r"revert_projs\.(\d+)\.", _CV + "revert_{1}/"),
    rule(_CV_FUSION + r"norm1\.weight", _CV + "fusion_{1}/norm/scale"),
    rule(_CV_FUSION + r"norm1\.bias", _CV + "fusion_{1}/norm/bias"),
    *(rule(_CV_FUSION + rf"attn\.{src}\.{w}", _CV + f"fusion_{{1}}/attn/{dst}/{t}",
           transform=linear if w == "weight" else mapping.copy)
      for src, dst in (("wq", "query"), ("wk", "key"), ("wv", "value"), ("proj", "out"))
      for w, t in (("weight", "kernel"), ("bias", "bias"))),
    rule(r"norm\.(\d+)\.weight", "norm_{0}/scale"),
    rule(r"norm\.(\d+)\.bias", "norm_{0}/bias"),
    rule(r"head\.(\d+)\.weight", "head_{0}/kernel", transform=linear),
    rule(r"head\.(\d+)\.bias", "head_{0}/bias"),
)
