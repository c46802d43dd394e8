"""ShiftAddViT (You, Shi, Guo, Lin, NeurIPS 2023, "ShiftAddViT: Mixture of Multiplication
Primitives Towards Efficient Vision Transformer"): layers, the 'shiftadd_attn' mixer, the
'shift_mlp' block and the explicit fitting step of the hash state. The math is in
`vitjax.ops.shiftadd`; the official PVTv2-based models are in `vitjax.models.pvt`.

  linear layers  'dense' (nn.Dense), 'shift' (`ShiftLinear`: weights 0 or +-2^p, p in [-14, 0],
                 inputs and bias in 16.16 fixed point; DeepShift-PS `LinearShift`) or 'moe'
                 (`MoELinear`: a router `gate` (Dense to 2) sends each token to one expert,
                 `experts_0` multiply (Dense) or `experts_1` shift; official `PyTorchFMoE_FC`).
  'shiftadd_attn' q^ = to_qk(x) / |.| shared by queries and keys (`qk_quant='ksh'`, the official
                 `LinAngularAttention_ksh`), binarized by KSH; or separate q, k from one `qkv`
                 projection binarized at their mean (`qk_quant='mean'`, the official
                 `LinAngularAttention_binary`). Then y = unit(0.5 v + Q_b (K_b^T V) / pi)
                 + DWConv_{9x1}(v) along the tokens (`dconv`, per head), and `proj`.
  'shift_mlp'    pre-norm block (`norm1`, mixer, `norm2`, `mlp`; LayerNorm eps 1e-6) whose MLP is
                 fc1 -> [DWConv3x3 on the map] -> GELU -> fc2 with fc1, fc2 of kind `mlp_linear`;
                 `stage_norm` adds PVT's per-stage LayerNorm after the block.

The KSH hash state (per layer: `A` (H, nbits, m), `mvec` (1, H, 1, m), `anchor` (1, H, m, d), the
official buffers) lives in the variable collection 'ksh', not in 'params': the official code fits
it once, on the first forward, and never trains it. Flax modules are pure, so here that is an
explicit step, `fit_ksh(model, variables, images, key)`, which runs the model once with 'ksh'
mutable: each layer fits its state to the tokens it receives (already hashed by the fitted layers
before it) and returns the new collection. Until then the state is the official initial one
(A ~ N(0, 1), mvec = anchor = 0), whose codes are the same for every token.

Routing and the LL-loss: the router picks each token's expert by the larger logit (top-1, the
official `NaiveGate`); the chosen expert's output is passed on with weight 1, as there, but
backward the weight is the chosen softmax probability (a straight-through gate, so the task loss
trains the router; the official NaiveGate gives it no gradient, and its training loop zeroes the
balance loss). During training (collection 'aux_loss' mutable, which `vitjax.train` does), each
MoE layer sows moe_loss_weight * LL-loss (`ops.shiftadd.balance_loss`, latencies (6, 4) for
multiply and shift as in the official NoisyGate) into 'aux_loss'; the runner adds every sown
value to the training loss. Both experts run on every token (static shapes); the output takes
the routed one. The official dispatcher also returns log(exp(y) + 2.2e-16) for an expert's
output y: the identity, except below about -25 and above 88 (overflow); vitjax returns y.

Standalone mixer on (B, N, C) tokens, e.g. N = 256^2, C = 384, 6 heads (the scaling benchmark):
    mixer = ShiftAddAttention(num_heads=6)                       # qk_quant='ksh', dense projections
    variables = mixer.init(jax.random.key(0), x, grid=(256, 256))  # params + 'ksh' state
    y = mixer.apply(variables, x, grid=(256, 256))
The cost is linear in N (K_b^T V is nbits x d per head); `grid` is optional (the 9x1 conv runs
along the token order, as the official one does). Fitting the hash state needs O(N^2) memory;
fit on a few examples or fewer tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import choices
from vitjax.models import layers
from vitjax.models.backbone import Tokens, build_mixer, call_mixer
from vitjax.models.convnext import DepthwiseConv
from vitjax.models.registry import register_block, register_mixer
from vitjax.ops import shiftadd as ops

LINEARS = ("dense", "shift", "moe")
QK_QUANTS = ("ksh", "mean")
trunc_normal = nn.initializers.truncated_normal


def _uniform(lo: float, hi: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, lo, hi)
  return init


class ShiftLinear(nn.Module):
  """y = fixed(x) W + fixed(b), W = `ops.shiftadd.shift_weight(shift, sign)`: power-of-two
  weights (DeepShift-PS). Parameters `shift`, `sign` (in, out) and `bias` (out), initialised as
  the official LinearShift: shift ~ U(-14, 0), sign ~ U(-1, 1), bias ~ U(+-1/sqrt(in)).
  `act_bits=None` leaves inputs and bias in floating point."""
  features: int
  use_bias: bool = True
  weight_bits: int = 5
  act_bits: tuple[int, int] | None = (16, 16)

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    lo, hi = ops.shift_range(self.weight_bits)
    shift = self.param("shift", _uniform(lo, hi), (d_in, self.features), jnp.float32)
    sign = self.param("sign", _uniform(-1.0, 1.0), (d_in, self.features), jnp.float32)
    w = ops.shift_weight(shift, sign, weight_bits=self.weight_bits)
    if self.act_bits:
      x = ops.fixed_point(x, *self.act_bits)
    y = jnp.dot(x, w.astype(x.dtype))
    if self.use_bias:
      bound = 1.0 / math.sqrt(d_in)
      bias = self.param("bias", _uniform(-bound, bound), (self.features,), jnp.float32)
      y = y + (ops.fixed_point(bias, *self.act_bits) if self.act_bits else bias)
    return y


class MoELinear(nn.Module):
  """Top-1 mixture of a multiply expert (`experts_0`, Dense) and a shift expert (`experts_1`,
  ShiftLinear), routed per token by `gate` (Dense to 2 logits); see the module docstring for the
  gate's gradient and the LL-loss sown into 'aux_loss'."""
  features: int
  use_bias: bool = True
  moe_loss_weight: float = 0.01
  expert_latency: tuple[float, float] = (6.0, 4.0)
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    logits = nn.Dense(2, kernel_init=self.kernel_init, name="gate")(x)          # (..., 2)
    route = jnp.argmax(logits, axis=-1)[..., None]                                # 0 multiply
    y0 = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=self.kernel_init,
                  name="experts_0")(x)
    y1 = ShiftLinear(self.features, use_bias=self.use_bias, name="experts_1")(x)
    chosen = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), route, axis=-1)
    weight = 1.0 + (chosen - jax.lax.stop_gradient(chosen))                       # 1 forward
    if not self.is_initializing():
      loss = ops.balance_loss(logits.reshape(-1, 2), self.expert_latency)
      self.sow("aux_loss", "balance", self.moe_loss_weight * loss)
    return jnp.where(route == 0, y0, y1) * weight


