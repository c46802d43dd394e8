"""Token reducers ('random', 'ltm', 'iared2'): the ops against loops and dense references (forward
and gradients); each reducer inside vit_nano4 in train and eval mode (token counts, prefix kept
in front, masked tokens without influence, sown losses and policy terms, where gradients flow);
the random baseline's draws; clear errors.

The models are small (width 32, 16 px images: 16 patch tokens, reducers before blocks 2 and 4),
run without jit (op by op is faster than compiling here) with perturbed random variables.
"""
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import token_reduction as reducers
from vitjax.models.backbone import Tokens
from vitjax.ops import token_reduction as ops

RNG = np.random.default_rng(0)
REDUCERS = (reducers.RandomDrop, reducers.LearnableTokenMerging, reducers.MultiHeadInterpreter)
SMALL = dict(num_classes=5, width=32, num_heads=2, mlp_dim=64, reduction_blocks=(2, 4))
IMAGES = jnp.asarray(RNG.normal(size=(2, 16, 16, 1)), jnp.float32)


def _normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _numeric_grad(f, args, i, eps=1e-6):
  """d sum(f(*args)) / d args[i] by central differences, float64."""
  args = [np.asarray(a, np.float64) for a in args]
  g = np.zeros_like(args[i])
  for j in np.ndindex(g.shape):
    up, down = [a.copy() for a in args], [a.copy() for a in args]
    up[i][j] += eps
    down[i][j] -= eps
    g[j] = (np.sum(f(*up)) - np.sum(f(*down))) / (2 * eps)
  return g


def _check(op, reference, *args, tol=1e-4):
  """`op` (jnp) equals `reference` (numpy loops, float64), and the gradient of a random weighting
  of its output equals the reference's, by central differences, for every argument."""
  out = op(*args)
  _close(out, reference(*[np.asarray(a, np.float64) for a in args]), tol)
  w = RNG.normal(size=np.shape(out))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(w * op(*a)), tuple(range(len(args)))))(*args)
  for i, g in enumerate(grads):
    _close(g, _numeric_grad(lambda *a: w * reference(*a), args, i), tol)


# ------------------------------------------------------------------------------------------------
# ops against loops.

VALID = np.array([[True, True, False, True, True], [True, True, True, True, True]])


def _merge_loop(x, logits):
  """X'_a = sum_i w_ia x_i, w_ia = exp(l_ia) / sum_{j in play} exp(l_ja), one (b, a) at a time."""
  b, n, k = logits.shape
  out = np.zeros((b, k, x.shape[-1]))
  for bi in range(b):
    for a in range(k):
      w = [np.exp(logits[bi, i, a]) if VALID[bi, i] else 0.0 for i in range(n)]
      for i in range(n):
        out[bi, a] += w[i] / sum(w) * x[bi, i]
  return out


def test_merge_against_loops():
  x, logits = _normal(2, 5, 4), _normal(2, 5, 3)
  m = ops.merge_matrix(logits, VALID)
  _close(m.sum(axis=1), np.ones((2, 3)))                      # columns sum to 1
  assert float(jnp.abs(m[0, 2]).max()) == 0.0                  # a token out of play: weight 0
  _check(lambda x, l: ops.merge_tokens(x, ops.merge_matrix(l, VALID)), _merge_loop, x, logits)


def _information_loop(logits):
  """I(I; A) with p(i) uniform over the tokens in play, p(a | i) the row-normalised M."""
  out = []
  for b in range(logits.shape[0]):
    idx = [i for i in range(logits.shape[1]) if VALID[b, i]]
    e = np.exp(logits[b])
    m = e / sum(e[i] for i in idx)                                         # columns of M
    cond = {i: m[i] / m[i].sum() for i in idx}                             # p(a | i)
    p_a = sum(cond[i] for i in idx) / len(idx)
    out.append(sum(np.sum(cond[i] * np.log(cond[i] / p_a)) for i in idx) / len(idx))
  return np.array(out)


def test_assignment_information_against_loops():
  _check(lambda l: ops.assignment_information(ops.merge_matrix(l, VALID), VALID),
         _information_loop, _normal(2, 5, 3))
  uniform = jnp.full((1, 6, 3), 1 / 6)
  hard = jnp.asarray(np.kron(np.eye(3), np.ones((2, 1))) / 2)[None]        # 2 tokens per slot
  _close(ops.assignment_information(uniform), [0.0])
  _close(ops.assignment_information(hard), [math.log(3)])


