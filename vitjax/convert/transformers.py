"""Hugging Face transformers state dicts -> vitjax variables.

    import torch, vitjax.convert
    from transformers import CvtForImageClassification
    state = CvtForImageClassification.from_pretrained("microsoft/cvt-13").state_dict()
    model, variables, meta = vitjax.convert.from_transformers(state, "cvt_13")
    logits = model.apply(variables, images_nhwc)      # transformers' logits on images_nchw

`variables` holds `params` and, for models with BatchNorm, `batch_stats` (the running mean and
variance; `num_batches_tracked` is ignored). Every supported architecture is one `Family` entry in
`FAMILIES`: the vitjax models it covers (with the hub checkpoints of each), ONE table of renaming
`Rule`s whose targets name the collection (`params/...` or `batch_stats/...`), and a function that
reads the create_model overrides off the state dict. Conversion is strict, as in `mapping.py`:
keys that fit no rule, missing variables and shape mismatches are reported together in one
ValueError, and a state dict of another family is refused with one message naming the family.

CvT differences the rules and overrides undo:
  * transformers' CvT MLP uses the exact GELU where the official code uses QuickGELU, so the
    converted model is built with `act='gelu'` (pass act='quick_gelu' to get the official one).
  * torch Linear (out, in) -> Flax Dense (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O),
    which for the depthwise projections is (C, 1, 3, 3) -> (3, 3, 1, C).
  * transformers' stage 0 embedding is vitjax's `stem`; stage i > 0's is `stages_i/downsample`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import choices
from vitjax.convert import mapping
from vitjax.convert.mapping import Converted, Rule, conv, linear, rule
from vitjax.models.registry import create_model

Overrides = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
  """One transformers architecture and how its state dicts map onto vitjax models."""
  name: str
  architecture: str                      # the transformers class whose state dict this reads
  marker: str                            # a key prefix every state dict of the family has
  models: Mapping[str, Sequence[str]]    # vitjax model name -> hub checkpoints of that size
  rules: Sequence[Rule]                  # targets are 'params/...' or 'batch_stats/...'
  overrides: Callable[[Mapping[str, Any]], Overrides]
  always: Sequence[str] = ("num_classes",)   # overrides kept in meta even when at their default
  ignore: Sequence[str] = ()


def _shape(state, key):
  return tuple(np.shape(state[key]))


# ---------------------------------------------------------------------------------------------
# CvT (CvtForImageClassification).

_HF_STAGE = r"cvt\.encoder\.stages\.(\d+)\."
_HF_LAYER = _HF_STAGE + r"layers\.(\d+)\."
_HF_EMBED = r"embedding\.convolution_embeddings\."
_BLOCK = "stages_{0}/blocks_{1}/"


def _cvt_rules() -> tuple[Rule, ...]:
  rules = []
  for stage, target in ((r"cvt\.encoder\.stages\.0\.", "params/stem/"),
                        (_HF_STAGE, "params/stages_{0}/downsample/")):
    rules += [
        rule(stage + _HF_EMBED + r"projection\.weight", target + "conv/kernel", transform=conv),
        rule(stage + _HF_EMBED + r"projection\.bias", target + "conv/bias"),
        rule(stage + _HF_EMBED + r"normalization\.weight", target + "norm/scale"),
        rule(stage + _HF_EMBED + r"normalization\.bias", target + "norm/bias"),
    ]
  rules.append(rule(_HF_STAGE + r"cls_token", "params/stages_{0}/cls_token"))
  attn = _HF_LAYER + r"attention\.attention\."
  for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
    src = attn + r"convolution_projection_" + theirs + r"\.convolution_projection\."
    dst = _BLOCK + "attn/conv_proj_" + ours + "/"
    rules += [
        rule(src + r"convolution\.weight", "params/" + dst + "conv/kernel", transform=conv),
        rule(src + r"normalization\.weight", "params/" + dst + "bn/scale"),
        rule(src + r"normalization\.bias", "params/" + dst + "bn/bias"),
        rule(src + r"normalization\.running_mean", "batch_stats/" + dst + "bn/mean"),
        rule(src + r"normalization\.running_var", "batch_stats/" + dst + "bn/var"),
        rule(attn + r"projection_" + theirs + r"\.weight",
             "params/" + _BLOCK + "attn/proj_" + ours + "/kernel", transform=linear),
        rule(attn + r"projection_" + theirs + r"\.bias",
             "params/" + _BLOCK + "attn/proj_" + ours + "/bias"),
    ]
  for src, dst in ((r"attention\.output\.dense", "attn/proj"),
                   (r"intermediate\.dense", "mlp/Dense_0"), (r"output\.dense", "mlp/Dense_1")):
    rules += [rule(_HF_LAYER + src + r"\.weight", "params/" + _BLOCK + dst + "/kernel",
                   transform=linear),
              rule(_HF_LAYER + src + r"\.bias", "params/" + _BLOCK + dst + "/bias")]
  for src, dst in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
    rules += [rule(_HF_LAYER + src + r"\.weight", "params/" + _BLOCK + dst + "/scale"),
              rule(_HF_LAYER + src + r"\.bias", "params/" + _BLOCK + dst + "/bias")]
  rules += [
      rule(r"layernorm\.weight", "params/norm/scale"),
      rule(r"layernorm\.bias", "params/norm/bias"),
      rule(r"classifier\.weight", "params/head/kernel", transform=linear),
      rule(r"classifier\.bias", "params/head/bias"),
  ]
  return tuple(rules)


def _cvt_overrides(state: Mapping[str, Any]) -> Overrides:
  """Sizes read off the weights: stages, depths, widths, embedding kernels, classes, MLP ratio,
  qkv bias, projection kernel and the class token. num_heads and the strides / paddings are not
  in the weights: they keep the variant's values unless given."""
  stages = sorted({int(m.group(1)) for k in state if (m := re.match(_HF_STAGE, k))})
  embed = "cvt.encoder.stages.{}.embedding.convolution_embeddings.projection.weight"
  if not stages or any(embed.format(i) not in state for i in stages):
    return {}   # the strict conversion lists what is missing
  found: Overrides = {"act": "gelu"}
  found["depths"] = tuple(
      1 + max((int(m.group(1)) for k in state
               if (m := re.match(rf"cvt\.encoder\.stages\.{i}\.layers\.(\d+)\.", k))), default=-1)
      for i in stages)
  found["dims"] = tuple(_shape(state, embed.format(i))[0] for i in stages)
  found["patch_sizes"] = tuple(_shape(state, embed.format(i))[-1] for i in stages)
  if "classifier.weight" in state:
    found["num_classes"] = _shape(state, "classifier.weight")[0]
  elif "layernorm.weight" in state:   # num_labels=0: transformers' head is an Identity
    found["num_classes"] = 0
  found["cls_token"] = f"cvt.encoder.stages.{stages[-1]}.cls_token" in state
  first = next((i for i, d in zip(stages, found["depths"]) if d), None)
  if first is not None:
    layer = f"cvt.encoder.stages.{first}.layers.0."
    fc1 = layer + "intermediate.dense.weight"
    if fc1 in state:
      found["mlp_ratio"] = _shape(state, fc1)[0] / found["dims"][stages.index(first)]
    found["qkv_bias"] = layer + "attention.attention.projection_query.bias" in state
    dw = (layer + "attention.attention.convolution_projection_query.convolution_projection."
          "convolution.weight")
    if dw in state:
      found["kernel_size"] = _shape(state, dw)[-1]
  return found


