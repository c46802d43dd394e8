"""RMT (Fan et al., CVPR 2024) on Fashion-MNIST at the ViT job's budget; the paper's recipe.

    python -m vitjax.main --config=configs/rmt.py
    python -m vitjax.main --config=configs/rmt.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/rmt.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The default is RMT-T's layout (depths (2, 2, 8, 2), decomposed MaSA in stages 1-2, full MaSA in
stages 3-4, head width 16 everywhere, MLP ratio 3) at half its widths, (32, 64, 128, 256) with
(2, 2, 4, 8) heads and a 256-wide projection before the head: 3.3M parameters. The shared
Fashion-MNIST recipe (2500 steps of batch 128). Images are resized to 32 px: 28 is not a multiple
of the total stride 32; at 32 the stages see 8x8, 4x4, 2x2 and 1x1 maps (stage 1's 8x8 is about
the ViT job's 7x7 tokens). One image costs 0.0127 GMACs (multiply-accumulates, XLA cost analysis),
0.7x the ViT job's 0.0181. A training step took 0.65 s at batch 128 (195 img/s) on the shared
2-core machine under load, about what the ViT job's takes there (0.5-0.7 s): BatchNorm, depthwise
convolutions and the small attention maps cost more time per MAC than the ViT's matrix products.
Measure the GMACs with
    python -c "import jax, vitjax; from vitjax import train
    m = vitjax.create_model('rmt_t', num_classes=10, dims=(32, 64, 128, 256),
                            num_heads=(2, 2, 4, 8), projection=256)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 1)))
    print(train.gmacs(m, v, (32, 32, 1)))"
(rmt_t at (224, 224, 3) with 1000 classes gives 2.70 GMACs; the paper states 2.5G, counted with
fvcore, which leaves out the softmax, normalisations and activations XLA also counts.)

`:imagenet` is the official recipe (qhfan/RMT classfication_release/main.py and run.sh) for RMT-T:
AdamW, lr 5e-4 x batch / 512 (1e-3 at the official 8 x 128), weight decay 0.05, 300 epochs with
5 warmup epochs and cosine decay to 1e-5, no gradient clipping, label smoothing 0.1, stochastic
depth 0.1 (RMT_T3's own drop_path_rate), 224 px random crops with flips. The official
RandAugment, Mixup/CutMix and random erasing are not in vitjax yet, so expect less than the
paper's 82.4%.

Model fields beyond the common ones are typed placeholders, so e.g.
`--config.model.depths='(1, 1, 3, 1)' --config.model.decomposed='(True, True, False, False)'`
works on the locked config.
"""
import ml_collections as mlc

from vitjax.configs import common


def rmt_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for RMT: its per-stage fields are tuples (one entry per stage); the isotropic
  ViT's size fields are not RMT fields."""
  return common.family_model_overrides(
      dict(depths=tuple, dims=tuple, num_heads=tuple, init_values=tuple, heads_ranges=tuple,
           mlp_ratios=tuple, decomposed=tuple, layer_scales=tuple, layer_scale_init=float,
           projection=int, token_label=bool), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "rmt_t"
  c.model = rmt_overrides(dims=(32, 64, 128, 256), num_heads=(2, 2, 4, 8), projection=256)
  common.fashion_mnist_recipe(c)
  c.data.image_size = 32
  if arg.imagenet:
    c.model = rmt_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=5e-4 * 1024 / 512, min_lr=1e-5, grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
