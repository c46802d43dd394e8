"""A small ViT on Fashion-MNIST: the reference the other families are measured against.

    python -m vitjax.main --config=configs/vit.py
    python -m vitjax.main --config=configs/vit.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/vit.py:imagenet --config.data.data_dir=~/tensorflow_datasets
"""
from vitjax.configs import common


def get_config(arg=None, *, mixer="mhsa", mixer_kwargs=None):
  """`mixer` / `mixer_kwargs` swap the token mixer (the per-mixer configs call this)."""
  arg = common.parse_arg(arg, runlocal=False, imagenet=False, mixer=mixer)
  c = common.base_config()
  c.model_name = "vit_nano4"
  # A 3-block, 96-wide ViT with 4x4 patches: small enough to see ~6 epochs in 15 minutes on 2 CPU cores.
  c.model = common.model_overrides(mixer=arg.mixer, pool="gap", width=96, depth=3, num_heads=3,
                                   mlp_dim=384)
  if mixer_kwargs:
    c.model.mixer_kwargs = dict(mixer_kwargs)
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model_name = "vit_b16"
    # Mixers that need the 2-D grid pass CLS through unchanged, so they pool the patch tokens.
    pool = "tok" if arg.mixer == "mhsa" else "gap"
    c.model = common.model_overrides(mixer=arg.mixer, pool=pool, drop_path=0.1,
                                     mixer_kwargs=dict(mixer_kwargs or {}))
    common.imagenet_recipe(c, lr=1e-3, eval_every_steps=5000)
  if arg.runlocal:
    common.runlocal(c)
  return c
