"""ShiftAddViT weights: a trained vitjax ViT reparameterized into its ShiftAdd form, and the
official ShiftAddViT PVTv2 state dicts (GATECH-EIC/ShiftAddViT) -> vitjax variables.

ViT -> ShiftAdd (the paper starts from pretrained ViTs rather than training from scratch):

    from vitjax.convert import shiftadd
    model = vitjax.create_model("vit_nano4", **shiftadd.vit_overrides(), num_classes=10)
    variables = shiftadd.from_vit(vit_variables["params"], model.init(key, images))
    variables = vitjax.models.shiftadd.fit_ksh(model, variables, images, jax.random.key(1))

Each linear layer of the ViT fills its counterpart as the official fine-tuning script does
(pvt/main.py): a dense layer is copied; a shift layer gets sign(W) and round(log2|W|) (the
nearest power of two, `ops.shiftadd.shift_from_weight`) and the bias; a MoE layer copies W into
its multiply expert and the shift form into its shift expert. In 'shiftadd_attn' the shared
`to_qk` takes the query projection and `to_v` the value projection (the official mapping from
MSA weights); 'mean' binarization's fused `qkv` takes [query, key, value]. What has no source
(the routers `gate`, the 9x1 `dconv` on V, the KSH state) keeps the target model's fresh
initialisation, as in the official code; fit the KSH state next (`fit_ksh`).

Official PVTv2 state dicts: `official_variables(state_dict, model)` maps the official keys
(`patch_embed{s}`, `block{s}.{j}.{attn,mlp,...}`, MoE `gate.gate` / `experts.{0,1}`, KSH buffers
`attn.qk_quant.ksh.{A,mvec,anchor}`, `norm{s}`, `head`) onto a `vitjax.models.pvt.ShiftAddPVT`,
strictly (`vitjax.convert.mapping.apply_rules`). The authors have not released checkpoints; this
is what the parity checks against the official code use.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.convert import mapping
from vitjax.convert.mapping import conv, linear, rule
from vitjax.convert.official import abstract_variables
from vitjax.models.shiftadd import ShiftMlpBlock
from vitjax.ops import shiftadd as ops


def vit_overrides(*, qk_quant: str = "ksh", attn_linear: str = "moe", mlp_linear: str = "moe",
                  **mixer_kwargs) -> dict[str, Any]:
  """`create_model` fields that turn a registered ViT into its ShiftAdd form: 'shift_mlp'
  blocks (MLP of kind `mlp_linear`, no convolution) around 'shiftadd_attn'."""
  return dict(block=functools.partial(ShiftMlpBlock, mlp_linear=mlp_linear),
              mixer="shiftadd_attn",
              mixer_kwargs=dict(qk_quant=qk_quant, linear=attn_linear, **mixer_kwargs))


def _fill_linear(target: dict, kernel, bias, where: str) -> dict:
  """A linear layer's target subtree ('dense': kernel/bias; 'shift': shift/sign/bias; 'moe':
  gate/experts_0/experts_1) filled from a dense (in, out) kernel and bias; gates kept."""
  kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
  if "experts_0" in target:
    return {**target, "experts_0": _fill_linear(target["experts_0"], kernel, bias, where),
            "experts_1": _fill_linear(target["experts_1"], kernel, bias, where)}
  if "shift" in target:
    shift, sign = ops.shift_from_weight(kernel)
    filled = {"shift": shift, "sign": sign, "bias": bias}
  else:
    filled = {"kernel": kernel, "bias": bias}
  for name, value in filled.items():
    if name not in target or target[name].shape != value.shape:
      got = target[name].shape if name in target else "nothing"
      raise ValueError(f"from_vit: {where}/{name} has {got} in the target model; the ViT gives "
                       f"{value.shape}")
  return {**target, **filled}


def _attention(target: dict, src: dict, where: str) -> dict:
  """'shiftadd_attn' (`attn`) or 'mhsa' (`MultiHeadDotProductAttention_0`) from a ViT's 'mhsa'."""
  flat = lambda p: (p["kernel"].reshape(p["kernel"].shape[0], -1), p["bias"].reshape(-1))  # noqa
  (wq, bq), (wk, bk), (wv, bv) = flat(src["query"]), flat(src["key"]), flat(src["value"])
  wo = src["out"]["kernel"].reshape(-1, src["out"]["kernel"].shape[-1])
  if "MultiHeadDotProductAttention_0" in target:
    return {**target, "MultiHeadDotProductAttention_0": src}
  attn = dict(target["attn"])
  if "to_qk" in attn:
    attn["to_qk"] = _fill_linear(attn["to_qk"], wq, bq, where + "/attn/to_qk")
    attn["to_v"] = _fill_linear(attn["to_v"], wv, bv, where + "/attn/to_v")
  else:
    attn["qkv"] = _fill_linear(attn["qkv"], jnp.concatenate([wq, wk, wv], 1),
                               jnp.concatenate([bq, bk, bv]), where + "/attn/qkv")
  attn["proj"] = _fill_linear(attn["proj"], wo, src["out"]["bias"], where + "/attn/proj")
  return {**target, "attn": attn}


