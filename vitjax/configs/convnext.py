"""ConvNeXt (Liu et al., CVPR 2022) on Fashion-MNIST at the ViT job's budget; the paper's recipe.

    python -m vitjax.main --config=configs/convnext.py
    python -m vitjax.main --config=configs/convnext.py:runlocal     # a few steps, for a smoke test
    python -m vitjax.main --config=configs/convnext.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The default is convnext_atto (timm's 3.7M-parameter variant, depths (2, 2, 6, 2), widths 40..320)
with the shared Fashion-MNIST recipe (2500 steps of batch 128). Images are resized to 32 px: 28 is
not a multiple of the total stride 32, and at 32 the stages see 8x8, 4x4, 2x2 and 1x1 maps. One
image costs 0.0109 GMACs (multiply-accumulates, XLA cost analysis with dwconv_impl='xla'; the
runner reports 0.0120 on CPU, where the 'shift' form is also charged for the taps on the zero
padding), 0.6x the ViT job's 0.0181. A training step costs about what the ViT job's does on CPU
(0.4-0.6 s against 0.5-0.7 s at batch 128 on a busy 2-core machine): depthwise convolutions cost
more time per MAC than the ViT's matrix products. Measure the GMACs with
    python -c "import jax, vitjax; from vitjax import train
    m = vitjax.create_model('convnext_atto', num_classes=10, dwconv_impl='xla')
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 1)))
    print(train.gmacs(m, v, (32, 32, 1)))"
(convnext_tiny at (224, 224, 3) with 1000 classes gives 4.48 GMACs; the paper states 4.5G).

`:imagenet` is the paper's ImageNet-1k recipe for ConvNeXt-T: AdamW, lr 4e-3 at batch 4096 scaled
linearly to the batch here, weight decay 0.05, 300 epochs with 20 warmup epochs and cosine decay,
stochastic depth 0.1, label smoothing 0.1, on 224 px random crops with flips. The paper's
RandAugment, Mixup/CutMix, random erasing and EMA are not in vitjax yet.

Model fields beyond the common ones can be overridden on the command line, e.g.
`--config.model.depths='(1, 1, 3, 1)' --config.model.dims='(32, 64, 128, 256)'`.
"""
import ml_collections as mlc

from vitjax.configs import common

placeholder = mlc.config_dict.placeholder


def convnext_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` with typed placeholders for ConvNeXt's own fields (unset = the variant's)."""
  return common.model_overrides(
      depths=placeholder(tuple), dims=placeholder(tuple), kernel_size=placeholder(int),
      mlp_ratio=placeholder(int), layer_scale_init=placeholder(float),
      head_init_scale=placeholder(float), dwconv_impl=placeholder(str), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "convnext_atto"
  c.model = convnext_overrides()
  common.fashion_mnist_recipe(c)
  c.data.image_size = 32
  if arg.imagenet:
    c.model_name = "convnext_tiny"
    c.model = convnext_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=4e-3 * 1024 / 4096, warmup_epochs=20)
  if arg.runlocal:
    common.runlocal(c)
  return c
