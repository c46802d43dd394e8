"""gnConv, recursive gated convolution (HorNet, Rao et al., NeurIPS 2022): the `gnconv` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/gnconv.py
    python -m vitjax.main --config=configs/gnconv.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="gnconv", mixer_kwargs=dict(order=3, variant="gf"))
