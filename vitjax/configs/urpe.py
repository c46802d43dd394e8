"""URPE: universal relative positional encoding (Luo et al., NeurIPS 2022): the `urpe` mixer in the small Fashion-MNIST ViT.

Same model, data and budget as `configs/vit.py`; only the token mixer differs.

    python -m vitjax.main --config=configs/urpe.py
    python -m vitjax.main --config=configs/urpe.py:runlocal
"""
from vitjax.configs import vit


def get_config(arg=None):
  return vit.get_config(arg, mixer="urpe", mixer_kwargs=dict(rpe="2d"))
