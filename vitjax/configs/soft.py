"""SOFT (Lu et al., NeurIPS 2021): softmax-free Gaussian-kernel attention with Nystrom landmarks on
a hierarchy. The default is a small SOFT on Fashion-MNIST at the ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/soft.py
    python -m vitjax.main --config=configs/soft.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/soft.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model has two stages: the official stem (three 3x3 convs, stride 4, here 16 channels)
gives an 8x8 map of width 64 where two SOFT blocks (2 heads of 32, as in every official model)
attend through 4x4 = 16 landmarks (sr_ratio 2) with a 3x3 depthwise conv on V; a 3x3 stride-2
conv halves it to 4x4 at width 128, where a class token and two softmax blocks (4 heads) close.
Position tables are made for 32 px (`pos_size`; the official tables are for 224 px). Images are
resized to 32 px: 28 is not a multiple of the total stride 8. One image costs 0.0170 GMACs
(multiply-accumulates, XLA's cost analysis), 0.94x the ViT job's 0.0181, with 0.59M parameters.
A training step took 0.63 s at batch 128 (~200 img/s) on the shared 2-core machine under heavy
load (load average ~9), so budget the 2500-step job like the other backbone families'.
Measure the GMACs with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import soft
    c = soft.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    m = m.clone(dwconv_impl='xla'); v = m.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 1)))
    print(train.gmacs(m, v, (32, 32, 1)))"
(soft_tiny at 224 px costs 2.22 GMACs by the same count, `python -m experiments.gmacs
--models=soft_tiny`; the paper states 1.9G.)

`:imagenet` is the official SOFT-Tiny recipe (fudan-zvg/SOFT config/SOFT_Tiny.yaml and main.py,
8 GPUs): AdamW, lr 1e-3 at batch 1024 (the code scales lr x batch / 1024), weight decay 0.05,
300 epochs with 10 warmup epochs and cosine decay to 5e-5, gradient clipping at 1.0, label
smoothing 0.1, drop path 0.1 (an element-wise dropout in the SOFT blocks, as the official code
has it). vitjax has no RandAugment / Mixup / CutMix / random erasing or EMA yet; the paper uses
them, so expect less than its 79.3%.

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.depths='(1, 2, 3, 2)' --config.model.sr_ratios='(8, 4, 2)'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for SOFT: the per-stage fields are tuples, so `--config.model.depths=(2,2)`
  works on the locked config; of the isotropic ViT's size fields none is a SOFT field (num_heads
  comes back as a tuple)."""
  return common.family_model_overrides(
      dict(embed_dims=tuple, depths=tuple, num_heads=tuple, sr_ratios=tuple, conv_sizes=tuple,
           mlp_ratio=float, stem_channels=int, pos_size=int, newton_iters=int, dwconv_impl=str),
      **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "soft_tiny"
  c.model = model_overrides(embed_dims=(64, 128), depths=(2, 2), num_heads=(2, 4),
                            sr_ratios=(2,), conv_sizes=(3,), stem_channels=16, pos_size=32)
  common.fashion_mnist_recipe(c)
  c.data.image_size = 32
  if arg.imagenet:
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=1e-3, batch_size=1024, warmup_epochs=10, min_lr=5e-5,
                           grad_clip_norm=1.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
