"""big_vision / vit_jax `.npz` ViT checkpoints -> vitjax variables.

    model, variables, meta = vitjax.convert.from_big_vision_npz("B_16-i21k.npz", "vit_b16")

vitjax's ViT keeps vit_jax's parameter names (DESIGN.md, decision 9), so the mapping is the
identity on names ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', ...). Three layouts of
the learned position table exist and are all accepted:

  * vit_jax (and timm-style): `Transformer/posembed_input/pos_embedding`, shape (1, 1 + N, D),
    the first row belonging to the CLS token (CLS is concatenated, then positions are added);
  * big_vision: `pos_embedding` at the root, shape (1, N, D), with NO CLS row (positions are
    added to the patches, then CLS is concatenated). vitjax adds its (1, 1 + N, D) table after
    the concatenation, so the converter prepends a zero row: CLS then gets no position, exactly
    as in big_vision;
  * older big_vision: `Transformer/pos_embedding`, either of the two shapes above.

A checkpoint with `cls` becomes a pool='tok' model, one without it pool='gap' (big_vision's
default). Keys may carry a leading 'params/' (big_vision's own saves) and a scanned encoder
(`Transformer/encoderblock/...` with a leading depth axis) is unstacked. Anything vitjax's ViT has
no place for (a MAP head, `pre_logits`, ...) is reported in one ValueError, never dropped.

Numerics: big_vision and vit_jax use Flax's default `nn.gelu`, the tanh approximation, whereas
vitjax (like timm) uses the exact erf GELU; converted logits differ from big_vision's by that
approximation (about 1e-3 relative), not by any parameter.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.convert import mapping
from vitjax.convert.mapping import Converted
from vitjax.models.registry import create_model

# big_vision's variant names -> vitjax's registered ViTs.
VARIANTS = {"Ti/16": "vit_ti16", "S/16": "vit_s16", "B/16": "vit_b16", "L/16": "vit_l16",
            "B/32": "vit_b32"}
POSEMB = "Transformer/posembed_input/pos_embedding"
_POSEMB_KEYS = (POSEMB, "pos_embedding", "Transformer/pos_embedding")
# The whole table: a vitjax ViT parameter has the same name as in the checkpoint.
RULES = (mapping.rule(r"(.+)", "{0}"),)


def _unstack_scanned(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'Transformer/encoderblock/X' (depth, ...) -> 'Transformer/encoderblock_{i}/X' (...)."""
  out = {}
  for key, value in state.items():
    m = re.fullmatch(r"(.*)encoderblock/(.+)", key)
    if m is None:
      out[key] = value
      continue
    for i, layer in enumerate(value):
      out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = layer
  return out


def normalize(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """Puts a big_vision / vit_jax flat state dict into vitjax's layout; returns (state, pool)."""
  state = {k: mapping.to_numpy(v) for k, v in state.items()}
  if state and all(k.startswith("params/") for k in state):
    state = {k[len("params/"):]: v for k, v in state.items()}
  state = _unstack_scanned(state)
  found = [k for k in _POSEMB_KEYS if k in state]
  if len(found) != 1:
    raise ValueError(f"Expected exactly one position table among {list(_POSEMB_KEYS)}; found "
                     f"{found or 'none'} (keys: {sorted(state)[:8]} ...)")
  posemb = state.pop(found[0])
  pool = "tok" if "cls" in state else "gap"
  n = posemb.shape[1]
  if pool == "tok" and math.isqrt(n) ** 2 == n:
    # big_vision layout (no CLS row): CLS gets a zero position, as it got none before.
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  state[POSEMB] = posemb
  return state, pool


def _overrides(state: Mapping[str, np.ndarray], pool: str):
  if "embedding/kernel" not in state or "head/kernel" not in state:
    raise ValueError("Not a big_vision / vit_jax ViT checkpoint: 'embedding/kernel' or "
                     f"'head/kernel' is missing (keys: {sorted(state)[:8]} ...)")
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
  return {"num_classes": state["head/kernel"].shape[-1], "pool": pool,
          "depth": max(blocks) + 1 if blocks else 0}


def _example_input(state: Mapping[str, np.ndarray], pool: str, model):
  channels = state["embedding/kernel"].shape[2]
  num_tokens = state[POSEMB].shape[1] - (1 if pool == "tok" else 0)
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens:
    raise ValueError(f"The position table holds {num_tokens} patch positions, not a square grid")
  size = grid * model.patch_size
  return (1, size, size, channels)


def from_big_vision_state(state: Mapping[str, Any], model_name: str, *,
                          source: str = "big_vision", **overrides) -> Converted:
  """Like `from_big_vision_npz` on an already loaded flat ('/'-joined keys) state dict."""
  vitjax_name = VARIANTS.get(model_name, model_name)
  state, pool = normalize(state)
  overrides = {**_overrides(state, pool), **overrides}
  model = create_model(vitjax_name, **overrides)
  image_shape = _example_input(state, pool, model)
  target = mapping.abstract_params(model, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  params = mapping.apply_rules(state, RULES, target,
                               what=f"{source} checkpoint -> vitjax {vitjax_name!r}")
  meta = {"source": "big_vision", "source_model": source, "model_name": vitjax_name,
          "model_overrides": dict(overrides), "image_size": list(image_shape[1:3])}
  return Converted(model, {"params": params}, meta)


def from_big_vision_npz(path: str, model_name: str, **overrides) -> Converted:
  """Converts a big_vision / vit_jax ViT `.npz` checkpoint (layouts: see the module docstring).

  Args:
    path: the `.npz` file (flat '/'-joined parameter names).
    model_name: the vitjax ViT it holds ('vit_b16', ...) or big_vision's variant name ('B/16').
      Classes, depth, pooling and input size are read from the checkpoint.
    **overrides: extra `create_model` fields (drop_path=0.1, attn_impl='auto', num_heads=...).

  Returns:
    `Converted(model, variables, meta)`.
  """
  with np.load(path, allow_pickle=False) as npz:
    state = {k: npz[k] for k in npz.files}
  return from_big_vision_state(state, model_name, source=os.path.basename(path), **overrides)
