"""Multi-dimensional Hyena (Zimerman & Wolf, AISTATS 2024): the `hyena_nd` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/hyena_nd.py
    python -m vitjax.main --config=configs/hyena_nd.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="hyena_nd", mixer_kwargs=dict(order=2))