def test_interpreter_logits_and_log_prob_against_loops():
  def loop(q, k):
    s = np.zeros((2, 5))
    for b, i, h in np.ndindex(2, 5, 3):
      s[b, i] += np.dot(q[b, h], k[b, i, h]) / np.sqrt(4) / 3
    return s
  _check(ops.interpreter_logits, loop, _normal(2, 3, 4), _normal(2, 5, 3, 4))
  action = RNG.uniform(size=(2, 5)) < 0.5

  def lp_loop(s):
    pi = 1 / (1 + np.exp(-s))
    return np.array([sum(np.log(pi[b, i] if action[b, i] else 1 - pi[b, i])
                         for i in range(5) if VALID[b, i]) for b in range(2)])
  _check(lambda s: ops.bernoulli_log_prob(s, action, VALID), lp_loop, _normal(2, 5))


def test_bucketed_top_k_against_loop():
  scores = RNG.uniform(size=(3, 7)).astype(np.float32)
  scores[2] *= 0.4                                             # all below the threshold
  valid = RNG.uniform(size=(3, 7)) < 0.8
  valid[:, 0] = False
  index, keep = ops.bucketed_top_k(jnp.asarray(scores), 4, 0.5, jnp.asarray(valid))
  for b in range(3):
    ranked = sorted(range(7), key=lambda i: (not valid[b, i], -scores[b, i]))[:4]
    assert list(np.asarray(index[b])) == sorted(ranked)
    want = [bool(valid[b, i]) and (scores[b, i] >= 0.5 or i == ranked[0]) for i in sorted(ranked)]
    assert list(np.asarray(keep[b])) == want
  assert int(keep[2].sum()) == 1                               # only the best one of row 2


def test_ib_bound_against_repository_formula():
  """The LTM repository's `get_IB_Loss` and `get_clust_score`, written out term by term."""
  c_in, c_out = RNG.normal(size=(3, 6)) * 0.5, RNG.normal(size=(3, 5)) * 0.5
  labels = [0, 1, 1, 0]
  q = np.exp(RNG.normal(size=(3, 2)))
  q /= q.sum(0)                                                # Q[a, c] = p(a | c)

  def scores_loop(f, c):
    out = np.zeros((f.shape[0], c.shape[0]))
    for n in range(f.shape[0]):
      unit = f[n] / np.sqrt(np.sum(f[n] ** 2))
      d = [np.sum((unit - c[k]) ** 2) for k in range(c.shape[0])]
      out[n] = np.exp(-np.array(d)) / np.sum(np.exp(-np.array(d)))
    return out

  def bound_loop(fi, fo):
    si, so = scores_loop(fi, c_in), scores_loop(fo, c_out)
    return np.array([sum(so[n, a] * si[n, b] * np.log(si[n, b]) for a in range(3)
                         for b in range(3)) - sum(so[n, a] * np.log(q[a, labels[n]])
                                                  for a in range(3)) for n in range(4)])

  target = jax.nn.one_hot(jnp.array(labels), 2)
  _check(lambda fi, fo: ops.ib_bound(ops.cluster_scores(fi, jnp.asarray(c_in, jnp.float32)),
                                     ops.cluster_scores(fo, jnp.asarray(c_out, jnp.float32)),
                                     target, jnp.asarray(q, jnp.float32)),
         bound_loop, _normal(4, 6), _normal(4, 5))


# ------------------------------------------------------------------------------------------------
# Reducers inside a model.

def _model(reducer, keep_ratio=0.5, **kw):
  """vit_nano4 narrowed, with the Fashion-MNIST config's pooling ('gap': no prefix token)."""
  return vitjax.create_model("vit_nano4", pool="gap", token_reduction=reducer,
                             keep_ratio=keep_ratio, **{**SMALL, **kw})


