"""Gaussian-mixture mask attention (Li & Zhang, 2023, "RetNet viewed through convolution"): the `gmm_mask` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/gmm_mask.py
    python -m vitjax.main --config=configs/gmm_mask.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="gmm_mask", mixer_kwargs=dict(num_kernels=5))
