"""The one backbone (DESIGN.md, decisions 3, 10 and 11): a token carry, blocks and mixers by
registry, and stages.

  Tokens         - the carry: the main stream `x` (B, N, D), its static layout (`grid`,
                   `num_prefix`), `extra`, a dict of other streams (LookupViT's lookup tokens),
                   and `mask`, the tokens still in play when a reducer drops by masking.
  EncoderBlock   - block 'vit', the pre-norm Transformer block around any registered MIXER.
  StageSpec      - one stage: an optional downsampling layer, then `depth` blocks of `width`.
  run_stages     - THE loop over stages and blocks (drop-path schedule, names, features);
                   every model runs its blocks through it.
  Encoder        - the isotropic case: learned positions, one or more stages without
                   downsampling, final norm (vit_jax's `Transformer`, same parameter names).
  MultiStageModel- the hierarchical case: stem -> stages -> pooling -> head. A family declares
                   its stem, its stage specs and its pooling; it holds no loop of its own.
  Classifier     - the contract every registered model keeps: `apply(..., features=True)`,
                   `num_classes=0` for a headless model, `feature_info()`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Collection, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import layers, plugins
from vitjax.models.features import (Classifier, FeatureInfo, check_feature_blocks,  # noqa: F401
                                    spaced_blocks)
from vitjax.models.registry import (display_name, get_block, get_downsample, get_mixer,
                                    register_block)


@flax.struct.dataclass
class Tokens:
  """The carry between blocks. `grid` and `num_prefix` are static (not traced).

  `mask` (B, N) bool, when set, marks the tokens still in play (a token reducer that drops by
  masking, to keep shapes static in training): mixers that take it (`accepts_mask = True`)
  exclude the others as keys, and pooling ignores them. After a reducer that gathers or merges
  tokens, `grid` is None (the tokens no longer lie on a grid).
  """
  x: jnp.ndarray                                   # (B, N, D) main stream
  extra: dict[str, Any] = flax.struct.field(default_factory=dict)
  grid: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)
  num_prefix: int = flax.struct.field(pytree_node=False, default=0)
  mask: Any = None

  @classmethod
  def from_map(cls, x, **kw) -> "Tokens":
    """(B, h, w, D) map -> carry of h*w patch tokens with grid (h, w)."""
    b, h, w, d = x.shape
    return cls(x.reshape(b, h * w, d), grid=(h, w), **kw)

  def patch_map(self, stream: str | None = None):
    """The patch tokens of the main stream (or of `extra[stream]`) as a (B, h, w, D) map."""
    x = self.x if stream is None else self.extra[stream]
    if self.grid is None:
      raise ValueError("these tokens have no 2-D grid, so they have no patch map")
    num_prefix = self.num_prefix if stream is None else 0
    return layers.tokens_to_grid(x, self.grid, num_prefix)[1]


# Block fields a model shares with every block; a block receives those it declares. The same
# holds between blocks and mixers (`build_mixer`).
SHARED_FIELDS = ("num_heads", "attn_impl", "dropout")


def build_mixer(mixer, shared: Mapping[str, Any], mixer_kwargs: Mapping[str, Any] | None,
                **module_kw):
  """Instantiates `mixer` (registered name, class or partial) with the shared fields it declares
  plus its kwargs (strict: an unknown kwarg is an error naming the allowed fields)."""
  cls = get_mixer(mixer)
  fields = layers.module_fields(cls)
  kwargs = {k: v for k, v in shared.items() if k in fields}
  kwargs.update(mixer_kwargs or {})
  layers.check_overrides(cls, kwargs, what=f"mixer {display_name(mixer)!r}")
  scope = getattr(getattr(cls, "func", cls), "scope_name", "mixer")
  return cls(**kwargs, name=scope, **module_kw)


def call_mixer(mixer: nn.Module, x, tokens: Tokens, *, train: bool):
  kwargs = {}
  if tokens.mask is not None:
    if not getattr(mixer, "accepts_mask", False):
      raise ValueError(f"mixer {type(mixer).__name__} does not take a token mask, which the "
                       "token reducer before it sets (dropping by masking); use a mixer that "
                       "does (e.g. 'mhsa')")
    kwargs["mask"] = tokens.mask
  positions = tokens.extra.get("positions")
  if positions is not None:
    if not getattr(mixer, "accepts_positions", False):
      raise ValueError(f"mixer {type(mixer).__name__} takes no token positions, which "
                       "posemb='rpe2d' with kind='rope' puts on the carry; use mixer='prope_attn' "
                       "(transform='rope2d' or 'ray_rope2d')")
    kwargs["positions"] = positions
  if getattr(mixer, "needs_grid", False):
    if tokens.grid is None:
      raise ValueError(f"mixer {type(mixer).__name__} needs a 2-D token grid, but the tokens "
                       "have none (a token reducer before it gathers or merges tokens)")
    return mixer(x, grid=tokens.grid, num_prefix=tokens.num_prefix, train=train, **kwargs)
  return mixer(x, train=train, **kwargs)


@register_block("vit")
class EncoderBlock(nn.Module):
  """Pre-norm block: x + DropPath(mixer(N(x))), then x + DropPath(MLP(N(x))).

  N is LayerNorm, or the plug-in `norm` (`vitjax.models.plugins`, e.g. 'dtn'), named
  LayerNorm_0 / LayerNorm_1 either way.
  """
  mlp_dim: int
  num_heads: int
  mixer: Any = "mhsa"
  mixer_kwargs: Any = None
  attn_impl: str = "xla"
  dropout: float = 0.0
  drop_path: float = 0.0
  norm: Any = "ln"
  norm_kwargs: Any = None

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    shared = dict(num_heads=self.num_heads, attn_impl=self.attn_impl, dropout=self.dropout)
    x = tokens.x
    y = plugins.make_norm(self.norm, "LayerNorm_0", self.norm_kwargs)(x, tokens=tokens)
    y = call_mixer(build_mixer(self.mixer, shared, self.mixer_kwargs), y, tokens, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = plugins.make_norm(self.norm, "LayerNorm_1", self.norm_kwargs)(x, tokens=tokens)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, name="MlpBlock_0")(y, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return tokens.replace(x=x)


# ---------------------------------------------------------------------------------------------
# Stages.

@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: optional downsampling of the (B, H, W, C) map to `width`, then `depth` blocks.

  block / downsample: a registered name, a Linen class or a functools.partial of one.
  block_kwargs: fields for every block of the stage, checked strictly against the block's
    fields; of `shared` (see SHARED_FIELDS) a block receives only those it declares.
  downsample_kwargs: extra fields of the downsampling layer (built as `cls(width, **kwargs)`).
  cls_token: prepend a learned class token after the downsampling (CvT's last stage); it
    becomes a prefix token of the carry (`Tokens.num_prefix`).
  block_cycle: per-block fields taken in turn: block j of the stage also gets
    block_cycle[j % len(block_cycle)] (Swin: `(dict(shift=0), dict(shift=window // 2))`).
  reducer / reducer_kwargs: a token reducer (`plugins.REDUCERS` name, class or partial) run on
    the carry before the stage's blocks, built with `reducer_kwargs` (keep_ratio and its fields).
  """
  depth: int
  width: int
  block: Any = "vit"
  block_kwargs: Mapping[str, Any] | None = None
  shared: Mapping[str, Any] | None = None
  downsample: Any = None
  downsample_kwargs: Mapping[str, Any] | None = None
  cls_token: bool = False
  block_cycle: tuple[Mapping[str, Any], ...] | None = None
  reducer: Any = None
  reducer_kwargs: Mapping[str, Any] | None = None

  def downsample_stride(self) -> int:
    if self.downsample is None:
      return 1
    return layers.downsample_stride(get_downsample(self.downsample), self.downsample_kwargs)


