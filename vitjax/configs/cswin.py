"""CSWin Transformer (Dong et al., CVPR 2022): cross-shaped stripe attention with LePE on a 2-stage
hierarchy. The default is a small CSWin on Fashion-MNIST at the ViT job's budget (configs/vit.py):

    python -m vitjax.main --config=configs/cswin.py
    python -m vitjax.main --config=configs/cswin.py:runlocal      # a few steps, for a smoke test
    python -m vitjax.main --config=configs/cswin.py:imagenet \
        --config.data.data_dir=~/tensorflow_datasets

The small model keeps the 28 px images: a 3x3 stride-2 stem (`patch_size=2`; the official 7x7
stride-4 stem would leave 7x7 and 4x4 maps) gives a 14x14 map, where two blocks of width 48
(2 heads) attend in 14x2 vertical and 2x14 horizontal stripes (one head each); the 3x3 stride-2
merge halves it to 7x7 and two blocks of width 96 (4 heads) attend over the whole map (the last
stage's single branch): 0.0267 GMACs per image by XLA's cost analysis (flops / 2), 1.5x the ViT
job's 0.0181, with 0.33M parameters. Measure it with
    python -c "import jax, vitjax; from vitjax import train; from vitjax.configs import cswin
    c = cswin.get_config(); m = vitjax.create_model(c.model_name, num_classes=10, **c.model)
    v = m.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    print(train.gmacs(m, v, (28, 28, 1)))"

`:imagenet` is the paper's CSWin-T recipe (microsoft/CSWin-Transformer README and main.py):
224 px, AdamW, lr 2e-3 at batch 2048 (8 GPUs x 256), weight decay 0.05, 20 warmup epochs, cosine
to 1e-5 over 300 epochs, label smoothing 0.1, no gradient clipping, drop-path 0.2. vitjax has no
RandAugment / Mixup / CutMix / random erasing or EMA yet; the paper uses them, so expect less
than its 82.7%.

Model fields beyond the common ones are typed placeholders, e.g.
`--config.model.depths='(1, 2, 21, 1)' --config.model.split_size='(1, 2, 7, 7)'`.
"""
import ml_collections as mlc

from vitjax.configs import common


def model_overrides(**fields) -> mlc.ConfigDict:
  """`config.model` for CSWin: depths, num_heads and split_size are tuples (one entry per stage),
  so `--config.model.depths=(2,2)` works on the locked config; of the isotropic ViT's size fields
  only patch_size (the stem stride) is a CSWin field."""
  return common.family_model_overrides(
      dict(embed_dim=int, depths=tuple, num_heads=tuple, split_size=tuple, mlp_ratio=float,
           dwconv_impl=str),
      drop=("width", "depth", "mlp_dim", "num_heads", "attn_impl"), **fields)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, imagenet=False)
  c = common.base_config()
  c.model_name = "cswin_tiny_224"
  c.model = model_overrides(patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(2, 4),
                            split_size=(2, 7))
  common.fashion_mnist_recipe(c)
  if arg.imagenet:
    c.model = model_overrides(drop_path=0.2)
    common.imagenet_recipe(c, lr=2e-3, batch_size=2048, warmup_epochs=20, min_lr=1e-5,
                           grad_clip_norm=0.0)
  if arg.runlocal:
    common.runlocal(c)
  return c
