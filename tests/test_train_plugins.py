"""The runner's plug-ins (vitjax/train_plugins.py): ResFormer's multi-resolution loss, evals at
other test-image sides, IA-RED²'s REINFORCE loss and its interpreter-only phase, LTM's
information bottleneck (k-means, Q, the repository's bound, its schedule), the config errors, and every configs/plugins.py variant whose plug-ins are registered."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vitjax
from vitjax import train
from vitjax import train_plugins
from vitjax.configs import plugins as plugins_config
from vitjax.models import plugins
from tests.test_train import tiny_config

SIDES = (16, 12, 8)     # a 16 px batch trained at 16, 12 and 8 px (patch 4)
LAMBDA = 0.7
TINY_VIT = dict(patch_size=4, depth=1, width=16, mlp_dim=32, num_heads=2, pool="gap")


def _random_params(model, images, seed=0):
  """Every parameter drawn from N(0, 0.5^2) on the host: nothing at init values (a zero head,
  LayerNorms at identity), and no init to compile."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])["params"]
  return jax.tree.map(lambda x: jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype), shapes)


def _state(params, tx):
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------
# ResFormer: multi-resolution replicas and the scale-consistency loss.

def test_resize_is_torch_antialiased_bicubic():
  torch = pytest.importorskip("torch", reason="torch is the reference for the resize")
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  resize = jax.jit(train_plugins.resize_images, static_argnums=1)
  for side in (20, 16, 36):   # down (antialiased), down by more than 1.5x, up
    ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(side, side), mode="bicubic",
                        antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resize(jnp.asarray(x), side), ref, atol=1e-5)
  same = jnp.asarray(x)
  assert train_plugins.resize_images(same, 28) is same   # the data's own side: untouched


def _smooth_l1_reference(student, teacher):
  """torch's F.smooth_l1_loss(student, layer_norm(teacher, eps=1e-6)), beta 1, written out."""
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  total = 0.0
  for a, b in zip(s.ravel(), t.ravel()):
    d = abs(a - b)
    total += 0.5 * d * d if d < 1.0 else d - 0.5
  return total / s.size


def test_multires_loss_is_the_plain_sum():
  model = vitjax.create_model("vit_nano4", num_classes=5, **TINY_VIT)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.arange(8) % 5
  params = _random_params(model, images)
  tx = optax.sgd(0.0)
  opts = train_plugins.StepOptions(resolutions=SIDES, scale_consistency=LAMBDA)
  step = train.make_train_step(model, tx, options=opts)
  # Only the loss is read, so XLA drops the backward pass and the update from this compile.
  loss = jax.jit(lambda *args: step(*args)[1][0])(
      _state(params, tx), {"image": images, "label": labels}, jax.random.key(2))

  # The same sum, written out: CE at each side, plus lambda * smooth-L1 of each side's pre-logits
  # against the next larger side's (official chain), divided by the number of sides.
  @jax.jit
  def forward(x):   # (logits, pre-logits) at each side, in one compile
    return [model.apply({"params": params}, jax.image.resize(x, (8, side, side, 1), "bicubic",
                                                             antialias=True), features=True)
            for side in SIDES]
  total, consistency, previous = 0.0, 0.0, None
  for logits, out in forward(images):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total += -np.mean(logp[np.arange(8), np.asarray(labels)])
    if previous is not None:
      consistency += LAMBDA * _smooth_l1_reference(out["pre_logits"], previous)
    previous = out["pre_logits"]
  np.testing.assert_allclose(float(loss), (total + consistency) / len(SIDES), rtol=1e-5)
  assert consistency > 1e-2 * total    # the term is a real part of what was compared


def test_scale_consistency_sends_no_gradient_to_the_teacher():
  s, t = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 8)), jnp.float32)
  g_s, g_t = jax.jit(jax.grad(train_plugins.scale_consistency_loss, argnums=(0, 1)))(s, 3 * t)
  assert np.all(np.asarray(g_t) == 0) and np.any(np.asarray(g_s) != 0)


