"""Shared config pieces: the field set every config has, and big_vision-style `:arg` parsing.

Run a config as `python -m vitjax.main --config=configs/NAME.py[:ARG] --config.KEY=VALUE ...`. ARG is a
comma-separated list of `key=value` pairs or bare flags (`runlocal`, `imagenet`, ...). The config is
locked: overriding a key that does not exist is an error that lists the existing keys.
"""
from __future__ import annotations

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """'a=1,b,c=x' -> ConfigDict(a=1, b=True, c='x'), typed after `defaults`; unknown keys raise."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}. Allowed: {', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not _:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def data_config(**overrides) -> mlc.ConfigDict:
  """`config.data`: which TFDS dataset, where it lives, and how images are prepared."""
  data = mlc.ConfigDict(dict(
      name="fashion_mnist",    # any TFDS image-classification dataset prepared in array_record format,
      #                          or 'image_folder' (data.folder)
      data_dir="",             # TFDS data_dir; '' = TFDS's default (~/tensorflow_datasets)
      source_dir="",           # where the Fashion-MNIST IDX files are ('' = search the usual places)
      folder="",               # name='image_folder': DIR/<split>/<class>/<image>, built into data_dir
      skip_corrupt=False,      # image folders: leave out files that do not decode (logged) instead of
      #                          stopping with the list of them
      image_size=28,           # images are resized to image_size x image_size
      channels=0,              # 0 = keep the dataset's channels; 1 or 3 converts
      train_split="train",     # TFDS split strings; slices carve splits: 'train[:90%]', 'train[90%:]'
      eval_split="test",
      augment="none",          # 'none' or 'crop_flip'
  ))
  data.update(overrides)
  return data


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model`: create_model overrides. Unset (None) entries keep the registered variant's value.

  The size fields are typed placeholders so `--config.model.depth=4` works on the locked config.
  """
  m = mlc.ConfigDict(dict(
      patch_size=mlc.config_dict.placeholder(int), width=mlc.config_dict.placeholder(int),
      depth=mlc.config_dict.placeholder(int), mlp_dim=mlc.config_dict.placeholder(int),
      num_heads=mlc.config_dict.placeholder(int), dropout=mlc.config_dict.placeholder(float),
      drop_path=mlc.config_dict.placeholder(float), attn_impl=mlc.config_dict.placeholder(str)))
  m.update(fields)
  return m


# The isotropic ViT's size fields; a family with its own (per-stage) fields drops them.
ISOTROPIC_SIZES = ("patch_size", "width", "depth", "mlp_dim", "num_heads")


def family_model_overrides(types: dict[str, type], *, drop=ISOTROPIC_SIZES,
                           **fields) -> mlc.ConfigDict:
  """`model_overrides` for a family with fields of its own: the keys in `drop` (fields the family
  does not have) are removed, each of `types` becomes a typed placeholder, so that e.g.
  `--config.model.depths="(1, 2, 3)"` works on the locked config, then `fields` are set."""
  m = model_overrides()
  for key in drop:
    del m[key]
  m.update({key: mlc.config_dict.placeholder(kind) for key, kind in types.items()})
  m.update(fields)
  return m


