"""ViR (Hatamizadeh et al., 2023): a ViT whose attention is RetNet's gated multi-scale retention.
The default is a small ViR on Fashion-MNIST at the ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/vir.py
    python -m vitjax.main --config=configs/vir.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/vir.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model is the ViT job's (28 px, 4x4 patches, width 96, 3 blocks, 3 heads, MLP 384) with
retention in place of attention: the 49 patch tokens in raster order, the class token at the end
of the causal sequence (it pools), decays gamma_h = 1 - 2^(-5-h) = 0.969, 0.984, 0.992. The
sequence (50 tokens) is shorter than the chunk size, so the mixers use the parallel form. It has
one more D x D projection per block (the gate), no attention biases, and one more token (the ViT
job pools its 49 patches): 0.0200 GMACs per image by XLA's cost analysis (flops / 2), 1.11x the
ViT job's 0.0181, with 0.37M parameters (the ViT job's 0.34M). Measure with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import vir
    c = vir.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"

`:imagenet` trains vir_b16 at 224 px with DeiT's recipe (AdamW, lr 5e-4 x batch / 512 = 1e-3 at
batch 1024, weight decay 0.05, 300 epochs, 5 warmup epochs, cosine to 1e-5, label smoothing 0.1,
drop path 0.1, no gradient clipping). The ViR paper's own recipe is not public (no code was
released), so this is an assumption; vitjax has no RandAugment / Mixup / CutMix / EMA yet.

Retention fields are typed placeholders, e.g. `--config.model.form=chunkwise
--config.model.chunk_size=16` or `--config.model.decay=manhattan --config.model.pool=gap`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for ViR: the ViT's size fields plus the retention fields of
  `vitjax.models.vir.MultiScaleRetention`."""
  return common.family_model_overrides(
      dict(pool=str, form=str, chunk_size=int, decay=str, value_factor=int, theta_shift=bool,
           normalize=bool, norm=str, use_bias=bool), drop=(), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "vir_s16"
  c.model = model_overrides(patch_size=4, width=96, depth=3, num_heads=3, mlp_dim=384)
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model_name = "vir_b16"
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=5e-4 * 1024 / 512, min_lr=1e-5, grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
