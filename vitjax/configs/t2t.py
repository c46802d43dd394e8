"""T2T-ViT (Yuan et al., ICCV 2021): a Tokens-to-Token module (soft splits with overlap and small
Performer layers) before a deep-narrow ViT. The default is a small T2T-ViT on Fashion-MNIST at the
ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/t2t.py
    python -m vitjax.main --config=configs/t2t.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/t2t.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model keeps the 28 px images. The official soft splits (7/4/2, then 3/2/1 twice, a total
stride 16) would leave a 2x2 grid, so the splits here are 3x3 with padding 1 at strides 2, 2, 1:
the image becomes 14x14 tokens of 9 pixels, a Performer T2T layer (token_dim 32) runs over
them, they are re-structurized and soft-split to 7x7 tokens of 288 features, a second Performer
layer, then a stride-1 soft split (each token takes its 3x3 neighbourhood) and the projection to
96 wide. Three blocks of width 96 (3 heads, MLP ratio 3) follow, as in the ViT job: 0.0199 GMACs
per image by XLA's cost analysis (flops / 2), 1.1x the ViT job's 0.0181, with 0.34M parameters
(the ViT's: 0.34M). Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import t2t
    c = t2t.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"

`:imagenet` is the official T2T-ViT-14 recipe (yitu-opensource/T2T-ViT README and main.py): 224
px, AdamW, lr 5e-4 at batch 512 (8 GPUs x 64), weight decay 0.05, 10 warmup epochs, cosine to
1e-5 over 300 epochs, label smoothing 0.1, no gradient clipping, drop-path 0.1. The official run
adds 10 cooldown epochs at 1e-5, RandAugment, Mixup/CutMix, random erasing and an EMA of the
weights (the README's accuracies are the EMA's); vitjax has none of these yet, so expect less
than the paper's 81.5%. T2T-ViT-7/10/12 use lr 1e-3 and weight decay 0.03 officially:
`--config.model_name=t2t_vit_7 --config.lr=1e-3 --config.weight_decay=0.03`.

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.tokens_type=transformer --config.model.strides='(2, 2, 1)'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for T2T-ViT: its own size fields (embed_dim, mlp_ratio, the T2T module's);
  of the isotropic ViT's size fields it keeps depth and num_heads."""
  return common.family_model_overrides(
      dict(embed_dim=int, mlp_ratio=float, tokens_type=str, token_dim=int, kernel_sizes=tuple,
           strides=tuple, paddings=tuple, kernel_ratio=float, t2t_dropout=float, qk_scale=float),
      drop=("patch_size", "width", "mlp_dim"), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "t2t_vit_7"
  c.model = model_overrides(embed_dim=96, depth=3, num_heads=3, mlp_ratio=3.0, token_dim=32,
                            kernel_sizes=(3, 3, 3), strides=(2, 2, 1), paddings=(1, 1, 1))
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model_name = "t2t_vit_14"
    c.model = model_overrides(drop_path=0.1)
    common.imagenet_recipe(c, lr=5e-4, batch_size=512, warmup_epochs=10, min_lr=1e-5,
                           grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