def base_config() -> mlc.ConfigDict:
  """Every field the runner reads, with defaults. Family configs override what they need."""
  c = mlc.ConfigDict()
  c.model_name = "vit_nano4"
  c.model = model_overrides()         # create_model(model_name, **model) overrides
  c.data = data_config()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128                  # global batch, split over all devices
  c.eval_batch_size = 512
  c.lr = 1e-3                         # peak learning rate
  c.warmup_steps = 100
  c.min_lr_ratio = 0.01               # cosine decays to lr * min_lr_ratio
  c.weight_decay = 0.05               # AdamW, not applied to biases, norms, positions, CLS
  c.b2 = 0.999
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.init_from = ""                    # a parameter checkpoint (vitjax.convert output) to fine-tune from
  c.init_from_skip = "^head/"         # regex of params that keep their fresh init when loading init_from
  c.grids = ()                        # LookupViT: compressed grids sampled per training step
  c.eval_grids = ()                   # LookupViT: grids evaluated with the same params
  c.grid_weights = ()                 # LookupViT: relative sampling weight of each entry of grids;
  #                                     () = uniform
  c.distributed = False               # True: call jax.distributed.initialize() (multi-host)
  # Plug-in training (vitjax/train_plugins.py); the defaults change nothing.
  c.train_resolutions = ()            # ResFormer: sides every batch is trained at, the largest being
  #                                     data.image_size (the others resized in the step); () = off
  c.scale_consistency = 1.0           # ResFormer: weight lambda of the smooth-L1 scale-consistency
  #                                     loss between resolutions (the official default)
  c.eval_resolutions = ()             # test-image sides each eval reports (eval/accuracy@SIDE);
  #                                     () = data.image_size only
  c.policy = mlc.ConfigDict(dict(
      weight=1.0,                     # IA-RED²: weight of the REINFORCE loss of the 'policy' a
      #                                 model sows (none does unless a reducer samples tokens)
      penalty=1.0,                    # reward of a wrong prediction is -penalty (BlockDrop's default)
      phase1_steps=0,                 # first steps train only the tokenreducer_* params (the
      #                                 interpreters), the backbone frozen; then everything
  ))
  c.ib = mlc.ConfigDict(dict(         # LTM's information bottleneck as its repository trains it
      weight=0.0,                     # weight of the IB bound in the loss (the repository: 0.1); 0 = off
      warmup=0.3,                     # fraction of total_steps before the term joins (the repository's)
      refresh_steps=0,                # feature clusters and Q recomputed every so many steps; 0 = an epoch
      samples=10_000,                 # training images the clusters and Q are estimated from
      kmeans_iters=20,                # Lloyd rounds of each k-means (K = the class count)
      beta=1.0,                       # sharpness of the soft cluster assignment (the repository's)
  ))
  return c


def fashion_mnist_recipe(c: mlc.ConfigDict):
  """The training budget both Fashion-MNIST main jobs share (vit.py and lookupvit.py)."""
  c.total_steps = 2500                # 5.3 epochs of batch 128: 8-9 minutes on 2 CPU cores
  c.batch_size = 128
  c.lr = 2e-3
  c.warmup_steps = 200
  c.weight_decay = 0.05
  c.data.augment = "none"             # too few epochs for augmentation to pay off
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500


IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet_recipe(c: mlc.ConfigDict, *, lr: float, batch_size: int = 1024, epochs: int = 300,
                    warmup_epochs: int = 5, min_lr: float | None = None,
                    weight_decay: float = 0.05, grad_clip_norm: float | None = None,
                    label_smoothing: float = 0.1, eval_every_steps: int | None = None):
  """The ImageNet-1k training schedule the papers' recipes share, in steps of `batch_size`:
  `epochs` of TFDS imagenet2012 at 224 px (`imagenet_data`), AdamW at peak `lr` after
  `warmup_epochs`, cosine down to `min_lr` (None keeps the base ratio), evals every 5 epochs
  unless `eval_every_steps` says otherwise. `grad_clip_norm=0` turns clipping off."""
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch_size   # full batches
  c.data = imagenet_data()
  c.total_steps = epochs * steps_per_epoch
  c.batch_size = batch_size
  c.eval_batch_size = 1000
  c.lr = lr
  if min_lr is not None:
    c.min_lr_ratio = min_lr / lr
  c.warmup_steps = warmup_epochs * steps_per_epoch
  c.weight_decay = weight_decay
  if grad_clip_norm is not None:
    c.grad_clip_norm = grad_clip_norm
  c.label_smoothing = label_smoothing
  c.eval_every_steps = eval_every_steps or 5 * steps_per_epoch
  c.checkpoint_every_steps = 2000


def imagenet_data() -> mlc.ConfigDict:
  """TFDS imagenet2012 at 224 px (the user prepares it; see the README's data section)."""
  return data_config(name="imagenet2012", image_size=224, eval_split="validation", channels=3,
                     augment="crop_flip")


def runlocal(c: mlc.ConfigDict):
  """Shrinks a config to a few tiny steps: a smoke test of the whole pipeline."""
  c.total_steps = 20
  c.batch_size = 16
  c.eval_batch_size = 32
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.warmup_steps = 2
