"""LookupViT (Koner et al., ECCV 2024), trained with several compressed-token grids at once.

The default is the main job: a small LookupViT on Fashion-MNIST, a grid drawn per training step from
`grids` (weighted by `grid_weights`), and every grid in `eval_grids` evaluated with the same parameters.

    python -m vitjax.main --config=configs/lookupvit.py
    python -m vitjax.main --config=configs/lookupvit.py:runlocal     # a few steps, for a smoke test
    python -m vitjax.main --config=configs/lookupvit.py:imagenet --config.data.data_dir=~/tensorflow_datasets

`:imagenet` is LookupViT-B/16 on TFDS imagenet2012 (prepared by the user in array_record format) with a
DeiT-style recipe: AdamW, lr 5e-4 x batch/512, weight decay 0.05, 5 warmup epochs, cosine over 300 epochs,
label smoothing 0.1, stochastic depth 0.1, random crop + flip (vitjax has no RandAugment / Mixup yet).
"""
import ml_collections as mlc

from vitjax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  # The same width, depth and heads as configs/vit.py's ViT, with 7x7 lookup tokens (4x4 patches) and
  # 3x3 to 5x5 compressed tokens.
  c.model_name = "lookupvit_nano4"
  c.model = common.model_overrides(lookup_mlp_ratio=0.5, head_source="compressed", width=96,
                                   depth=3, num_heads=3, mlp_dim=384, lookup_postnorm=False,
                                   compress_resize="bilinear", posemb="learned", mhbc_impl="auto",
                                   mhbc_heads=mlc.config_dict.placeholder(int))
  c.grids = ((3, 3), (4, 4), (5, 5))
  c.eval_grids = ((3, 3), (4, 4), (5, 5))
  common.fashion_mnist_recipe(c)
  # The ViT job's budget, with the largest grid drawn 3 times as often as each smaller one: spreading the
  # steps evenly over the grids cost the largest one a point in short runs (experiments/lookupvit/README.md
  # has the ablations). Evals every 1250 steps, each at every grid.
  c.grid_weights = (1.0, 1.0, 3.0)
  c.eval_every_steps = 1250
  c.checkpoint_every_steps = 1250
  if arg.imagenet:
    c.grid_weights = ()
    c.model_name = "lookupvit_b16"
    c.model = common.model_overrides(lookup_mlp_ratio=0.5, head_source="compressed", drop_path=0.1)
    c.grids = ((3, 3), (5, 5), (7, 7), (10, 10))
    c.eval_grids = ((3, 3), (5, 5), (7, 7), (10, 10))
    common.imagenet_recipe(c, lr=5e-4 * 1024 / 512)
  if arg.runlocal:
    common.runlocal(c)
  return c
