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

LTM's information bottleneck as its repository trains it (Wang & Yang, "Efficient Visual
Transformer by Learnable Token Merging"; Statistical-Deep-Learning/LTM, train.py and
timm/loss/cross_entropy.py::LabelSmoothingCrossEntropy_IB), `config.ib`: the step adds
`ib.weight` x the mean over the batch of `ops.token_reduction.ib_bound`,

    sum_{a,b} phi_out(a) phi_in(b) log phi_in(b)  -  sum_a phi_out(a) log Q[a, y],

phi_in the soft assignment (`ops.token_reduction.cluster_scores`, beta `ib.beta`) of the
flattened input image to K input clusters, phi_out that of the pre-logits feature to K feature
clusters, Q[a, c] the mean of phi_out(a) over the samples of class c. As in the repository, K is
the class count, the input clusters are k-means centroids of training images computed once, the
feature clusters and Q are recomputed from the current model every epoch (`ib.refresh_steps`),
and the term is off for the first `ib.warmup` fraction of the steps (its 0.3).
`InformationBottleneck` keeps the centroids and Q and hands the step its `arrays(step)`. Choices
where the repository differs or is silent: the statistics come from `ib.samples` training images
(the repository passes the whole training set); k-means (Lloyd, `ib.kmeans_iters` rounds from K distinct
samples, `kmeans`) clusters the L2-normalised vectors, the same vectors the scores are taken
of (the repository's faiss k-means clusters raw vectors and scores normalised ones); Q is
estimated with the new feature centroids (the repository pairs new centroids with a Q of the
previous epoch's), and clipped at 1e-12 before its log.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import console

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


def kmeans(x, k: int, *, iters: int, key):
  """Lloyd's k-means of the rows of x (n, F) -> (k, F) centroids, starting from k distinct rows
  drawn with `key`; a cluster left empty keeps its centroid."""
  c = x[jax.random.choice(key, x.shape[0], (k,), replace=False)]

  def body(c, _):
    d = jnp.sum(x * x, 1)[:, None] - 2 * x @ c.T + jnp.sum(c * c, 1)[None]
    onehot = jax.nn.one_hot(jnp.argmin(d, 1), k, dtype=x.dtype)
    counts = onehot.sum(0)[:, None]
    return jnp.where(counts > 0, onehot.T @ x / jnp.maximum(counts, 1), c), None
  return jax.lax.scan(body, c, None, length=iters)[0]


def l2_rows(x):
  """Rows of x (n, ...) flattened and L2-normalised, as the LTM repository scores them."""
  x = x.reshape(x.shape[0], -1)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_cluster_q(score, onehot):
  """Q[a, c] = mean of score[:, a] over the samples of class c (K, C); a class without samples
  gets the uniform 1/K."""
  counts = onehot.sum(0)
  q = score.T @ onehot / jnp.maximum(counts, 1)[None]
  return jnp.where(counts[None] > 0, q, 1.0 / score.shape[1])


def ib_loss(images, pre_logits, labels, arrays, *, beta: float):
  """The mean over the batch of the repository's bound (module docstring), times arrays['on']."""
  from vitjax.ops import token_reduction as tr  # pylint: disable=g-import-not-at-top
  score_in = tr.cluster_scores(l2_rows(images), arrays["c_in"], beta)
  score_out = tr.cluster_scores(l2_rows(pre_logits), arrays["c_out"], beta)
  onehot = jax.nn.one_hot(labels, arrays["q"].shape[1], dtype=score_out.dtype)
  bound = tr.ib_bound(score_in, score_out, onehot, jnp.maximum(arrays["q"], 1e-12))
  return arrays["on"] * jnp.mean(bound)


@dataclasses.dataclass(frozen=True)
class IBOptions:
  """config.ib (module docstring); weight 0 turns it off."""
  weight: float = 0.0
  warmup: float = 0.3           # fraction of total_steps without the term
  refresh_steps: int = 0        # 0: one epoch of steps
  samples: int = 10_000
  kmeans_iters: int = 20
  beta: float = 1.0

  @classmethod
  def from_config(cls, config) -> IBOptions:
    ib = config.get("ib") or {}
    return cls(**{f.name: (int if f.type == "int" else float)(ib[f.name])
                  for f in dataclasses.fields(cls) if f.name in ib})


class InformationBottleneck:
  """The centroids and Q of the LTM repository's IB term (module docstring), kept by the runner.

  `images`, `labels`: the `samples` training images (as the model sees them) and their labels.
  `features(variables, images) -> pre_logits` runs the model in eval mode. `update(step,
  variables)` recomputes the feature clusters and Q when they are due; `arrays(step)` is what the
  train step takes (`on` is 0 during the warm-up, so the step compiles once).
  """

  def __init__(self, options: IBOptions, *, images, labels, num_classes: int, features,
               total_steps: int, steps_per_epoch: int, seed: int):
    self.options, self.features = options, features
    self.labels = np.asarray(labels)
    self.images = np.asarray(images)
    self.k = num_classes
    self.start = int(options.warmup * total_steps) + 1            # first step with the term
    self.every = options.refresh_steps or max(steps_per_epoch, 1)
    key_in, self.key = jax.random.split(jax.random.key(seed))
    flat = l2_rows(jnp.asarray(self.images))
    self.c_in = jax.jit(kmeans, static_argnames=("k", "iters"))(
        flat, k=self.k, iters=options.kmeans_iters, key=key_in)
    self.c_out = self.q = None
    self.refreshed = None

  def due(self, step: int) -> bool:
    return self.c_out is None or (step >= self.start and (step - self.start) % self.every == 0)

  def update(self, step: int, variables, batch_size: int) -> bool:
    """Recomputes the feature centroids and Q if due at `step`; True when it did."""
    if not self.due(step):
      return False
    feats = np.concatenate([np.asarray(self.features(variables, self.images[i:i + batch_size]))
                            for i in range(0, len(self.images), batch_size)])
    from vitjax.ops import token_reduction as tr  # pylint: disable=g-import-not-at-top
    flat = l2_rows(jnp.asarray(feats))
    self.c_out = jax.jit(kmeans, static_argnames=("k", "iters"))(
        flat, k=self.k, iters=self.options.kmeans_iters, key=jax.random.fold_in(self.key, step))
    score = tr.cluster_scores(flat, self.c_out, self.options.beta)
    self.q = class_cluster_q(score, jax.nn.one_hot(self.labels, self.k, dtype=score.dtype))
    self.refreshed = step
    return True

  def refresh(self, step: int, state, variables_of, batch_size: int, pending=()) -> float:
    """The loop's call: `update` when due (after the `pending` steps finish), logged; returns the
    seconds it took, which the loop leaves out of its throughput."""
    if not self.due(step):
      return 0.0
    jax.block_until_ready(pending)
    t0 = time.time()
    self.update(step, variables_of(state), batch_size)
    console.log("IB statistics at step %d (term %s)", step, "on" if step >= self.start else "off")
    return time.time() - t0

  def arrays(self, step: int) -> dict:
    return dict(c_in=self.c_in, c_out=self.c_out, q=self.q,
                on=jnp.asarray(float(step >= self.start), jnp.float32))


def information_bottleneck(config, model, info, apply_kwargs) -> InformationBottleneck | None:
  """The runner's `InformationBottleneck` for config.ib (None when ib.weight is 0): its samples are
  the first ib.samples images of a training stream seeded config.seed + 1, the same in every
  process (each reads them whole), so every process derives the same centroids and Q."""
  options = IBOptions.from_config(config)
  if not options.weight:
    return None
  if options.samples < info.num_classes:
    raise ValueError(f"config.ib.samples={options.samples}: k-means needs at least one sample per "
                     f"cluster; allowed values are >= {info.num_classes} (the class count)")
  from vitjax import data as vdata  # pylint: disable=g-import-not-at-top
  stream = vdata.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed + 1)
  batches = [next(stream) for _ in range(-(-options.samples // config.batch_size))]
  images = np.concatenate([b["image"] for b in batches])[:options.samples]
  labels = np.concatenate([b["label"] for b in batches])[:options.samples]
  apply = jax.jit(lambda v, x: model.apply(v, x, features=True, **apply_kwargs)[1]["pre_logits"])
  return InformationBottleneck(options, images=images, labels=labels,
                               num_classes=info.num_classes, features=apply,
                               total_steps=config.total_steps,
                               steps_per_epoch=info.train_size // config.batch_size,
                               seed=config.seed + 1)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What `vitjax.train.make_train_step` needs of the plug-in fields; the defaults change nothing."""
  resolutions: tuple[int, ...] = ()    # largest first; fewer than two = train at the data's size
  scale_consistency: float = 0.0
  policy_weight: float = 1.0
  penalty: float = 1.0
  phase1_steps: int = 0
  ib_weight: float = 0.0
  ib_beta: float = 1.0

  def pre_logits_users(self) -> list[tuple[str, float, str]]:
    """(config field, value, how to do without it) of each term that reads the pre-logits."""
    users = []
    if len(self.resolutions) > 1 and self.scale_consistency > 0:
      users.append(("scale_consistency", self.scale_consistency,
                    "to train at several sides without it"))
    if self.ib_weight > 0:
      users.append(("ib.weight", self.ib_weight, "to train without LTM's IB term"))
    return users

  @classmethod
  def from_config(cls, config) -> StepOptions:
    policy = config.get("policy") or {}
    ib = IBOptions.from_config(config)
    return cls(resolutions=tuple(sorted({int(s) for s in config.get("train_resolutions") or ()},
                                        reverse=True)),
               scale_consistency=float(config.get("scale_consistency", 0.0)),
               policy_weight=float(policy.get("weight", 1.0)),
               penalty=float(policy.get("penalty", 1.0)),
               phase1_steps=int(policy.get("phase1_steps", 0)),
               ib_weight=ib.weight, ib_beta=ib.beta)


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
  _check_ib(config.get("ib") or {})
  return tuple(sorted(set(train + evals) - {size}))


def _check_ib(ib):
  unknown = sorted(set(ib) - {f.name for f in dataclasses.fields(IBOptions)})
  if unknown:
    raise ValueError(f"config.ib.{unknown[0]}: unknown field; allowed fields are "
                     f"{', '.join(f.name for f in dataclasses.fields(IBOptions))}")
  for field, low, integer in (("weight", 0, False), ("beta", 0, False), ("samples", 2, True),
                              ("kmeans_iters", 1, True), ("refresh_steps", 0, True)):
    v = ib.get(field, low)
    if integer and (not isinstance(v, int) or isinstance(v, bool) or v < low):
      raise ValueError(f"config.ib.{field}={v!r}: allowed values are integers >= {low}")
    if not integer and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
      raise ValueError(f"config.ib.{field}={v!r}: allowed values are finite numbers >= {low}")
  warmup = ib.get("warmup", 0.0)
  if not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
    raise ValueError(f"config.ib.warmup={warmup!r}: allowed values are fractions of "
                     "config.total_steps in [0, 1)")