def test_evals_at_untrained_sides_run_and_log(fmnist, tmp_path, monkeypatch):
  c = tiny_config(fmnist, total_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                  log_every_steps=2, train_resolutions=(16, 8), eval_resolutions=(16, 20),
                  scale_consistency=0.5)
  c.policy.penalty = 3.0
  passed = []

  def spy(model, tx, *, label_smoothing=0.0, options=None):
    """Records the options the runner passes, then builds the plain step: the multi-resolution
    step itself is checked above, and its compile is not needed twice."""
    passed.append(options)
    return make_train_step(model, tx, label_smoothing=label_smoothing)
  make_train_step = train.make_train_step
  monkeypatch.setattr(train, "make_train_step", spy)
  row = train.train_and_evaluate(c, str(tmp_path))
  assert passed == [train_plugins.StepOptions(resolutions=(16, 8), scale_consistency=0.5,
                                              penalty=3.0)]
  for side in (16, 20):    # 20 px was never trained
    assert 0.0 <= row[f"eval/accuracy@{side}"] <= 1.0 and np.isfinite(row[f"eval/loss@{side}"])
  assert row["eval/accuracy"] == row["eval/accuracy@16"] and row["eval/gmacs"] == row["eval/gmacs@16"]
  assert row["eval/gmacs@16"] < row["eval/gmacs@20"]
  assert row["eval/loss@16"] != row["eval/loss@20"]   # the test images were really resized
  logged = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert any("eval/accuracy@20" in r for r in logged)


# ---------------------------------------------------------------------------------------------
# IA-RED²: REINFORCE on what a reducer sows into 'policy', and the interpreter-only phase.

class StandInInterpreter(nn.Module):
  """Sows what the 'iared2' reducer sows: keep probabilities pi = sigmoid(x w) per token, a
  Bernoulli(pi) keep mask drawn from 'dropout', log_prob (B,) and kept (B,)."""

  @nn.compact
  def __call__(self, x, *, train):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1],))
    pi = jax.nn.sigmoid(x @ w)                                         # (B, N)
    keep = jax.random.bernoulli(self.make_rng("dropout"), pi) if train else pi > 0.5
    log_prob = jnp.sum(jnp.where(keep, jnp.log(pi), jnp.log1p(-pi)), axis=-1)
    self.sow("policy", "log_prob", log_prob)
    self.sow("policy", "kept", keep.mean(-1))
    return x * jax.lax.stop_gradient(keep)[..., None]


class StandInModel(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, images, *, train=False):
    x = nn.Dense(6, name="embed")(images.reshape(images.shape[0], -1, 4))   # (B, N, 6) tokens
    x = StandInInterpreter(name="tokenreducer_0")(x, train=train)
    x = StandInInterpreter(name="tokenreducer_1")(nn.relu(x), train=train)
    return nn.Dense(self.num_classes, name="head")(x.mean(1))


WEIGHT, PENALTY = 0.3, 2.0


@pytest.fixture(scope="module")
def stand_in():
  """The stand-in, its params, a batch, and one compiled step (REINFORCE weight 0.3, penalty 2,
  two interpreter-only steps) that both tests share."""
  model = StandInModel()
  images = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4, 4, 1)), jnp.float32)
  batch = {"image": images, "label": jnp.arange(16) % 3}
  params = _random_params(model, images, seed=4)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  opts = train_plugins.StepOptions(policy_weight=WEIGHT, penalty=PENALTY, phase1_steps=2)
  step = jax.jit(train.make_train_step(model, tx, options=opts))
  return model, params, batch, lambda: _state(params, tx), step


def test_reinforce_loss_equals_the_hand_computed_value(stand_in):
  model, params, batch, fresh_state, step = stand_in
  key = jax.random.key(5)
  _, (loss, _) = step(fresh_state(), batch, key)
  # The step's draw: its key folded with step 0.
  logits, sown = jax.jit(lambda x, rng: model.apply(
      {"params": params}, x, train=True, rngs={"dropout": rng}, mutable=["policy"]))(
          batch["image"], jax.random.fold_in(key, 0))
  logits, labels = np.asarray(logits, np.float64), np.asarray(batch["label"])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -logp[np.arange(16), labels].mean()
  correct = logits.argmax(-1) == labels
  assert 0 < correct.sum() < 16    # both branches of the reward are exercised
  for scope in ("tokenreducer_0", "tokenreducer_1"):
    (lp,), (kept,) = (np.asarray(sown["policy"][scope][k], np.float64) for k in ("log_prob", "kept"))
    reward = [1 - k * k if ok else -PENALTY for k, ok in zip(kept, correct)]
    baseline = sum(reward) / 16
    expected += WEIGHT * -sum((r - baseline) * l for r, l in zip(reward, lp)) / 16
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_reinforce_gradient_reaches_only_the_log_probabilities():
  rng = np.random.default_rng(0)
  logits, lp = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((8, 3), (8,)))
  labels, kept = jnp.arange(8) % 3, jnp.asarray(rng.uniform(size=8), jnp.float32)
  f = lambda lo, l, k: train_plugins.reinforce_loss(lo, labels, [(l, k)], penalty=1.0)  # noqa: E731
  g_logits, g_lp, g_kept = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(logits, lp, kept)
  assert not np.any(np.asarray(g_logits)) and not np.any(np.asarray(g_kept))
  assert np.any(np.asarray(g_lp))


