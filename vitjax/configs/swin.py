"""Swin Transformer (Liu et al., ICCV 2021): shifted-window attention on a 2-stage hierarchy.
The default is a small Swin on Fashion-MNIST at the ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/swin.py
    python -m vitjax.main --config=configs/swin.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/swin.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model keeps the 28 px images: 2x2 patches give a 14x14 map, two blocks of width 48
(3 heads) attend in 7x7 windows (plain, then shifted by 3), patch merging halves it to 7x7 and
two blocks of width 96 (6 heads) attend over that one window (a window as large as the map is
not shifted): 0.0263 GMACs per image by XLA's cost analysis (flops / 2), 1.5x the ViT job's
0.0181, with 0.30M parameters. Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import swin
    c = swin.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"

`:imagenet` is the paper's Swin-T recipe (microsoft/Swin-Transformer configs/swin/
swin_tiny_patch4_window7_224.yaml and config.py): 224 px, AdamW, lr 5e-4 per 512 images (1e-3 at
batch 1024), weight decay 0.05, 20 warmup epochs, cosine to 1e-5 (5e-6 per 512) over 300 epochs,
gradient clipping 5.0, label smoothing 0.1, drop-path 0.2. vitjax has no RandAugment / Mixup /
CutMix / random erasing yet; the paper uses them, so expect less than its 81.3%.

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.depths='(2, 2, 6, 2)' --config.model.num_heads='(3, 6, 12, 24)'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for Swin: depths and num_heads are tuples (one entry per stage), so
  `--config.model.depths=(2,2)` works on the locked config; of the isotropic ViT's size fields
  only patch_size is a Swin field."""
  return common.family_model_overrides(
      dict(embed_dim=int, depths=tuple, num_heads=tuple, window=int, mlp_ratio=float),
      drop=("width", "depth", "mlp_dim", "num_heads", "attn_impl"), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "swin_tiny_patch4_window7_224"
  c.model = model_overrides(patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6),
                            window=7)
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model = model_overrides(drop_path=0.2)
    common.imagenet_recipe(c, lr=5e-4 * 1024 / 512, warmup_epochs=20,
                           min_lr=5e-6 * 1024 / 512, grad_clip_norm=5.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
