"""A small ViT on Fashion-MNIST: the reference the other families are measured against.

    python -m vitjax.main --config=configs/vit.py
    python -m vitjax.main --config=configs/vit.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/vit.py:imagenet --config.data.data_dir=~/tensorflow_datasets
"""
from vitjax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False, mixer="mhsa")
  c = common.base_config()
  c.model_name = "vit_nano4"
  c.model = common.model_overrides(mixer=arg.mixer, pool="gap")
  c.total_steps = 3000
  c.batch_size = 128
  c.lr = 2e-3
  c.warmup_steps = 200
  c.weight_decay = 0.05
  c.data.augment = "crop_flip"
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  if arg.imagenet:
    c.model_name = "vit_b16"
    c.model = common.model_overrides(mixer=arg.mixer, pool="tok", drop_path=0.1)
    c.data = common.imagenet_data()
    c.total_steps = 300 * 1251
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.lr = 1e-3
    c.warmup_steps = 5 * 1251
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 2000
  if arg.runlocal:
    common.runlocal(c)
  return c