def test_phase1_trains_only_the_interpreters(stand_in):
  _, params, batch, fresh_state, step = stand_in
  state, key = fresh_state(), jax.random.key(6)
  trail = [params]
  for _ in range(3):
    state, _ = step(state, batch, key)
    trail.append(state["params"])
  for before, after in zip(trail[:2], trail[1:3]):       # phase 1: steps 1 and 2
    for name in ("embed", "head"):
      jax.tree.map(np.testing.assert_array_equal, before[name], after[name])
    for name in ("tokenreducer_0", "tokenreducer_1"):
      assert not np.allclose(before[name]["w"], after[name]["w"])
  assert not np.allclose(trail[2]["head"]["kernel"], trail[3]["head"]["kernel"])   # joint


# ---------------------------------------------------------------------------------------------
# LTM's information bottleneck as its repository trains it.

def _kmeans_reference(x, init, iters):
  """Lloyd's rounds written out: nearest centroid by a loop, empty clusters left in place."""
  c = x[init].copy()
  for _ in range(iters):
    a = np.array([np.argmin([np.sum((xi - cj) ** 2) for cj in c]) for xi in x])
    c = np.stack([x[a == j].mean(0) if np.any(a == j) else c[j] for j in range(len(c))])
  return c


def test_kmeans_is_lloyd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 5)) + 3 * rng.normal(size=(4, 5))[rng.integers(0, 4, 60)]
  key = jax.random.key(1)
  init = np.asarray(jax.random.choice(key, 60, (4,), replace=False))
  c = jax.jit(train_plugins.kmeans, static_argnames=("k", "iters"))(
      jnp.asarray(x, jnp.float32), k=4, iters=6, key=key)
  ref = _kmeans_reference(x, init, 6)
  assert not np.allclose(ref, x[init], atol=1e-2)     # the rounds moved the centroids
  np.testing.assert_allclose(np.asarray(c), ref, atol=1e-5)


def test_class_cluster_q_is_the_per_class_mean():
  rng = np.random.default_rng(1)
  score = np.asarray(jax.nn.softmax(rng.normal(size=(12, 4)), -1))
  labels = rng.integers(0, 4, 12)            # class 4 of 5 has no sample
  q = np.asarray(train_plugins.class_cluster_q(jnp.asarray(score),
                                               jax.nn.one_hot(labels, 5)))
  for c in range(5):
    expected = score[labels == c].mean(0) if np.any(labels == c) else np.full(4, 0.25)
    np.testing.assert_allclose(q[:, c], expected, rtol=1e-6)


def _ib_reference(images, pre_logits, labels, c_in, c_out, q, beta):
  """LabelSmoothingCrossEntropy_IB.get_IB_Loss on get_clust_score's scores (the LTM repository),
  written out in float64."""
  def scores(feat, centroids):
    f = feat.reshape(len(feat), -1).astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = -beta * np.stack([np.sum((f - c) ** 2, -1) for c in centroids], 1)
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
  s_in, s_out = scores(images, c_in), scores(pre_logits, c_out)
  t = np.eye(q.shape[1])[labels]
  term_1 = np.einsum("na,nb->n", s_out, s_in * np.log(s_in))
  term_2 = np.einsum("na,nc,ac->n", s_out, t, np.log(q))
  return np.mean(term_1 - term_2)


def _ib_arrays(rng, pixels, width, k, classes, on=1.0):
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  q = np.asarray(jax.nn.softmax(rng.normal(size=(k, classes)), 0))
  return dict(c_in=jnp.asarray(unit(rng.normal(size=(k, pixels))), jnp.float32),
              c_out=jnp.asarray(unit(rng.normal(size=(k, width))), jnp.float32),
              q=jnp.asarray(q, jnp.float32), on=jnp.asarray(on, jnp.float32))


