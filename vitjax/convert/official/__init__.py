"""Official (the authors' own) PyTorch state dicts -> vitjax variables.

    import torch, vitjax.convert
    state = torch.load("hornet_tiny_7x7.pth", map_location="cpu", weights_only=True)["model"]
    model, variables, meta = vitjax.convert.from_official(state, "hornet_t")
    logits = model.apply(variables, images_nhwc)      # the official model's logits

The released checkpoints of a paper's own repository keep that repository's key names, which
neither timm nor transformers share. Each supported repository is one `Family` (one module of this package) in
`FAMILIES`: a regular expression that recognises its state dicts, the vitjax models it covers
(with the official constructor names, which `name` may also be), a table of renaming `Rule`s
whose targets carry their collection ('params/...' or 'batch_stats/...'), and a function that
reads the create_model overrides (depths, widths, classes, ...) off the weights. Adding a family
is adding one module and its entry below. Conversion is strict, as `from_timm`: keys that fit no rule, missing
parameters and shape mismatches are reported together in one ValueError, and a state dict of
another family is named as such.

The families and the official code their key names come from (commit ids of the code the golden
fixtures in tests/golden/ were made with are stored in each fixture):
  hornet       raoyongming/HorNet, hornet.py                     hornet_{t,s,b}[_gf]
  spectformer  badripatro/SpectFormers, vanilla_architecture      spectformer_s
  cvt          microsoft/CvT, lib/models/cls_cvt.py               cvt_13, cvt_21, cvt_w24
  rmt          qhfan/RMT, classfication_release/RMT.py (T) and
               classification_token_label_release/RMT.py (S/B/L)  rmt_t, rmt_s, rmt_b, rmt_l
  cswin        microsoft/CSWin-Transformer, models/cswin.py       cswin_{tiny,small,base}_224
  sret         szq0214/SReT, SReT.py                              sret_t, sret_lt, sret_s
  t2t          yitu-opensource/T2T-ViT, models/t2t_vit.py          t2t_vit_{7,10,12,14,19,24},
                                                                  t2t_vit_t_{14,19,24}
  soft         fudan-zvg/SOFT, models/softmax_free_vision_transformer.py
                                                                  soft_{tiny,small,medium,large,huge}
  resformer    ruitian12/resformer, image_classification/models.py
                                                                  resformer_{tiny,small,base}_patch16
  dtn          wqshao126/DTN, models/vit_norm_mix.py (+ normkit/norms/dtn.py)
                                                                  vit_ti16_star_dtn

Layout differences the rules undo: torch Linear (out, in) -> Flax kernel (in, out); Conv2d
(O, I, kh, kw) -> (kh, kw, I, O); a 1x1 Conv2d -> a Dense kernel; a depthwise Conv2d (C, 1, k, k)
-> (k, k, C) or (k, k, 1, C), whichever the vitjax layer holds; HorNet's GF filter (C, h, w, 2) ->
(h, w, C, 2); BatchNorm running statistics -> 'batch_stats'.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.convert import mapping
from vitjax.convert.mapping import Converted
from vitjax.convert.official import cswin, cvt, dtn, hornet, resformer, rmt, soft, sret
from vitjax.convert.official import spectformer, t2t
from vitjax.convert.official.family import Family
from vitjax.models.registry import create_model

# The table. A family added here is all from_official needs.
FAMILIES: dict[str, Family] = {
    f.name: f for f in (hornet.FAMILY, spectformer.FAMILY, cvt.FAMILY, rmt.FAMILY, cswin.FAMILY,
                        t2t.FAMILY, sret.FAMILY, soft.FAMILY, resformer.FAMILY,
                        dtn.FAMILY)}



def supported_models() -> list[str]:
  """vitjax model names `from_official` accepts (the official constructor names work too)."""
  return sorted(n for f in FAMILIES.values() for n in f.models)


def resolve(name: str) -> tuple[Family, str]:
  """vitjax name or official constructor name -> (family, vitjax name)."""
  for family in FAMILIES.values():
    if name in family.models:
      return family, name
    for vitjax_name, official in family.models.items():
      if name in official:
        return family, vitjax_name
  official = sorted(o for f in FAMILIES.values() for names in f.models.values() for o in names)
  raise choices.unknown("name", name, supported_models() + official)


def _is_family(state, family: Family) -> bool:
  return any(re.match(family.marker, k) for k in state)


def check_family(state: Mapping[str, Any], family: Family):
  """One clear error when `state` is not a state dict of `family` (naming the family it is)."""
  if _is_family(state, family):
    return
  others = [f for f in FAMILIES.values() if f is not family and _is_family(state, f)]
  hint = (f" It looks like an official {others[0].name} ({others[0].repository}) state dict; "
          f"convert it as one of {', '.join(sorted(others[0].models))}." if others else "")
  raise ValueError(
      f"Not an official {family.name} ({family.repository}) state dict: no key matches "
      f"{family.marker!r}.{hint} Found {len(state)} keys:"
      + mapping._short_list(sorted(state), limit=12))  # pylint: disable=protected-access


def abstract_variables(model, *example_args) -> dict[str, tuple[int, ...]]:
  """'collection/path' -> shape for every variable of the model (no allocation)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_args)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def from_official(state_dict: Mapping[str, Any], name: str, **overrides) -> Converted:
  """Converts an official state dict into a vitjax model and its variables (strict).

  Args:
    state_dict: official parameter name -> torch tensor or numpy array, as `model.state_dict()`
      of the official code or its released checkpoint files (unwrap {'model': ...} first, or
      read the file with `vitjax.convert.load_state_dict`).
    name: the vitjax model (e.g. 'hornet_t') or the official constructor ('hornet_tiny_7x7').
    **overrides: extra `create_model` fields (those the weights do not show, such as num_heads
      of a non-standard size; drop_path for fine-tuning). They win over what is read from the
      state dict; a size that disagrees with the weights is reported like any other mismatch.

  Returns:
    `Converted(model, variables, meta)`; variables = {'params': ...} plus 'batch_stats' for
    models with BatchNorm.

  Raises:
    ValueError: unknown name, a state dict of another family, or one message listing every key
      or shape that does not fit.
  """
  family, vitjax_name = resolve(name)
  check_family(state_dict, family)
  read = family.overrides(state_dict)
  default = create_model(vitjax_name)
  overrides = {**{k: v for k, v in read.items()
                  if k in family.always or getattr(default, k, None) != v}, **overrides}
  model = create_model(vitjax_name, **overrides)
  size = family.image_size(state_dict, model)
  target = abstract_variables(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  variables = mapping.apply_rules(
      state_dict, family.rules, target, ignore=family.ignore,
      what=f"official {family.name} ({family.repository}) -> vitjax {vitjax_name!r}")
  meta = {"source": "official", "source_model": f"{family.repository} {name}",
          "model_name": vitjax_name, "model_overrides": dict(overrides),
          "image_size": [size, size]}
  return Converted(model, variables, meta)
