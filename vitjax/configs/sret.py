"""SReT (Shen et al., 2021, "Sliced Recursive Transformer"): shared blocks used twice with sliced
group self-attention, on a 2-stage hierarchy. The default is a small SReT on Fashion-MNIST at the
ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/sret.py
    python -m vitjax.main --config=configs/sret.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/sret.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model keeps the 28 px images: its stem's convs have strides (2, 1, 1) (the official
(2, 2, 2) would leave a 4x4 map and 28 is not a multiple of the total stride 32), so stage 1 sees
a 14x14 map of width 32 (2 heads): one shared block used twice, the first time in 4 groups of 49
tokens, the recursive time in 2 groups of 98 after a token permutation; the pooling conv halves
it to 7x7 and stage 2 (width 64, 4 heads) uses its shared block twice over all 49 tokens. MLP
ratio 3.6 and NLL ratio 1 as SReT-T: 0.0163 GMACs per image by XLA's cost analysis (flops / 2,
the pooling as XLA's grouped convolution; the runner logs 0.0164 because on CPU the pooling runs
as strided slices, which also count the taps on the zero padding), 0.9x the ViT job's 0.0181,
with 0.10M parameters. Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import sret
    c = sret.get_config(); c.model.dwconv_impl = 'xla'
    m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"
A training step at batch 128 ran at 85-121 images/s on the shared 2-core machine under load
(load average about 8), the ViT job's at 143-191 images/s right after it: budget about 1.5x the
ViT job's time for the 2500 steps (BatchNorm in the stem and more, smaller operations per MAC).

The permutation's randomness: in training the model draws it from the 'dropout' rng stream the
runner already passes (a 'permute' stream would take precedence if a caller passed one); eval
(train=False) uses one fixed permutation, so evals are deterministic (vitjax.models.sret).

`:imagenet` is SReT-T at 224 px with the official repository's advice (szq0214/SReT README:
"a larger initial lr (0.001 x batchsize / 512) with longer warmup epochs = 30") on the DeiT-style
schedule the official code is built on: AdamW, lr 1e-3 x batch / 512, weight decay 0.05, 300
epochs with 30 warmup epochs and cosine decay to 1e-5, no gradient clipping, label smoothing
0.1, stochastic depth 0.1 (the official constructor's drop_path_rate), 224 px random crops with
flips. vitjax has no RandAugment / Mixup / CutMix / random erasing or distillation yet, so expect
less than the paper's 76.0% (SReT-S: `--config.model_name=sret_s`, 81.9%).

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.depths='(2, 4)' --config.model.groups1='(4, 1)'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for SReT: its per-stage fields are tuples (one entry per stage); of the
  isotropic ViT's size fields none is an SReT field."""
  return common.family_model_overrides(
      dict(dims=tuple, depths=tuple, num_heads=tuple, groups1=tuple, groups2=tuple,
           mlp_ratio=float, np_mlp_ratio=float, stem_strides=tuple, dwconv_impl=str), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "sret_t"
  c.model = model_overrides(dims=(32, 64), depths=(2, 2), num_heads=(2, 4), groups1=(4, 1),
                            groups2=(2, 1), stem_strides=(2, 1, 1))
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=1e-3 * 1024 / 512, warmup_epochs=30, min_lr=1e-5,
                           grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