def test_ib_loss_is_the_repository_bound_and_differentiable():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(6, 4, 4, 1))
  z = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 0, 1, 2])
  arrays = _ib_arrays(rng, 16, 8, 3, 3)
  f = jax.jit(lambda x, z, arrays: train_plugins.ib_loss(x, z, labels, arrays, beta=2.0))
  x = jnp.asarray(images, jnp.float32)
  ref = _ib_reference(images, np.asarray(z), np.asarray(labels),
                      *(np.asarray(arrays[k], np.float64) for k in ("c_in", "c_out", "q")), 2.0)
  np.testing.assert_allclose(float(f(x, z, arrays)), ref, rtol=1e-5)
  assert float(f(x, z, dict(arrays, on=jnp.zeros(())))) == 0.0      # the warm-up
  jax.test_util.check_grads(lambda z: f(x, z, arrays), (z,), order=1, modes=["rev"],
                            eps=1e-2, atol=2e-3, rtol=2e-2)


def test_step_adds_the_weighted_ib_term():
  model = vitjax.create_model("vit_nano4", num_classes=3, **TINY_VIT)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  batch = {"image": images, "label": jnp.arange(8) % 3}
  params = _random_params(model, images, seed=5)
  tx = optax.sgd(0.0)
  step = train.make_train_step(model, tx, options=train_plugins.StepOptions(ib_weight=0.4))
  loss = jax.jit(lambda s, b, k, ib: step(s, b, k, ib=ib)[1][0])
  arrays = _ib_arrays(rng, 256, 16, 3, 3)
  on, off = (float(loss(_state(params, tx), batch, jax.random.key(0), dict(arrays, on=v)))
             for v in (jnp.ones(()), jnp.zeros(())))
  _, feats = model.apply({"params": params}, images, features=True)
  term = train_plugins.ib_loss(images, feats["pre_logits"], batch["label"], arrays, beta=1.0)
  assert abs(float(term)) > 1e-3
  np.testing.assert_allclose(on - off, 0.4 * float(term), rtol=1e-4, atol=1e-6)


def test_information_bottleneck_refreshes_on_schedule():
  rng = np.random.default_rng(4)
  images = rng.normal(size=(20, 4, 4, 1)).astype(np.float32)
  options = train_plugins.IBOptions(weight=0.1, warmup=0.5, refresh_steps=3, kmeans_iters=3)
  ib = train_plugins.InformationBottleneck(
      options, images=images, labels=np.arange(20) % 4, num_classes=4,
      features=lambda v, x: v * x.reshape(len(x), -1)[:, :6], total_steps=10, steps_per_epoch=7,
      seed=0)
  assert ib.c_in.shape == (4, 16)
  refreshed = [step for step in range(1, 11) if ib.update(step, 2.0, batch_size=8)]
  assert refreshed == [1, 6, 9]       # the first step, the end of the warm-up, every 3 after
  assert ib.c_out.shape == (4, 6) and ib.q.shape == (4, 4)
  np.testing.assert_allclose(np.asarray(ib.q).sum(0), 1.0, rtol=1e-5)   # Q[:, c] = p(a | c)
  assert [float(ib.arrays(s)["on"]) for s in (5, 6)] == [0.0, 1.0]


def test_runner_trains_with_the_ib_term(fmnist, tmp_path, monkeypatch):
  c = tiny_config(fmnist, total_steps=4, eval_every_steps=4, checkpoint_every_steps=4,
                  log_every_steps=2)
  c.ib.update(weight=0.1, warmup=0.5, samples=32, refresh_steps=1)
  updates = []
  real = train_plugins.InformationBottleneck.update

  def spy(self, step, variables, batch_size):
    updates.append((step, self.due(step)))
    return real(self, step, variables, batch_size)
  monkeypatch.setattr(train_plugins.InformationBottleneck, "update", spy)
  row = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(row["eval/loss"])
  assert updates == [(1, True), (3, True), (4, True)]   # step 1, then every step from 3 on


# ---------------------------------------------------------------------------------------------
# Config errors and the issue-14 configs.

