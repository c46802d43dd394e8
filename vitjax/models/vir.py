"""ViR (Hatamizadeh, Ranzinger et al., 2023, "ViR: Vision Retention Networks"): an isotropic ViT
whose attention is RetNet's gated multi-scale retention (Sun et al., 2023).

No official code was released (NVlabs/ViR holds a README only), so the layer follows RetNet and
what the ViR paper states; where they are silent vitjax keeps the ViT's choices:
  from ViR    raster-ordered patch tokens, causal 1-D retention, the class token placed at the
              END of the sequence (under the causal decay only the last token sees every patch);
              an isotropic ViT layout at ViT sizes; a 2-D variant (`decay='manhattan'`, here
              RMT's Manhattan-distance decay: the paper's exact 2-D form is not verifiable).
  from RetNet the retention itself (`vitjax.ops.retention`), gamma_h = 1 - 2^(-5-h), the three
              forms, the score normalisation, the rotation of q and k ("theta shift": RoPE by the
              token index, angles 10000^(-i/(d/2-1))), k scaled by d^-1/2, GroupNorm per head,
              the swish gate, projections without bias, xavier init with gain 2^-2.5 (q, k, v, g).
  from ViT    patch embedding, learned position table, pre-norm blocks (LayerNorm, GELU MLP of 4D),
              final LayerNorm, class-token pooling, the parameter names of vit_jax.

The mixer 'retention' (class `MultiScaleRetention`), on x (B, N, D):
    q, k, v, g = x W_Q, x W_K d^-1/2, x W_V, x W_G          (no bias unless use_bias)
    q, k <- theta_shift(q), theta_shift(k)                  (theta_shift=True)
    Y = retention(q, k, v) per head, gamma_h                 (decay / form / chunk_size)
    out = (swish(g) ⊙ Norm(Y)) W_O                           (Norm per head: 'group' or 'rms')
With `num_prefix` prefix tokens (the class token, first in vitjax's token carry) and
prefix_position='end', the mixer moves them behind the patch tokens, retains, and moves them back.

Standalone, on any (B, N, D) without a grid (1-D causal over all N tokens):
    from vitjax.models.vir import MultiScaleRetention
    m = MultiScaleRetention(num_heads=6, form='chunkwise', chunk_size=512)
    variables = m.init(jax.random.key(0), x);  y = m.apply(variables, x)
form='auto' (the default) is 'parallel' up to `chunk_size` tokens and 'chunkwise' above. The
parallel form holds (B, H, N, N) scores, so at N in the tens of thousands use 'chunkwise'
(O(N chunk_size) memory) or 'recurrent' (a scan over N; its gradient stores one d x dv state per
token). In another ViT: `create_model('vit_s16', mixer='retention')`.

Parameters at 224 px, 1000 classes (no reference count exists): vir_s16 23,810,920, vir_b16
93,627,112, the ViT's plus a gate projection and a GroupNorm per block, less the attention biases;
4.98 and 19.03 GMACs by XLA's count (ViT-S/B: 4.62, 17.61), `python -m experiments.gmacs`.

torchscale 0.3.0's `MultiScaleRetention` (parallel form) is reproduced, to float32 rounding, with
norm='rms' (its RMSNorm without affine, eps 1e-6), normalize=True, theta_shift=True,
use_bias=False and value_factor = value_dim / embed_dim (tests/test_vir.py). Its chunkwise and
recurrent forms rescale differently (equal only after the norm, up to its epsilon); vitjax's
three forms share the parallel form's scaling and so agree exactly.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.registry import register_mixer, register_model
from vitjax.models.vit import VisionTransformer
from vitjax.ops import manhattan
from vitjax.ops import retention as ops

DECAYS = ("causal", "manhattan")
NORMS = ("group", "rms")
PREFIX_POSITIONS = ("end", "start")
# RetNet's init: xavier_uniform with gain 2^-2.5 for q, k, v, g (variance scale = gain^2).
retnet_init = nn.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")


@register_mixer("retention")
class MultiScaleRetention(nn.Module):
  """Gated multi-scale retention (module docstring); (B, N, D) -> (B, N, D).

  form: 'auto', 'parallel', 'recurrent' or 'chunkwise' (same function; 'manhattan' decay:
    parallel only). chunk_size: tokens per chunk (any size >= 1; capped at N).
  decay: 'causal' (1-D over raster order) or 'manhattan' (2-D, RMT's decay; no prefix tokens).
  gammas: one decay per head in (0, 1); None = RetNet's 1 - 2^(-5-h).
  value_factor: value / gate width as a multiple of D (RetNet's language models use 2).
  norm: 'group' (GroupNorm per head with learned scale and bias, the RetNet paper) or 'rms'
    (RMSNorm per head without parameters, torchscale 0.3.0).
  """
  scope_name: ClassVar[str] = "retention"
  needs_grid: ClassVar[bool] = True
  num_heads: int = 8
  form: str = "auto"
  chunk_size: int = 256
  decay: str = "causal"
  gammas: Any = None
  value_factor: int = 1
  theta_shift: bool = True
  normalize: bool = True
  norm: str = "group"
  norm_eps: float = 1e-6
  use_bias: bool = False
  prefix_position: str = "end"
  dropout: float = 0.0
  kernel_init: Callable = retnet_init
  out_init: Callable = nn.initializers.xavier_uniform()

  def log_gammas(self):
    if self.gammas is None:
      return ops.retnet_log_gammas(self.num_heads)
    return ops.log_gammas(self.gammas, self.num_heads)

  def resolved_form(self, n: int) -> str:
    choices.check("form", self.form, ("auto",) + ops.FORMS)
    if self.decay == "manhattan":
      if self.form not in ("auto", "parallel"):
        raise ValueError(f"form={self.form!r}: the 2-D (decay='manhattan') retention is not "
                         "causal and has only the parallel form; allowed values: auto, parallel")
      return "parallel"
    if self.form == "auto":
      return "parallel" if n <= self.chunk_size else "chunkwise"
    return self.form

  def _check(self, d: int):
    choices.check("decay", self.decay, DECAYS)
    choices.check("norm", self.norm, NORMS)
    choices.check("prefix_position", self.prefix_position, PREFIX_POSITIONS)
    if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
      raise ValueError(f"chunk_size={self.chunk_size!r}: allowed values are integers >= 1")
    if d % self.num_heads or (d // self.num_heads) % 2:
      raise ValueError(f"retention: width {d} must split into num_heads={self.num_heads} heads "
                       "of even width (the theta shift rotates channel pairs)")
    if not isinstance(self.value_factor, int) or self.value_factor < 1:
      raise ValueError(f"value_factor={self.value_factor!r}: allowed values are integers >= 1")

  def _normalize(self, y):
    """Per-head norm of (B, N, H, dv)."""
    if self.norm == "rms":
      y32 = y.astype(jnp.float32)
      y32 = y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, -1, keepdims=True) + self.norm_eps)
      return y32.astype(y.dtype)
    return nn.LayerNorm(epsilon=self.norm_eps, reduction_axes=-1, feature_axes=(-2, -1),
                        name="group_norm")(y)

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 0, train: bool = False):
    b, n, d = x.shape
    self._check(d)
    form = self.resolved_form(n)
    log_gamma = self.log_gammas()
    if self.decay == "manhattan":
      if num_prefix:
        raise ValueError(f"retention decay='manhattan': every token needs a grid position, but "
                         f"the tokens carry {num_prefix} prefix token(s); use pool='gap'")
      if grid is None:
        raise ValueError("retention decay='manhattan' needs the token grid (h, w)")
    move = num_prefix and self.prefix_position == "end"
    if move:                                  # class token(s) behind the raster-ordered patches
      x = jnp.concatenate([x[:, num_prefix:], x[:, :num_prefix]], axis=1)
    h, kd, vd = self.num_heads, d // self.num_heads, self.value_factor * d // self.num_heads
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, kernel_init=self.kernel_init)
    q = dense(d, name="q_proj")(x).reshape(b, n, h, kd)
    k = dense(d, name="k_proj")(x).reshape(b, n, h, kd) * kd ** -0.5
    v = dense(h * vd, name="v_proj")(x).reshape(b, n, h, vd)
    g = dense(h * vd, name="g_proj")(x)
    if self.theta_shift:                      # RoPE by the raster index n (= row * w + col)
      sin, cos = manhattan.theta_shift_tables(kd, 1, n)
      q, k = (manhattan.theta_shift(t[:, None], sin, cos)[:, 0] for t in (q, k))
    if self.decay == "manhattan":
      y = ops.manhattan_retention(q, k, v, log_gamma, grid, normalize=self.normalize)
    else:
      y = ops.causal_retention(q, k, v, log_gamma, form=form, chunk_size=self.chunk_size,
                               normalize=self.normalize)
    y = nn.swish(g) * self._normalize(y).reshape(b, n, h * vd)
    y = nn.Dense(d, use_bias=self.use_bias, kernel_init=self.out_init, name="out_proj")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    if move:
      y = jnp.concatenate([y[:, -num_prefix:], y[:, :-num_prefix]], axis=1)
    return y


# ViT sizes (timm's vit_small/base_patch16_224); the rest of each block is the ViT's.
VARIANTS = {
    "vir_s16": dict(patch_size=16, width=384, depth=12, mlp_dim=1536, num_heads=6),
    "vir_b16": dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12),
}
# create_model fields routed into the mixer (the others are VisionTransformer's).
RETENTION_FIELDS = ("form", "chunk_size", "decay", "gammas", "value_factor", "theta_shift",
                    "normalize", "norm", "norm_eps", "use_bias")


def _factory(variant, **overrides):
  """A VisionTransformer with the 'retention' mixer; retention fields may be given directly
  (`create_model('vir_s16', form='recurrent')`) or in mixer_kwargs."""
  allowed = (layers.module_fields(VisionTransformer) - {"mixer"}) | set(RETENTION_FIELDS)
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"Unknown ViR field(s) {unknown}. Allowed fields: "
                     f"{', '.join(sorted(allowed))}.")
  mixer_kwargs = {k: overrides.pop(k) for k in RETENTION_FIELDS if k in overrides}
  mixer_kwargs.update(overrides.pop("mixer_kwargs", None) or {})
  return VisionTransformer(**{**VARIANTS[variant], **overrides}, mixer="retention",
                           mixer_kwargs=mixer_kwargs)


for _name in VARIANTS:
  register_model(_name)(functools.partial(_factory, _name))