def _variables(model, x=IMAGES, **kw):
  """Random variables (no init compile): weights ~ N(0, 1/fan_in), norms and biases off identity."""
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), x, **kw))
  out = {}
  for path, leaf in shapes.items():
    if len(leaf.shape) > 1:
      value = RNG.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = (path[-1] == "scale") + 0.3 * RNG.normal(size=leaf.shape)
    out[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def _run(model, variables, train, *, rng=1, edit=None):
  """logits, sown collections and [(tokens in, tokens out)] of each reducer; `edit(tokens)`
  replaces a reducer's output."""
  seen = []

  def hook(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, REDUCERS) and context.method_name == "__call__":
      out = edit(out) if edit else out
      seen.append((args[0], out))
    return out
  with nn.intercept_methods(hook):
    logits, sown = model.apply(variables, IMAGES, train=train, rngs={"dropout": jax.random.key(rng)},
                               mutable=["aux_loss", "policy"])
  return logits, sown, seen


@pytest.fixture(scope="module")
def models():
  """(model, variables) for each reducer at keep_ratio 0.5, before blocks 2 and 4."""
  out = {}
  for name in ("random", "ltm", "iared2"):
    model = _model(name, reduction_kwargs=dict(threshold=0.45) if name == "iared2" else None)
    out[name] = (model, _variables(model))
  return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["random", "ltm", "iared2"])
def test_token_counts_and_sown_values(models, name, train):
  model, variables = models[name]
  logits, sown, seen = _run(model, variables, train)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  masks_train = name == "iared2" and train
  want = [(16, 16), (16, 16)] if masks_train else [(16, 8), (8, 4)]
  assert [(a.x.shape[1], b.x.shape[1]) for a, b in seen] == want
  assert all((after.grid is not None) == masks_train for _, after in seen)
  ib = jax.tree.leaves(sown.get("aux_loss", {}))
  assert len(ib) == (2 if name == "ltm" and train else 0)
  for value, n_out in zip(ib, (8, 4)):                             # 0 <= 0.1 * I <= 0.1 log N'
    assert value.shape == () and 0.0 <= float(value) <= 0.1 * math.log(n_out) + 1e-6
  if name != "iared2":
    assert not jax.tree.leaves(sown.get("policy", {}))
    return
  policy = sown["policy"]["Transformer"]
  for k, n_in, (_, after) in zip((2, 4), (16, 16 if train else 8), seen):
    kept = policy[f"tokenreducer_{k}"]["kept"][0]
    assert kept.shape == (2,) and 0.0 < float(kept.min()) < 1.0
    _close(kept, after.mask.sum(1) / n_in)
    assert ("log_prob" in policy[f"tokenreducer_{k}"]) == train
    if train:
      lp = policy[f"tokenreducer_{k}"]["log_prob"][0]
      assert lp.shape == (2,) and bool(jnp.all(jnp.isfinite(lp))) and float(lp.max()) < 0
  if train:   # the second interpreter samples only among the tokens the first kept
    first, second = seen[0][1].mask, seen[1][1].mask
    assert not bool(jnp.any(second & ~first)) and bool(jnp.any(first & ~second))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["random", "ltm", "iared2"])
