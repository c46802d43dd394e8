"""Rule tables that rename and reshape a foreign state dict into a vitjax parameter tree.

A converter is a list of `Rule`s. Each rule matches source keys with a regular expression and
names one or more vitjax parameter paths ('/'-joined, e.g. `Transformer/encoderblock_3/LayerNorm_0/
scale`) that the match's groups fill in. Its `transform` turns the source array into one array per
target; the targets' shapes (read from the model with `jax.eval_shape`, so nothing is allocated)
are passed in so a transform can fold a flat axis into heads.

`apply_rules` is strict: a source key no rule matches, a target the model does not have, a shape
that disagrees, and a model parameter nothing filled are all collected and reported in ONE
ValueError. A converter never returns a partially loaded tree.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import jax
import numpy as np

Shape = tuple[int, ...]
# transform(array, target_shapes) -> one array per target. A target shape is None when the model
# lacks that target; the transform must then still return an array (its shape is not checked).
Transform = Callable[[np.ndarray, Sequence[Shape | None]], Sequence[np.ndarray]]


class Converted(NamedTuple):
  """What a converter returns; unpack it as `model, variables, meta`.

  `meta` = {'source', 'source_model', 'model_name', 'model_overrides', 'image_size'}: what
  rebuilds the model (`create_model(meta['model_name'], **meta['model_overrides'])`); the command
  line stores it next to the params with `vitjax.checkpoint.save_params`.
  """
  model: Any                  # the vitjax flax module
  variables: dict[str, Any]   # {'params': nested dict of float32 numpy arrays}
  meta: dict[str, Any]


def _regroups(a: Shape, b: Shape) -> bool:
  """True when one shape only splits axes of the other (e.g. (D, H*d) <-> (D, H, d))."""
  ends = lambda s: set(np.cumprod(s, dtype=np.int64).tolist())  # noqa: E731
  return ends(a) <= ends(b) or ends(b) <= ends(a)


def _fit(x: np.ndarray, shape: Shape | None) -> np.ndarray:
  """Reshapes `x` to `shape` when only the grouping of axes differs (e.g. (D, H*d) -> (D, H, d))."""
  if shape is None or x.shape == tuple(shape) or x.size != int(np.prod(shape)):
    return x  # a size mismatch is reported by apply_rules with both shapes.
  if not _regroups(x.shape, tuple(shape)):
    return x  # same size but axes that do not correspond: reported as a mismatch too.
  return x.reshape(shape)


def copy(x, shapes):
  """Same values, regrouped to the target shape (biases, norms, tokens, position tables)."""
  return [_fit(x, shapes[0])]


def linear(x, shapes):
  """torch Linear weight (out, in) -> Flax kernel (in, out), regrouped (e.g. to (in, H, d))."""
  if x.ndim != 2:
    return [x]
  return [_fit(np.ascontiguousarray(x.T), shapes[0])]


def conv(x, shapes):
  """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
  if x.ndim != 4:
    return [x]
  return [_fit(np.ascontiguousarray(x.transpose(2, 3, 1, 0)), shapes[0])]


def split(n: int, inner: Transform) -> Transform:
  """Splits axis 0 into `n` equal parts (e.g. a fused qkv projection) and maps `inner` over them."""
  def transform(x, shapes):
    if x.shape[0] % n:
      return [x] * n  # apply_rules reports the shape mismatch.
    return [inner(part, [s])[0] for part, s in zip(np.split(x, n, axis=0), shapes)]
  return transform


@dataclasses.dataclass(frozen=True)
class Rule:
  """`pattern` (full match on a source key) -> `targets` (format strings over the match groups)."""
  pattern: str
  targets: tuple[str, ...]
  transform: Transform = copy

  def match(self, key: str):
    return re.fullmatch(self.pattern, key)


def rule(pattern: str, *targets: str, transform: Transform = copy) -> Rule:
  return Rule(pattern, tuple(targets), transform)


def state_shape(state: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
  """The shape of `state[key]`; a missing key means the state dict is not a `what` one."""
  if key not in state:
    raise ValueError(f"Not a {what} state dict: key {key!r} is missing "
                     f"(found {len(state)} keys, e.g. {sorted(state)[:5]}).")
  return tuple(state[key].shape)


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, bf16 included) or array-like -> float32/int numpy array."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating):
    value = value.astype(np.float32)
  return value


def abstract_params(model, *example_args, **example_kwargs) -> dict[str, Shape]:
  """'/'-joined parameter path -> shape, from `jax.eval_shape(model.init, ...)` (no allocation)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_args, **example_kwargs)
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def _short_list(items: Sequence[str], limit: int = 40) -> str:
  items = list(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return "\n    " + "\n    ".join(items[:limit]) + more


def apply_rules(state: Mapping[str, Any], rules: Sequence[Rule], target: Mapping[str, Shape], *,
                what: str, ignore: Sequence[str] = ()) -> dict[str, Any]:
  """Maps `state` through `rules` onto the parameter paths/shapes `target`; strict (module doc).

  Args:
    state: source key -> array (numpy, torch tensor, ...).
    rules: the converter's table; the first rule whose pattern matches a key wins.
    target: vitjax parameter path -> shape (from `abstract_params`).
    what: a name for error messages (e.g. "timm 'vit_base_patch16_224' -> vitjax 'vit_b16'").
    ignore: patterns of source keys that are known non-parameters (buffers) and are skipped.

  Returns:
    A nested parameter dict (float32 numpy arrays) with exactly the paths of `target`.

  Raises:
    ValueError: listing every unknown key, unfilled parameter and shape mismatch at once.
  """
  out: dict[str, np.ndarray] = {}
  unknown, problems, reported = [], [], set()
  for key, value in state.items():
    if any(re.fullmatch(p, key) for p in ignore):
      continue
    matched = next((r for r in rules if r.match(key)), None)
    if matched is None:
      unknown.append(f"{key} {tuple(np.shape(value))}")
      continue
    groups = matched.match(key).groups()
    paths = [t.format(*groups) for t in matched.targets]
    x = to_numpy(value)
    arrays = matched.transform(x, [target.get(p) for p in paths])
    for path, array in zip(paths, arrays):
      reported.add(path)
      if path not in target:
        problems.append(f"{key} {x.shape} -> {path}: the vitjax model has no such parameter")
      elif tuple(array.shape) != tuple(target[path]):
        problems.append(f"{key} {x.shape} -> {path}: shape {tuple(array.shape)} after conversion, "
                        f"the vitjax model expects {tuple(target[path])}")
      elif path in out:
        problems.append(f"{key} -> {path}: filled twice")
      else:
        out[path] = array
  missing = sorted(set(target) - set(out) - reported)
  if unknown or problems or missing:
    parts = [f"Cannot convert {what}; nothing was loaded."]
    if unknown:
      parts.append(f"{len(unknown)} source key(s) match no conversion rule:" + _short_list(unknown))
    if problems:
      parts.append(f"{len(problems)} key(s) do not fit the vitjax model:" + _short_list(problems))
    if missing:
      parts.append(f"{len(missing)} vitjax parameter(s) are missing from the source:"
                   + _short_list(f"{p} {tuple(target[p])}" for p in missing))
    raise ValueError("\n  ".join(parts))
  return flax.traverse_util.unflatten_dict(out, sep="/")
