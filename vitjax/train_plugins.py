"""The runner's side of the plug-ins (DESIGN.md, decision 13): losses and schedules a model cannot
hold by itself, switched on by config fields and used by `vitjax.train`.

ResFormer multi-resolution training (Tian et al., "ResFormer: Scaling ViTs with Multi-Resolution
Training", CVPR 2023), `config.train_resolutions` / `config.scale_consistency`:
  every batch is trained at each side s_1 > s_2 > ... > s_n (the data are read at s_1 =
  data.image_size; the smaller replicas are resized inside the jitted step), and the step loss is

    L = 1/n * sum_i [ CE(f(x_i), y) + lambda * [i > 1] * SmoothL1(z_i, LN(sg(z_{i-1}))) ]

  with z_i the pre-logits feature (the class token after the final norm, or the pooled patch
  tokens), sg stop-gradient, LN a layer norm without scale or bias (eps 1e-6; the official code
  calls it feature whitening) and SmoothL1 with beta 1, averaged over batch and channels. As in the
  official code (a checkout of ruitian12/resformer: `engine.py::train_one_epoch`,
  `losses.py::DistillationLoss` with `--distillation-type smooth-l1 --distillation-target cls`),
  each resolution's teacher is the next larger one (a chain 28 -> 20 -> 16, not every one against
  the largest), the sum is divided by n, and lambda defaults to its `--distillation-alpha` 1.0.
  With two resolutions the chain and "against the largest" coincide.

Resizing (`resize_images`) is bicubic with antialiasing: Keys' cubic with a = -0.5, its support
widened by the scale factor when downscaling. That is PIL's and torchvision's Resize(BICUBIC),
which the official pipeline applies to its replicas and test images, and equals torch's
`F.interpolate(mode='bicubic', antialias=True)` (tests/test_train_plugins.py checks it). Unlike PIL
on 8-bit images nothing is clipped, since the step resizes the normalized float images.

`config.eval_resolutions`: the evals report every metric at each listed test-image side (the test
images resized in the eval step the same way), e.g. `eval/accuracy@36`, trained side or not.

IA-RED² REINFORCE (Pan et al., NeurIPS 2021), `config.policy`: a reducer that samples which
tokens to keep sows, per call, `log_prob` (B,) (log-probability of its sampled keep/drop actions)
and `kept` (B,) (the kept fraction of patch tokens) into the collection 'policy'. For each such
pair the step adds, weighted by `policy.weight`,

    L_policy = -mean_b( sg(r_b - mean(r)) * log_prob_b ),
    r_b = 1 - kept_b^2 if the prediction on example b is correct, else -penalty,

(the reward of BlockDrop, Wu et al. 2018, which IA-RED² uses; its `--penalty` default -1 gives
penalty 1; the baseline is the batch-mean reward). `policy.phase1_steps` > 0 trains only the
parameters under a `tokenreducer_*` scope (the interpreters) for that many steps, the backbone
frozen (its gradients and updates zeroed inside the jitted step), then everything jointly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

REDUCER_SCOPE = "tokenreducer_"
WHITEN_EPS = 1e-6
SMOOTH_L1_BETA = 1.0


def resize_images(images, size: int):
  """(B, h, w, C) -> (B, size, size, C), antialiased bicubic (see the module docstring)."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method="bicubic", antialias=True)


def whiten(z):
  """Layer norm over the last axis without scale or bias (the official target 'whitening')."""
  mean = z.mean(-1, keepdims=True)
  var = jnp.square(z - mean).mean(-1, keepdims=True)
  return (z - mean) / jnp.sqrt(var + WHITEN_EPS)


def scale_consistency_loss(student, teacher):
  """SmoothL1(student, whiten(sg(teacher))), beta 1, mean over every element."""
  d = jnp.abs(student - whiten(jax.lax.stop_gradient(teacher)))
  return jnp.mean(jnp.where(d < SMOOTH_L1_BETA, 0.5 * d * d / SMOOTH_L1_BETA,
                            d - 0.5 * SMOOTH_L1_BETA))


def policy_pairs(policy: Mapping) -> list[tuple[Any, Any]]:
  """The (log_prob, kept) pairs a model sowed into 'policy', one per reducer call, in tree order."""
  pairs = []

  def walk(node, path):
    if not isinstance(node, Mapping):
      return
    if "log_prob" in node or "kept" in node:
      lps, kept = (v if isinstance(v, tuple) else (v,)
                   for v in (node.get("log_prob", ()), node.get("kept", ())))
      if len(lps) != len(kept):
        raise ValueError(f"'policy' collection at {'/'.join(path) or '<root>'}: sow one 'kept' "
                         f"per 'log_prob' (got {len(lps)} and {len(kept)})")
      pairs.extend(zip(lps, kept))
    for name, child in node.items():
      if name not in ("log_prob", "kept"):
        walk(child, (*path, str(name)))
  walk(policy, ())
  return pairs