class StageNames(NamedTuple):
  """How `run_stages` names what it creates. Templates see {i} (stage), {j} (block in the stage)
  and {k} (block over all stages).

  stage=None puts every block and downsampling layer straight into the calling module's scope
  (the flat layouts of vit_jax's `Transformer` and of HorNet); otherwise each stage is a module
  named `stage` holding `downsample` and its blocks.
  """
  stage: str | None = "stages_{i}"
  block: str = "blocks_{j}"
  downsample: str = "downsample"
  cls_token: str = "cls_token"
  reducer: str = "reducer_{i}"


def drop_path_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
  """Per-stage lists of per-block drop-path rates rising linearly from 0 to `rate` over all
  blocks (timm's rule, `torch.linspace(0, rate, sum(depths)).split(depths)`)."""
  total = sum(depths)
  flat = [rate * k / max(total - 1, 1) for k in range(total)]
  out, k = [], 0
  for d in depths:
    out.append(flat[k:k + d])
    k += d
  return out


def _block_kwargs(spec: StageSpec, cls) -> list[dict[str, Any]]:
  """The fields of each block of the stage (shared ones it declares, its kwargs, its cycle entry)."""
  fields = layers.module_fields(cls)
  kwargs = {k: v for k, v in (spec.shared or {}).items() if k in fields}
  kwargs.update(spec.block_kwargs or {})
  cycle = tuple(spec.block_cycle or ({},))
  out = [{**kwargs, **cycle[j % len(cycle)]} for j in range(spec.depth)]
  for entry in out[:len(cycle)]:
    layers.check_overrides(cls, {**entry, "drop_path": 0.0},
                           what=f"block {display_name(spec.block)!r}")
  return out


