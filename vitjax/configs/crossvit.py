"""CrossViT (Chen et al., ICCV 2021): a small-patch and a large-patch ViT branch fused by
class-token cross-attention, on Fashion-MNIST at the ViT job's budget; the paper's recipe.

    python -m vitjax.main --config=configs/crossvit.py
    python -m vitjax.main --config=configs/crossvit.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/crossvit.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The default keeps the 28 px images and CrossViT-9's layout (three multi-scale blocks of one
small-branch and a few large-branch blocks, equal heads per branch, MLP ratio 3) at smaller
sizes: the small-patch branch cuts 4x4 patches (a 7x7 grid, width 48), the large-patch branch
7x7 patches of the same image (a 4x4 grid, width 96; img_scale 1, so no resize: the paper's 12
and 16 px patches on 240 and 224 px images give 20x20 and 14x14 grids, a similar ratio), 1 and
2 blocks per branch in each of the three multi-scale blocks, 3 heads each. One image costs
0.0164 GMACs (multiply-accumulates, XLA cost analysis), 0.9x the ViT job's 0.0181, with 0.84M
parameters (the wide large-patch branch has few tokens). Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import crossvit
    c = crossvit.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"

`:imagenet` is the official recipe for crossvit_9_dagger_240 as IBM/CrossViT's README trains it on
4 nodes (its run_with_submitit.py command: 32 GPUs x 128 = batch 4096, 30 warmup epochs; main.py
scales lr 5e-4 x batch / 512 = 4e-3): AdamW, weight decay 0.05, 300 epochs, cosine decay to 1e-5,
no gradient clipping, label smoothing 0.1, stochastic depth 0.1 (main.py's defaults), 240 px
inputs. The official RandAugment, Mixup/CutMix, random erasing and repeated augmentation are not
in vitjax yet, so expect less than the paper's accuracy.

Model fields beyond the common ones are typed placeholders (one entry per branch, `depth` one
(d_0, d_1, 0) triple per multi-scale block), e.g.
`--config.model.embed_dim='(64, 128)' --config.model.depth='((1, 3, 0), (1, 3, 0))'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for CrossViT: per-branch tuples; of the isotropic ViT's size fields only the
  names patch_size, depth and num_heads survive, as CrossViT's tuples."""
  return common.family_model_overrides(
      dict(patch_size=tuple, img_scale=tuple, embed_dim=tuple, depth=tuple, num_heads=tuple,
           mlp_ratio=tuple, multi_conv=bool, pool=str), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "crossvit_9_240"
  c.model = model_overrides(patch_size=(4, 7), img_scale=(1.0, 1.0), embed_dim=(48, 96),
                            depth=((1, 2, 0),) * 3, num_heads=(3, 3), mlp_ratio=(3.0, 3.0))
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model_name = "crossvit_9_dagger_240"
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=5e-4 * 4096 / 512, batch_size=4096, warmup_epochs=30,
                           min_lr=1e-5, grad_clip_norm=0.0)
    c.data.image_size = 240
  if arg.runlocal:
    common.runlocal(c)
  return c