def reinforce_loss(logits, labels, pairs, *, penalty: float):
  """Sum over pairs of -mean(sg(r - mean r) * log_prob) (see the module docstring)."""
  correct = jnp.argmax(logits, -1) == labels
  total = 0.0
  for log_prob, kept in pairs:
    reward = jax.lax.stop_gradient(jnp.where(correct, 1.0 - jnp.square(kept), -penalty))
    total = total - jnp.mean((reward - reward.mean()) * log_prob)
  return total


def reducer_param_mask(params):
  """True for each leaf under a `tokenreducer_*` scope (what phase 1 trains)."""
  def under(path, _):
    return any(str(getattr(k, "key", k)).startswith(REDUCER_SCOPE) for k in path)
  return jax.tree_util.tree_map_with_path(under, params)


def freeze_backbone(tree, mask, frozen):
  """`tree` (grads or updates) with every leaf outside the reducers zeroed while `frozen`."""
  return jax.tree.map(lambda x, m: x if m else jnp.where(frozen, jnp.zeros_like(x), x), tree, mask)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What `vitjax.train.make_train_step` needs of the plug-in fields; the defaults change nothing."""
  resolutions: tuple[int, ...] = ()    # largest first; fewer than two = train at the data's size
  scale_consistency: float = 0.0
  policy_weight: float = 1.0
  penalty: float = 1.0
  phase1_steps: int = 0

  @classmethod
  def from_config(cls, config) -> StepOptions:
    policy = config.get("policy") or {}
    return cls(resolutions=tuple(sorted({int(s) for s in config.get("train_resolutions") or ()},
                                        reverse=True)),
               scale_consistency=float(config.get("scale_consistency", 0.0)),
               policy_weight=float(policy.get("weight", 1.0)),
               penalty=float(policy.get("penalty", 1.0)),
               phase1_steps=int(policy.get("phase1_steps", 0)))


def eval_settings(evals, config) -> tuple[list[tuple[str, dict, int]], str | None]:
  """(suffix, apply kwargs, test-image side) of every eval, and the suffix whose metrics the plain
  keys repeat (None: the single setting writes them). Without eval_resolutions: the schedule's
  evals at data.image_size; with them: each schedule eval at each side, suffixed '@SIDE', the
  plain keys repeating data.image_size (or the first listed side when it is not listed)."""
  size = config.data.image_size
  sides = tuple(int(s) for s in config.get("eval_resolutions") or ())
  if not sides:
    return [(name, kw, size) for name, kw in evals], None
  settings = [(f"{name}@{s}", kw, s) for s in sides for name, kw in evals]
  return settings, f"@{size if size in sides else sides[0]}"


def _check_sides(field: str, sides, stride, model_name) -> tuple[int, ...]:
  sides = tuple(sides)
  bad = [s for s in sides if not isinstance(s, int) or isinstance(s, bool) or s <= 0]
  if bad:
    raise ValueError(f"config.{field}={sides!r}: {bad[0]!r} is not an image side; allowed values "
                     "are positive integers")
  if len(set(sides)) != len(sides):
    raise ValueError(f"config.{field}={sides!r} lists a side twice; list each once")
  if stride:
    bad = [s for s in sides if s % stride]
    if bad:
      raise ValueError(f"config.{field}={sides!r}: {bad[0]} is not a multiple of {stride}, the "
                       f"total stride of model_name={model_name!r} (its patch size, or its stem "
                       f"and stages); allowed values are multiples of {stride}")
  return sides


def check_config(config, stride, params_shapes) -> tuple[int, ...]:
  """Raises the first error in the plug-in fields, naming it; returns every extra side the model
  must run at (train and eval sides other than data.image_size)."""
  name, size = config.model_name, config.data.image_size
  train = _check_sides("train_resolutions", config.get("train_resolutions") or (), stride, name)
  evals = _check_sides("eval_resolutions", config.get("eval_resolutions") or (), stride, name)
  if train and max(train) != size:
    raise ValueError(f"config.train_resolutions={train!r}: the largest side must be "
                     f"config.data.image_size={size} (the data are read at that size and resized "
                     f"down in the step); allowed values are sides up to {size}, {size} included")
  lam = config.get("scale_consistency", 0.0)
  if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
    raise ValueError(f"config.scale_consistency={lam!r}: allowed values are finite numbers >= 0")
  policy = config.get("policy") or {}
  for field in ("weight", "penalty"):
    v = policy.get(field, 1.0)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
      raise ValueError(f"config.policy.{field}={v!r}: allowed values are finite numbers >= 0")
  phase1 = policy.get("phase1_steps", 0)
  if not isinstance(phase1, int) or not 0 <= phase1 <= config.total_steps:
    raise ValueError(f"config.policy.phase1_steps={phase1!r}: allowed values are integers 0.."
                     f"{config.total_steps} (config.total_steps)")
  if phase1 and not any(jax.tree.leaves(reducer_param_mask(params_shapes))):
    raise ValueError(f"config.policy.phase1_steps={phase1} trains only parameters under a "
                     f"'{REDUCER_SCOPE}*' scope, but model_name={name!r} has none (set "
                     "config.model.token_reduction to a reducer with parameters, e.g. 'iared2', "
                     "or phase1_steps=0)")
  return tuple(sorted(set(train + evals) - {size}))