class _Stage(nn.Module):
  """Downsampling, class token and blocks of one stage (see `run_stages`)."""
  spec: StageSpec
  index: int
  first_block: int
  rates: tuple[float, ...]
  names: StageNames
  collect: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False):
    spec, i, names = self.spec, self.index, self.names
    if spec.downsample is not None:
      if tokens.num_prefix:
        raise ValueError(f"stage {i + 1} downsamples, but the tokens carry {tokens.num_prefix} "
                         "prefix token(s), which have no place on the map")
      flat = names.stage is None
      layer = get_downsample(spec.downsample)(
          spec.width, **dict(spec.downsample_kwargs or {}), name=names.downsample.format(i=i))
      if flat:   # its layers go straight into the model's scope (named by downsample_kwargs)
        nn.share_scope(layer, self)
      tokens = Tokens.from_map(layer(tokens.patch_map(), train=train), extra=tokens.extra)
    if tokens.x.shape[-1] != spec.width:
      raise ValueError(f"stage {i + 1} has width {spec.width}, but its input has "
                       f"{tokens.x.shape[-1]} channels; give it a downsample layer")
    if spec.cls_token:
      b, _, d = tokens.x.shape
      cls = self.param(names.cls_token.format(i=i), nn.initializers.truncated_normal(0.02),
                       (1, 1, d), tokens.x.dtype)
      tokens = tokens.replace(x=jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens.x], 1),
                              num_prefix=tokens.num_prefix + 1)
    if spec.reducer is not None:
      kwargs = dict(spec.reducer_kwargs or {})
      keep = kwargs.pop("keep_ratio", 1.0)
      reducer = plugins.make_reducer(spec.reducer, keep, names.reducer.format(
          i=i, k=self.first_block), kwargs)
      tokens = reducer(tokens, train=train)
    cls = get_block(spec.block)
    kwargs = _block_kwargs(spec, cls)
    out = {}
    for j in range(spec.depth):
      k = self.first_block + j
      tokens = cls(**kwargs[j], drop_path=self.rates[j],
                   name=names.block.format(i=i, j=j, k=k))(tokens, train=train)
      if k in self.collect:
        out[k] = tokens
    return tokens, out


def run_stages(parent: nn.Module, tokens: Tokens, stages: Sequence[StageSpec], *,
               drop_path: float = 0.0, names: StageNames = StageNames(), train: bool = False,
               collect: Collection[int] = ()) -> tuple[Tokens, dict[int, Tokens]]:
  """Runs `stages` over the carry, from inside `parent`'s compact method.

  Drop-path rates rise linearly over all blocks (`drop_path_rates`). Returns the final carry and
  {k: carry after block k} for the global block indices in `collect` (features).
  """
  rates = drop_path_rates([s.depth for s in stages], drop_path)
  collected, first = {}, 0
  for i, spec in enumerate(stages):
    stage = _Stage(spec, i, first, tuple(rates[i]), names,
                   tuple(k for k in collect if first <= k < first + spec.depth),
                   name=None if names.stage is None else names.stage.format(i=i))
    if names.stage is None:
      nn.share_scope(stage, parent)
    tokens, out = stage(tokens, train=train)
    collected.update(out)
    first += spec.depth
  return tokens, collected