FAMILIES: dict[str, Family] = {
    "cvt": Family(
        name="cvt",
        architecture="CvtForImageClassification",
        marker="cvt.encoder.stages.",
        models={
            "cvt_13": ("microsoft/cvt-13", "microsoft/cvt-13-384", "microsoft/cvt-13-384-22k"),
            "cvt_21": ("microsoft/cvt-21", "microsoft/cvt-21-384", "microsoft/cvt-21-384-22k"),
            "cvt_w24": ("microsoft/cvt-w24-384-22k",),
        },
        rules=_cvt_rules(),
        overrides=_cvt_overrides,
        always=("num_classes", "act"),
        ignore=(r".*\.num_batches_tracked",)),
}


def supported_models() -> list[str]:
  """vitjax model names `from_transformers` accepts (hub checkpoint names work too)."""
  return sorted(n for f in FAMILIES.values() for n in f.models)


def resolve(name: str) -> tuple[Family, str, str | None]:
  """vitjax name or hub checkpoint name -> (family, vitjax name, hub name or None)."""
  for family in FAMILIES.values():
    if name in family.models:
      return family, name, None
    for vitjax_name, hub in family.models.items():
      if name in hub:
        return family, vitjax_name, name
  hub = sorted(h for f in FAMILIES.values() for names in f.models.values() for h in names)
  raise choices.unknown("name", name, supported_models() + hub)


