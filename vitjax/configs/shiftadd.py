"""ShiftAddViT (You et al., NeurIPS 2023): binary-code linear attention and multiply/shift MoE
layers on PVTv2. The default is a small ShiftAddViT on Fashion-MNIST at the ViT job's budget
(configs/vit.py):

    python -m vitjax.main --config=configs/shiftadd.py
    python -m vitjax.main --config=configs/shiftadd.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/shiftadd.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets --config.init_from=DIR

The small model keeps the 28 px images: a 3x3 stride-2 overlapping stem (`patch_size=2`) gives a
14x14 map where two blocks of width 24 (1 head) use the binary linear angular attention; a 3x3
stride-2 embedding halves it to 7x7 for two blocks of width 48 (2 heads) with standard attention,
as PVTv2's last stage has. Every projection and MLP layer is a multiply/shift mixture of experts
whose latency-aware balance loss the runner adds to the training loss (the 'aux_loss'
collection). 0.0158 GMACs per image by XLA's cost analysis (flops / 2; both experts run on every
token, so this counts both), 0.87x the ViT job's 0.0181, with 0.19M parameters. Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import shiftadd
    c = shiftadd.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"
Q and K are binarized at their mean (`qk_quant='mean'`, the official LinAngularAttention_binary):
the KSH codes of the registered models keep fitted hash state in a 'ksh' collection, which the
runner does not carry (it carries 'params' and 'batch_stats'); train those with your own loop
after `vitjax.models.shiftadd.fit_ksh`.

`:imagenet` is the official third step's schedule (GATECH-EIC/ShiftAddViT pvt/README.md: MoE
attention and MLPs fine-tuned from a LinAngular model) for shiftadd_pvt_v2_b0 with mean codes: 100
epochs, AdamW, lr 1e-5 x batch / 512 (5e-6 at 256), 5 warmup epochs, cosine to 5e-7, weight
decay 0.05, no clipping, label smoothing 0.1, drop path 0.1. It is a fine-tuning recipe: start
from a parameter checkpoint of the same model (`--config.init_from`).

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.embed_dims='(32, 64)' --config.model.mlp_linear=shift`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for ShiftAddPVT: per-stage tuples (embed_dims, depths, num_heads,
  mlp_ratios) and the ShiftAdd switches; of the ViT's size fields only patch_size (the stem
  stride) is a ShiftAddPVT field."""
  return common.family_model_overrides(
      dict(embed_dims=tuple, depths=tuple, num_heads=tuple, mlp_ratios=tuple, qk_quant=str,
           attn_linear=str, mlp_linear=str, matmul_impl=str, moe_loss_weight=float,
           dwconv_impl=str),
      drop=("width", "depth", "mlp_dim", "num_heads", "attn_impl"), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "shiftadd_pvt_v2_b0"
  c.model = model_overrides(patch_size=2, embed_dims=(24, 48), depths=(2, 2), num_heads=(1, 2),
                            mlp_ratios=(4.0, 4.0), qk_quant="mean")
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model = model_overrides(qk_quant="mean", drop_path=0.1)
    common.imagenet_recipe(c, lr=1e-5 * 256 / 512, batch_size=256, epochs=100, min_lr=5e-7,
                           grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