def per_stage(field: str, value, n: int, *, doubling: bool = False) -> tuple:
  """A per-stage tuple from a tuple (one entry per stage) or a single value (the first stage's;
  doubled each stage with `doubling`, as heads follow the widths in Swin and CSWin)."""
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"{field}={tuple(value)} needs one entry per stage ({n})")
    return tuple(value)
  return tuple(value * 2 ** i if doubling else value for i in range(n))


def check_per_stage(model, fields: Sequence[str], *, depths: str = "depths"):
  """One clear error when one of a model's per-stage `fields` is not a tuple with one entry per
  stage (as many as `depths` has)."""
  n = len(getattr(model, depths))
  for field in fields:
    value = getattr(model, field)
    if not isinstance(value, (tuple, list)) or len(value) != n:
      raise ValueError(f"{field}={value!r} needs one entry per stage ({n}, from "
                       f"{depths}={tuple(getattr(model, depths))})")


def stage_ends(stages: Sequence[StageSpec]) -> list[int]:
  """Global index of the last block of each stage."""
  ends, k = [], 0
  for s in stages:
    k += s.depth
    ends.append(k - 1)
  return ends


class Encoder(nn.Module):
  """The isotropic case of the stages: positions, blocks (with token reducers between them),
  final norm.

  Either `depth` blocks of one `block` with `block_kwargs` (ViT), or explicit `stages` without
  downsampling (e.g. SpectFormer's spectral blocks followed by attention blocks). Names are
  vit_jax's `Transformer`: `posembed_input`, `encoderblock_{k}`, `encoder_norm`.

  posemb: a `plugins.POSEMBS` name (True is 'learn', vit_jax's learned table; False is 'none'),
    class or partial, built with `posemb_kwargs`.
  token_reduction: a `plugins.REDUCERS` name, class or partial; it runs before each block in
    `reduction_blocks` (as `tokenreducer_{k}`), built with `keep_ratio` and `reduction_kwargs`.
  With `final_norm=False` there is no final norm.
  Returns the carry and {k: carry after block k} for the blocks in `collect`.
  """
  depth: int = 0
  block: Any = "vit"
  block_kwargs: Any = None
  shared: Any = None
  stages: tuple[StageSpec, ...] | None = None
  drop_path: float = 0.0
  posemb: Any = True
  posemb_kwargs: Any = None
  posemb_dropout: float = 0.0
  final_norm: bool = True
  token_reduction: Any = None
  reduction_blocks: tuple[int, ...] = ()
  keep_ratio: float = 1.0
  reduction_kwargs: Any = None
  collect: tuple[int, ...] = ()

  NAMES: ClassVar[StageNames] = StageNames(stage=None, block="encoderblock_{k}",
                                            reducer="tokenreducer_{k}")

  def specs(self, width: int) -> tuple[StageSpec, ...]:
    if self.stages is not None:
      specs = tuple(self.stages)
    else:
      specs = (StageSpec(self.depth, width, self.block, self.block_kwargs, self.shared),)
    if self.token_reduction in (None, "none"):
      return specs
    kwargs = {**dict(self.reduction_kwargs or {}), "keep_ratio": self.keep_ratio}
    return split_stages(specs, self.reduction_blocks, self.token_reduction, kwargs)

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False):
    posemb = {True: "learn", False: "none"}.get(self.posemb, self.posemb) \
        if isinstance(self.posemb, (bool, str)) else self.posemb
    tokens = plugins.add_positions(self, posemb, tokens, train=train,
                                   posemb_kwargs=self.posemb_kwargs)
    if self.posemb_dropout:
      tokens = tokens.replace(x=nn.Dropout(self.posemb_dropout, deterministic=not train)(tokens.x))
    specs = self.specs(tokens.x.shape[-1])
    if any(s.downsample is not None for s in specs):
      raise ValueError("Encoder stages cannot downsample; use MultiStageModel")
    tokens, out = run_stages(self, tokens, specs, drop_path=self.drop_path, names=self.NAMES,
                             train=train, collect=self.collect)
    if self.final_norm:
      tokens = tokens.replace(x=nn.LayerNorm(name="encoder_norm")(tokens.x))
    return tokens, out


