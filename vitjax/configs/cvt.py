"""CvT (Wu et al., ICCV 2021): convolutional token embeddings and convolutional projections.

The default is a reduced CvT on Fashion-MNIST at the ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/cvt.py
    python -m vitjax.main --config=configs/cvt.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/cvt.py:imagenet --config.data.data_dir=~/tensorflow_datasets

The reduced model resizes the 28 px images to 32 (the three embeddings need a side divisible by
their total stride 8) and uses 3x3 stride-2 embeddings in all three stages (16x16, 8x8, 4x4 token
maps; the official 7x7 stride-4 stem would leave a 2x2 last stage), widths 32/64/128, depths
1/2/3, heads 1/2/4: 0.0221 GMACs per image by XLA's cost analysis (flops / 2), 1.2x the ViT job's
0.0181; a training step takes about 2x the ViT's on CPU (the 16x16 first stage is memory-bound).
Its BatchNorm statistics travel in the train state (`batch_stats`).

`:imagenet` is the paper's CvT-13 recipe (microsoft/CvT experiments/imagenet/cvt/
cvt-13-224x224.yaml): 224 px, AdamW with lr 2.5e-4 per 256 images (the yaml's per-GPU LR, scaled
by the number of GPUs: 2e-3 at the paper's batch 2048), weight decay 0.05, 5 warmup epochs, cosine
to 1e-5 over 300 epochs, label smoothing 0.1, drop-path 0.1 (the official code applies it to the
last stage only, linearly over its blocks; here it rises over all blocks). vitjax has no
RandAugment / Mixup / CutMix / random erasing yet; the yaml uses them, so expect a lower accuracy
than the paper's 81.6%.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for CvT: its per-stage fields are tuples (one entry per stage), so
  `--config.model.depths=(1,2,3)` works on the locked config; the isotropic ViT's size fields are
  not CvT fields."""
  return common.family_model_overrides(
      dict(depths=tuple, dims=tuple, num_heads=tuple, patch_sizes=tuple, patch_strides=tuple,
           patch_paddings=tuple, mlp_ratio=float, act=str), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "cvt_13"
  c.model = model_overrides(depths=(1, 2, 3), dims=(32, 64, 128), num_heads=(1, 2, 4),
                            patch_sizes=(3, 3, 3), patch_strides=(2, 2, 2),
                            patch_paddings=(1, 1, 1))
  common.fashion_mnist_recipe(c)
  c.data.image_size = 32
  if arg.imagenet:
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=2.5e-4 * 2048 / 256, batch_size=2048, min_lr=1e-5)
  if arg.runlocal:
    common.runlocal(c)
  return c