def from_vit(vit_params: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
  """The ShiftAdd form's variables from a vitjax ViT's params (module docstring).

  variables: the ShiftAdd ViT's own variables from `model.init` (a VisionTransformer built with
  `vit_overrides()` and the source's sizes); what has no source in the ViT keeps these values.
  Returns them with every mapped parameter replaced ('ksh', if present, as given: fit it with
  `fit_ksh`). Raises ValueError on any size or layout mismatch.
  """
  params = flax.core.unfreeze(variables["params"])
  src = flax.core.unfreeze(vit_params)
  for name in ("embedding", "cls", "head"):
    if (name in src) != (name in params):
      raise ValueError(f"from_vit: '{name}' is in only one of the ViT and the target model")
  params.update({k: src[k] for k in ("embedding", "cls", "head") if k in src})
  enc, out = src["Transformer"], params["Transformer"]
  blocks = sorted(k for k in enc if k.startswith("encoderblock_"))
  if sorted(k for k in out if k.startswith("encoderblock_")) != blocks:
    raise ValueError(f"from_vit: the ViT has {len(blocks)} blocks; the target model has "
                     f"{sum(k.startswith('encoderblock_') for k in out)}")
  out["posembed_input"], out["encoder_norm"] = enc["posembed_input"], enc["encoder_norm"]
  for name in blocks:
    s, t = enc[name], out[name]
    where = f"Transformer/{name}"
    t = _attention(t, s["MultiHeadDotProductAttention_0"], where)
    t["norm1"], t["norm2"] = s["LayerNorm_0"], s["LayerNorm_1"]
    mlp = dict(t["mlp"])
    mlp["fc1"] = _fill_linear(mlp["fc1"], **s["MlpBlock_0"]["Dense_0"], where=where + "/mlp/fc1")
    mlp["fc2"] = _fill_linear(mlp["fc2"], **s["MlpBlock_0"]["Dense_1"], where=where + "/mlp/fc2")
    t["mlp"] = mlp
    out[name] = t
  shapes = lambda tree: jax.tree.map(jnp.shape, flax.core.unfreeze(tree))  # noqa: E731
  if shapes(params) != shapes(variables["params"]):
    raise ValueError("from_vit: the ViT's sizes do not match the target model's (embedding, "
                     "position table, widths or head)")
  return {**variables, "params": params}


# ---------------------------------------------------------------------------------------------
# Official PVTv2 state dicts.

def _dconv(x, shapes):
  """The official per-head (K, 1) conv weight (H, 1, K, 1) -> vitjax `dconv` (K, H)."""
  return [np.ascontiguousarray(x[:, 0, :, 0].T)] if x.ndim == 4 else [x]


def _depthwise(x, shapes):
  """Depthwise Conv2d weight (C, 1, k, k) -> Flax's (k, k, 1, C)."""
  return [np.ascontiguousarray(x.transpose(2, 3, 1, 0))] if x.ndim == 4 else [x]


def _linear_rules(src: str, dst: str) -> list:
  """A dense, shift or MoE linear layer `src` (regex prefix) -> vitjax path `dst`."""
  return [
      rule(src + r"\.weight", dst + "/kernel", transform=linear),
      rule(src + r"\.bias", dst + "/bias"),
      rule(src + r"\.gate\.gate\.weight", dst + "/gate/kernel", transform=linear),
      rule(src + r"\.gate\.gate\.bias", dst + "/gate/bias"),
      rule(src + r"\.experts\.0\.weight", dst + "/experts_0/kernel", transform=linear),
      rule(src + r"\.experts\.0\.bias", dst + "/experts_0/bias"),
      rule(src + r"\.experts\.1\.shift", dst + "/experts_1/shift", transform=linear),
      rule(src + r"\.experts\.1\.sign", dst + "/experts_1/sign", transform=linear),
      rule(src + r"\.experts\.1\.bias", dst + "/experts_1/bias"),
  ]


def official_rules(depths) -> tuple:
  """The key table for a 4-stage official model with `depths` blocks per stage."""
  p, rules = "params/", []
  for s in range(1, len(depths) + 1):
    into = p + ("stem" if s == 1 else f"stages_{s - 1}/downsample")
    rules += [rule(rf"patch_embed{s}\.proj\.weight", into + "/conv/kernel", transform=conv),
              rule(rf"patch_embed{s}\.proj\.bias", into + "/conv/bias"),
              rule(rf"patch_embed{s}\.norm\.weight", into + "/norm/scale"),
              rule(rf"patch_embed{s}\.norm\.bias", into + "/norm/bias")]
    last = p + f"stages_{s - 1}/blocks_{depths[s - 1] - 1}/stage_norm"
    rules += [rule(rf"norm{s}\.weight", last + "/scale"), rule(rf"norm{s}\.bias", last + "/bias")]
    block, out = rf"block{s}\.(\d+)\.", f"stages_{s - 1}/blocks_{{0}}/"
    if s == len(depths):       # the last stage: standard attention with a fused qkv
      mhsa = p + out + "MultiHeadDotProductAttention_0/"
      rules += [
          rule(block + r"attn\.qkv\.weight", *(mhsa + n + "/kernel" for n in ("query", "key",
               "value")), transform=mapping.split(3, linear)),
          rule(block + r"attn\.qkv\.bias", *(mhsa + n + "/bias" for n in ("query", "key",
               "value")), transform=mapping.split(3, mapping.copy)),
          rule(block + r"attn\.proj\.weight", mhsa + "out/kernel", transform=linear),
          rule(block + r"attn\.proj\.bias", mhsa + "out/bias")]
    for name in ("to_qk", "to_v", "qkv", "proj"):
      rules += _linear_rules(block + rf"attn\.{name}", p + out + f"attn/{name}")
    rules += [rule(block + r"attn\.dconv\.weight", p + out + "attn/dconv", transform=_dconv),
              rule(block + r"attn\.qk_quant\.ksh\.(A|mvec|anchor)", "ksh/" + out + "attn/{1}"),
              rule(block + r"(norm[12])\.weight", p + out + "{1}/scale"),
              rule(block + r"(norm[12])\.bias", p + out + "{1}/bias"),
              rule(block + r"mlp\.dwconv\.dwconv\.weight", p + out + "mlp/dwconv/kernel",
                   transform=_depthwise),
              rule(block + r"mlp\.dwconv\.dwconv\.bias", p + out + "mlp/dwconv/bias")]
    for name in ("fc1", "fc2"):
      rules += _linear_rules(block + rf"mlp\.{name}", p + out + f"mlp/{name}")
  rules += [rule(r"head\.weight", p + "head/kernel", transform=linear),
            rule(r"head\.bias", p + "head/bias")]
  return tuple(rules)


def official_variables(state_dict: Mapping[str, Any], model, image_size: int = 224):
  """An official ShiftAddViT PVTv2 state dict (numpy arrays or torch tensors) -> the variables
  of `model` (a `ShiftAddPVT` of the same sizes), strictly: one ValueError lists every key or
  shape that does not fit. The unused Performer buffer `qk_quant.projection_matrix` is skipped."""
  target = abstract_variables(model, jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                          jnp.float32))
  return mapping.apply_rules(state_dict, official_rules(model.depths), target,
                             ignore=(r".*qk_quant\.projection_matrix",),
                             what="official ShiftAddViT (GATECH-EIC/ShiftAddViT) -> vitjax")