def test_prefix_tokens_kept_in_front(name, train):
  """On a carry with a CLS token: it comes out first and unchanged; a mask covers it."""
  module = dict(zip(("random", "ltm", "iared2"), REDUCERS))[name](keep_ratio=0.5)
  tokens = Tokens(_normal(2, 17, 8), grid=(4, 4), num_prefix=1)
  variables = _variables(module, tokens)
  out = module.apply(variables, tokens, train=train, rngs={"dropout": jax.random.key(0)})
  assert out.num_prefix == 1 and out.x.shape[1] == (17 if name == "iared2" and train else 9)
  np.testing.assert_array_equal(out.x[:, 0], tokens.x[:, 0])
  if out.mask is not None:
    assert bool(out.mask[:, 0].all())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_masked_tokens_have_no_influence(models, train):
  """IA-RED² masks: changing a masked token's content (after the interpreter) leaves the logits
  unchanged (attention keys and the 'gap' pooling skip it); changing a kept one does not."""
  model, variables = models["iared2"]
  logits, _, seen = _run(model, variables, train)
  masks = [after.mask for _, after in seen]
  assert all(not bool(m.all()) for m in masks)                    # something is masked

  def overwrite(which):
    calls = iter(range(2))

    def edit(tokens):
      pick = which(masks[next(calls)])[..., None]
      return tokens.replace(x=jnp.where(pick, 5.0 * _normal(*tokens.x.shape), tokens.x))
    return edit
  masked, _, _ = _run(model, variables, train, edit=overwrite(lambda m: ~m))
  _close(masked, logits, 1e-5)
  kept, _, _ = _run(model, variables, train, edit=overwrite(lambda m: m))
  assert float(jnp.abs(kept - logits).max()) > 1e-3


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradients_flow_where_documented(train):
  """IA-RED²: the reducer's output does not depend differentiably on the interpreter (the
  classification loss cannot reach it) and passes the kept tokens through unchanged; the policy's
  log-probability reaches the interpreter only, not the tokens (so not the backbone before it).
  LTM: the output depends on the merging layer."""
  tokens = Tokens(_normal(2, 17, 8), grid=(4, 4), num_prefix=1)   # the prefix test's shapes
  w = _normal(2, 17, 8)

  def grads(module, fn):
    variables = _variables(module, tokens)
    def loss(params, x):
      out, sown = module.apply({"params": params}, tokens.replace(x=x), train=train,
                               rngs={"dropout": jax.random.key(0)}, mutable=["policy"])
      return fn(out, sown)
    return jax.jit(jax.grad(loss, (0, 1)))(variables["params"], tokens.x)
  total = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)))
  interpreter = reducers.MultiHeadInterpreter(keep_ratio=0.5)
  g_params, g_x = grads(interpreter, lambda out, _: jnp.sum(out.x * w[:, :out.x.shape[1]]))
  assert total(g_params) == 0.0 and total(g_x) > 0.0
  if train:   # tokens stay in place, unchanged
    _close(g_x, w)
    g_params, g_x = grads(interpreter, lambda _, sown: jnp.sum(sown["policy"]["log_prob"][0]))
    assert total(g_params) > 0.0 and total(g_x) == 0.0
  ltm = reducers.LearnableTokenMerging(keep_ratio=0.5)
  g_params, _ = grads(ltm, lambda out, _: jnp.sum(out.x * w[:, :out.x.shape[1]]))
  assert total(g_params["merge"]) > 0.0 and total(g_params["norm"]) > 0.0


def test_random_baseline(models):
  model, variables = models["random"]
  kept = lambda train, rng: _run(model, variables, train, rng=rng)[2][0][1].x
  assert not np.array_equal(kept(True, 1), kept(True, 2))          # draws differ between rngs
  np.testing.assert_array_equal(kept(False, 1), kept(False, 2))    # eval: one fixed subset
  # keep_ratio=1: nothing to drop, the model is plain ViT (same variables, same logits)
  plain = vitjax.create_model("vit_nano4", pool="gap", **{**SMALL, "reduction_blocks": ()})
  _close(_model("random", keep_ratio=1.0).apply(variables, IMAGES),
         plain.apply(variables, IMAGES), 1e-6)


def test_added_parameters(models):
  """LTM adds a LayerNorm and a Dense to N' logits, IA-RED² a LayerNorm, query and key
  projections (4 heads of 16) and a bias, per reducer."""
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  plain = count(jax.eval_shape(vitjax.create_model(
      "vit_nano4", pool="gap", **{**SMALL, "reduction_blocks": ()}).init, jax.random.key(0), IMAGES))
  d = SMALL["width"]
  assert count(models["random"][1]) == plain
  assert count(models["ltm"][1]) == plain + sum(2 * d + (d + 1) * k for k in (8, 4))
  assert count(models["iared2"][1]) == plain + 2 * (2 * d + 2 * (d + 1) * 64 + 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_ratio=0.0), r"keep_ratio=0\.0: allowed values are in \(0, 1\]"),
    (dict(keep_ratio=1.5), r"keep_ratio=1\.5: allowed values are in \(0, 1\]"),
    (dict(token_reduction="ltmm"), r"Unknown token_reduction='ltmm'\. Did you mean: ltm"),
    (dict(reduction_blocks=(2, 6)), r"reduction_blocks=\(2, 6\).*0\.\.5"),
    (dict(reduction_blocks=()), r"needs reduction_blocks"),
    (dict(token_reduction="iared2", reduction_kwargs=dict(threshold=1.0)),
     r"reduction_kwargs\.threshold=1\.0: allowed values are in \(0, 1\)"),
    (dict(reduction_kwargs=dict(ib_weight=-1.0)), r"ib_weight=-1\.0: allowed values are >= 0"),
])
def test_clear_errors(kwargs, match):
  kwargs = {"token_reduction": "ltm", **kwargs}
  model = vitjax.create_model("vit_nano4", **{**SMALL, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)
