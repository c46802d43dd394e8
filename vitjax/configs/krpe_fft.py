"""Kernelized attention with RPE via FFT (Luo et al., NeurIPS 2021): the `krpe_fft` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/krpe_fft.py
    python -m vitjax.main --config=configs/krpe_fft.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  # On a 7x7 token grid the explicit block-Toeplitz product is the faster way to compute the same
  # function (tests/test_krpe.py checks the two agree); toeplitz_impl='fft' pays off from a few
  # thousand tokens on (experiments/attention_scaling/README.md).
  return vit.get_config(arg, mixer="krpe_fft",
                        mixer_kwargs=dict(rpe="2d", num_features=16, toeplitz_impl="dense"))