def _check_family(state: Mapping[str, Any], family: Family):
  if not any(k.startswith(family.marker) for k in state):
    others = [f.name for f in FAMILIES.values() if f is not family
              and any(k.startswith(f.marker) for k in state)]
    hint = f" It looks like a {others[0]} state dict." if others else ""
    raise ValueError(
        f"Not a transformers {family.name} ({family.architecture}) state dict: no key starts "
        f"with {family.marker!r}.{hint} Found {len(state)} keys:"
        + mapping._short_list(sorted(state), limit=12))  # pylint: disable=protected-access


def abstract_variables(model, *example_args, **example_kwargs) -> dict[str, tuple[int, ...]]:
  """'collection/path' -> shape for every variable the model has (no allocation)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_args, **example_kwargs)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def from_transformers(state_dict: Mapping[str, Any], name: str, **overrides) -> Converted:
  """Converts a transformers state dict into a vitjax model and its variables (strict).

  Args:
    state_dict: transformers parameter name -> torch tensor or numpy array, as from
      `model.state_dict()` (buffers included) or a checkpoint file.
    name: the vitjax model (e.g. 'cvt_13') or a hub checkpoint name ('microsoft/cvt-13').
    **overrides: extra `create_model` fields (e.g. num_heads for a non-standard config, which
      the weights do not show; drop_path for fine-tuning). They win over what is read from the
      state dict; a size that disagrees with the weights is reported like any other mismatch.

  Returns:
    `Converted(model, variables, meta)`; variables = {'params': ..., 'batch_stats': ...}.

  Raises:
    ValueError: unknown name, a state dict of another family, or one message listing every key
      or shape that does not fit.
  """
  family, vitjax_name, hub_name = resolve(name)
  _check_family(state_dict, family)
  read = family.overrides(state_dict)
  default = create_model(vitjax_name)
  overrides = {**{k: v for k, v in read.items()
                  if k in family.always or getattr(default, k, None) != v}, **overrides}
  model = create_model(vitjax_name, **overrides)
  stride = max(f.stride for f in model.feature_info())
  image_shape = (1, 2 * stride, 2 * stride, 3)
  target = abstract_variables(model, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  variables = mapping.apply_rules(
      state_dict, family.rules, target, ignore=family.ignore,
      what=f"transformers {family.architecture} -> vitjax {vitjax_name!r}")
  meta = {"source": "transformers", "source_model": hub_name or family.architecture,
          "model_name": vitjax_name, "model_overrides": dict(overrides),
          # No position table: any multiple of the total stride fits; 224 is the
          # released checkpoints' training size (384 for the '-384' ones).
          "image_size": [384, 384] if hub_name and "384" in hub_name else [224, 224]}
  return Converted(model, variables, meta)