def split_stages(specs: Sequence[StageSpec], before: Collection[int], reducer,
                 reducer_kwargs: Mapping[str, Any]) -> tuple[StageSpec, ...]:
  """`specs` cut so that a stage starts at each global block index in `before`, each such stage
  running `reducer` before its blocks. Block names and drop-path rates are those of the uncut
  stages (they follow the global block index)."""
  total = sum(s.depth for s in specs)
  before = sorted({int(k) for k in before})
  bad = [k for k in before if not 0 <= k < total]
  if bad or not before:
    raise ValueError(f"reduction_blocks={tuple(before)!r}: allowed values are block indices "
                     f"0..{total - 1} (the reducer runs before each)")
  out, first = [], 0
  for spec in specs:
    cuts = [k - first for k in before if first <= k < first + spec.depth]
    edges = sorted({0, *cuts, spec.depth})
    for a, b in zip(edges[:-1], edges[1:]):
      reduce = a in cuts
      out.append(dataclasses.replace(
          spec, depth=b - a, downsample=spec.downsample if a == 0 else None,
          cls_token=spec.cls_token and a == 0,
          reducer=reducer if reduce else None,
          reducer_kwargs=reducer_kwargs if reduce else None))
      if spec.block_cycle and a % len(spec.block_cycle):
        raise ValueError("reduction_blocks must not cut a stage inside its block_cycle")
    first += spec.depth
  return tuple(out)


class MultiStageModel(Classifier):
  """Hierarchical classifier: stem -> stages -> pooling -> head, the loop in `run_stages`.

  A family subclasses it and declares
    stem(images, *, train) -> (B, H/s, W/s, C) map   (its layers, named as the family likes)
    stem_stride() -> s
    stage_specs() -> tuple[StageSpec, ...]
    pool(tokens, *, train) -> (B, D) pre_logits      (final norm and pooling)
  and may set STAGE_NAMES (parameter layout) and override `head_init()`.
  Feature maps are the stem output and the output of each stage (before the final norm).
  """
  drop_path: float = 0.0

  STAGE_NAMES: ClassVar[StageNames] = StageNames()

  def stem(self, images, *, train: bool):
    raise NotImplementedError

  def stem_stride(self) -> int:
    raise NotImplementedError

  def stem_width(self) -> int:
    return self.stage_specs()[0].width

  def stage_specs(self) -> tuple[StageSpec, ...]:
    raise NotImplementedError

  def pool(self, tokens: Tokens, *, train: bool):
    raise NotImplementedError

  def head_init(self) -> Callable | None:
    return None

  def check(self):
    """Validates the model's fields; called before anything is built."""

  def feature_info(self) -> list[FeatureInfo]:
    stride = self.stem_stride()
    info = [FeatureInfo("stem", self.stem_width(), stride)]
    for i, spec in enumerate(self.stage_specs()):
      stride *= spec.downsample_stride()
      info.append(FeatureInfo(f"stage{i + 1}", spec.width, stride))
    return info

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    self.check()
    info = self.feature_info()
    layers.check_images(images, max(f.stride for f in info), what="the total stride")
    x = self.stem(images, train=train)                                 # (B, H/s, W/s, C)
    out = {"stem": x}
    specs = self.stage_specs()
    tokens, taps = run_stages(self, Tokens.from_map(x), specs, drop_path=self.drop_path,
                              names=self.STAGE_NAMES, train=train, collect=stage_ends(specs))
    for i, k in enumerate(stage_ends(specs)):
      out[f"stage{i + 1}"] = taps[k].patch_map()
    return self.classify(self.pool(tokens, train=train), out, features,
                         kernel_init=self.head_init())
