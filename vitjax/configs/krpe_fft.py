"""Kernelized attention with RPE via FFT (Luo et al., NeurIPS 2021): the `krpe_fft` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/krpe_fft.py
    python -m vitjax.main --config=configs/krpe_fft.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="krpe_fft", mixer_kwargs=dict(rpe="2d", num_features=16))
