"""Spectral gating (SpectFormer, Patro et al., 2023; GFNet's global filter): the `spectral_gating` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/spectral_gating.py
    python -m vitjax.main --config=configs/spectral_gating.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="spectral_gating", mixer_kwargs=dict())