@pytest.mark.parametrize("overrides, match", [
    (dict(train_resolutions=(16, 10)), r"config\.train_resolutions=\(16, 10\): 10 is not a multiple"),
    (dict(eval_resolutions=(16, 18)), r"config\.eval_resolutions=\(16, 18\): 18 is not a multiple"),
    (dict(train_resolutions=(12, 8)), r"config\.train_resolutions.*largest side must be "
                                      r"config\.data\.image_size=16"),
    (dict(eval_resolutions=(16, 16)), r"config\.eval_resolutions.*lists a side twice"),
    (dict(scale_consistency=-1.0), r"config\.scale_consistency=-1\.0"),
])
def test_bad_resolutions_name_the_field(fmnist, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.check_config(tiny_config(fmnist, **overrides))


def test_bad_policy_fields_name_the_field(fmnist):
  c = tiny_config(fmnist)
  c.policy.phase1_steps = 3
  with pytest.raises(ValueError, match=r"config\.policy\.phase1_steps=3 .*has none"):
    train.check_config(c)
  c.policy.phase1_steps, c.policy.penalty = 0, -1.0
  with pytest.raises(ValueError, match=r"config\.policy\.penalty=-1\.0"):
    train.check_config(c)
  c.policy.penalty = 1.0
  c.train_resolutions = (16, 8)   # pre_logits after a gathering reducer: no features there
  c.model.update(token_reduction="random", reduction_blocks=(0,), keep_ratio=0.5)
  with pytest.raises(ValueError, match=r"config\.scale_consistency=1\.0 uses the pre_logits"):
    train.check_config(c)
  c.train_resolutions = ()
  c.ib.weight = 0.1                # LTM's IB term reads the pre_logits too
  with pytest.raises(ValueError, match=r"config\.ib\.weight=0\.1 uses the pre_logits"):
    train.check_config(c)
  with pytest.raises(ValueError, match="finetune.*needs reduction=iared2"):
    plugins_config.get_config("reduction=ltm,finetune")
  with pytest.raises(ValueError, match="Unknown posemb='sincos'"):
    plugins_config.get_config("posemb=sincos")
  with pytest.raises(ValueError, match="penalty is IA-RED²'s reward: it needs reduction=iared2"):
    plugins_config.get_config("reduction=ltm,penalty=4")
  with pytest.raises(ValueError, match="Unknown multires='yes'. Allowed values: auto, on, off"):
    plugins_config.get_config("posemb=learn,multires=yes")


@pytest.mark.parametrize("field, value, match", [
    ("weight", -0.1, r"config\.ib\.weight=-0\.1: allowed values are finite numbers >= 0"),
    ("warmup", 1.0, r"config\.ib\.warmup=1\.0: allowed values are fractions"),
    ("samples", 1, r"config\.ib\.samples=1: allowed values are integers >= 2"),
    ("kmeans_iters", 0, r"config\.ib\.kmeans_iters=0: allowed values are integers >= 1"),
    ("clusters", 4, r"config\.ib\.clusters: unknown field; allowed fields are weight, "),
])
def test_bad_ib_fields_name_the_field(field, value, match):
  c = plugins_config.get_config("reduction=ltm")
  c.ib[field] = value
  with pytest.raises(ValueError, match=match):
    train_plugins.check_config(c, 4, {})


VARIANTS = ["posemb=learn", "posemb=resformer", "posemb=rpe2d", "reduction=ltm,keep=0.5",
            "reduction=iared2,keep=0.5", "reduction=random,keep=0.5", "norm=dtn",
            "reduction=iared2,keep=0.5,finetune", "posemb=resformer,multires=off",
            "posemb=learn,multires=on", "reduction=iared2,keep=0.5,penalty=4"]


@pytest.mark.parametrize("arg", VARIANTS)
def test_plugins_config_builds(arg):
  c = plugins_config.get_config(arg)
  registered = plugins.registered()
  need = {"posemb": c.model.get("posemb", "learn"), "norm": c.model.get("norm", "ln"),
          "token_reduction": c.model.get("token_reduction", "none")}
  missing = [f"{k}={v!r}" for k, v in need.items() if v not in registered[k]]
  if missing:
    pytest.skip(f"{', '.join(missing)} is not registered yet")
  model = vitjax.create_model(c.model_name, num_classes=10, **c.model.to_dict())
  side = c.data.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 1)))
  # The plug-in fields are valid (the runner's own check; it also traces every other side).
  train_plugins.check_config(c, train.total_stride(model), shapes["params"])
  assert (model.width, model.depth, model.patch_size) == (96, 3, 4)   # configs/vit.py's model
  if "reduction" in arg:
    assert model.reduction_blocks == (1,) and model.keep_ratio == 0.5
  assert c.policy.penalty == (4.0 if "penalty=4" in arg else 1.0)
  multires = "multires=on" in arg or "posemb=resformer" in arg and "multires=off" not in arg
  assert c.train_resolutions == ((28, 20, 16) if multires else ())