def linear_layer(kind: str, features: int, *, use_bias: bool = True, name: str,
                 moe_loss_weight: float = 0.01, kernel_init=trunc_normal(0.02)):
  """The linear layer of `kind` ('dense', 'shift' or 'moe'; see `LINEARS`)."""
  choices.check("linear", kind, LINEARS)
  if kind == "dense":
    return nn.Dense(features, use_bias=use_bias, kernel_init=kernel_init, name=name)
  if kind == "shift":
    return ShiftLinear(features, use_bias=use_bias, name=name)
  return MoELinear(features, use_bias=use_bias, moe_loss_weight=moe_loss_weight,
                   kernel_init=kernel_init, name=name)


@register_mixer("shiftadd_attn")
class ShiftAddAttention(nn.Module):
  """ShiftAddViT's binary linear angular attention (module docstring); (B, N, C) -> (B, N, C).

  qk_quant: 'ksh' (shared `to_qk`, KSH codes of nbits bits from num_anchors anchors; state in
    the 'ksh' collection, fitted by `fit_ksh`) or 'mean' (`qkv`, codes 1[x > mean], no state).
  linear: kind of the projections (`to_qk`, `to_v` or `qkv`, and `proj`): 'dense', 'shift', 'moe'.
  matmul_impl: 'dot' (products of the 0/1 codes as matrix products) or 'add' (the same sums as
    selects and additions, the paper's MatAdd; slower under XLA, see `vitjax.ops.shiftadd`).
  """
  scope_name: ClassVar[str] = "attn"
  num_heads: int = 8
  qk_quant: str = "ksh"
  linear: str = "dense"
  qkv_bias: bool = True
  nbits: int = 16
  num_anchors: int = 25
  topk: int = 10
  ksh_iterations: int = 100
  res_kernel_size: int = 9
  matmul_impl: str = "dot"
  moe_loss_weight: float = 0.01
  dropout: float = 0.0

  def _check(self, c: int):
    choices.check("qk_quant", self.qk_quant, QK_QUANTS)
    choices.check("linear", self.linear, LINEARS)
    choices.check("matmul_impl", self.matmul_impl, ops.MATMUL_IMPLS)
    if c % self.num_heads:
      raise ValueError(f"shiftadd_attn: width {c} is not divisible by num_heads={self.num_heads}")
    if self.res_kernel_size < 1 or self.res_kernel_size % 2 == 0:
      raise ValueError(f"shiftadd_attn: res_kernel_size={self.res_kernel_size}; allowed values "
                       "are odd positive sizes")

  def _ksh_state(self, qk):
    """The layer's hash state; fitted to qk when the 'ksh' collection is mutable (`fit_ksh`)."""
    h, n, d = qk.shape[1:]
    m = self.num_anchors
    if not self.is_initializing() and not self.has_variable("ksh", "A"):
      raise ValueError("shiftadd_attn with qk_quant='ksh' keeps its hash state in the 'ksh' "
                       "collection: apply it with all the variables init returned (and "
                       "fitted with vitjax.models.shiftadd.fit_ksh), not only 'params'")
    state = {
        "A": self.variable("ksh", "A", lambda: jax.random.normal(
            self.make_rng("params"), (h, self.nbits, m), jnp.float32)),
        "mvec": self.variable("ksh", "mvec", jnp.zeros, (1, h, 1, m), jnp.float32),
        "anchor": self.variable("ksh", "anchor", jnp.zeros, (1, h, m, d), jnp.float32)}
    if self.is_mutable_collection("ksh") and not self.is_initializing():
      if n < max(m, self.topk):
        raise ValueError(f"fit_ksh: {n} tokens cannot give num_anchors={m} anchors and "
                         f"topk={self.topk} neighbours; fit on larger inputs")
      fitted = ops.ksh_fit(qk, self.make_rng("ksh"), state["A"].value, topk=self.topk,
                           iterations=self.ksh_iterations)
      for key, var in state.items():
        var.value = fitted[key]
    return {key: var.value for key, var in state.items()}

  @nn.compact
  def __call__(self, x, *, grid=None, num_prefix: int = 0, train: bool = False):
    b, n, c = x.shape
    self._check(c)
    if grid is not None and num_prefix + grid[0] * grid[1] != n:
      raise ValueError(f"shiftadd_attn: {n} tokens do not fit grid={tuple(grid)} with "
                       f"num_prefix={num_prefix}")
    h, d = self.num_heads, c // self.num_heads
    proj = lambda features, name, bias=self.qkv_bias: linear_layer(  # noqa: E731
        self.linear, features, use_bias=bias, name=name, moe_loss_weight=self.moe_loss_weight)
    heads = lambda t: t.reshape(b, n, h, d).transpose(0, 2, 1, 3)  # noqa: E731  (B, H, N, d)
    unit = lambda t: t / jnp.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
    if self.qk_quant == "ksh":
      qk = unit(heads(proj(c, "to_qk")(x)))
      v = heads(proj(c, "to_v")(x))
      qb = kb = ops.ksh_codes(qk, **self._ksh_state(qk))
    else:
      qkv = proj(3 * c, "qkv")(x).reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)
      v = qkv[2]
      qb, kb = ops.mean_codes(unit(qkv[0])), ops.mean_codes(unit(qkv[1]))
    kernel = self.param("dconv", nn.initializers.normal(math.sqrt(2.0 / self.res_kernel_size)),
                        (self.res_kernel_size, h), jnp.float32)
    y = ops.linear_angular_attention(qb, kb, v, impl=self.matmul_impl) + ops.token_conv(v, kernel)
    y = proj(c, "proj", True)(y.transpose(0, 2, 1, 3).reshape(b, n, c))
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class ShiftAddMlp(nn.Module):
  """fc1 -> [DWConv3x3 (with bias) on the patch map] -> GELU -> dropout -> fc2 -> dropout, fc1
  and fc2 of kind `linear` (PVTv2's MLP; the official `Mlp` / `Mlp_FMoE`). Prefix tokens skip
  the convolution."""
  hidden: int
  linear: str = "moe"
  dwconv: bool = False
  dwconv_impl: str = "auto"
  moe_loss_weight: float = 0.01
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, tokens: Tokens, *, train: bool = False):
    fc = lambda features, name: linear_layer(self.linear, features, name=name,  # noqa: E731
                                             moe_loss_weight=self.moe_loss_weight)
    y = fc(self.hidden, "fc1")(x)
    if self.dwconv:
      prefix, grid = layers.tokens_to_grid(y, tokens.grid, tokens.num_prefix)
      conv = DepthwiseConv(3, impl=self.dwconv_impl,
                           kernel_init=nn.initializers.normal(math.sqrt(2.0 / 9)), name="dwconv")
      y = layers.grid_to_tokens(prefix, conv(grid))
    y = nn.Dropout(self.dropout, deterministic=not train)(layers.gelu(y))
    y = fc(x.shape[-1], "fc2")(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


@register_block("shift_mlp")
class ShiftMlpBlock(nn.Module):
  """x + DropPath(mixer(LN(x))), x + DropPath(ShiftAddMlp(LN(x))), then the optional stage norm
  (module docstring). The defaults are ShiftAddViT's ViT form: 'shiftadd_attn' and a MoE MLP
  without convolution; the PVTv2 models set `dwconv=True` and `stage_norm` on each stage's last
  block."""
  mlp_dim: int
  num_heads: int
  mixer: Any = "shiftadd_attn"
  mixer_kwargs: Any = None
  mlp_linear: str = "moe"
  dwconv: bool = False
  dwconv_impl: str = "auto"
  stage_norm: bool = False
  moe_loss_weight: float = 0.01
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    if self.dwconv and tokens.grid is None:
      raise ValueError("shift_mlp with dwconv=True needs tokens on a 2-D grid")
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    x = tokens.x
    y = nn.LayerNorm(epsilon=self.eps, name="norm1")(x)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = nn.LayerNorm(epsilon=self.eps, name="norm2")(x)
    y = ShiftAddMlp(self.mlp_dim, self.mlp_linear, self.dwconv, self.dwconv_impl,
                    self.moe_loss_weight, self.dropout, name="mlp")(y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    if self.stage_norm:
      x = nn.LayerNorm(epsilon=self.eps, name="stage_norm")(x)
    return tokens.replace(x=x)


def fit_ksh(model: nn.Module, variables, images, key, **apply_kwargs):
  """The explicit form of the official "fit the hash on the first forward": runs `model` once on
  `images` (train=False) with the 'ksh' collection mutable, so every 'shiftadd_attn' layer with
  qk_quant='ksh' fits its hash state (`ops.shiftadd.ksh_fit`) to the tokens it receives, in
  forward order. Returns `variables` with the fitted 'ksh' collection (everything else as given).
  The rng stream 'ksh' draws each layer's anchors."""
  if "ksh" not in variables:
    raise ValueError("fit_ksh: these variables have no 'ksh' collection; the model has no "
                     "'shiftadd_attn' layer with qk_quant='ksh'")
  _, updates = model.apply(variables, images, train=False, rngs={"ksh": key}, mutable=["ksh"],
                           **apply_kwargs)
  return {**variables, "ksh": updates["ksh"]}
