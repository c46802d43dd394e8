"""vitjax: Vision Transformer variants in JAX/Flax, with LookupViT as the flagship.

    import vitjax, jax, jax.numpy as jnp
    model = vitjax.create_model("vit_s16", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
    vitjax.list_models("lookupvit*")

    # Stage features (every model): NHWC maps keyed 'stem', 'stage1'.., plus 'pre_logits'.
    logits, out = model.apply(variables, images, train=False, features=True)
    vitjax.feature_info("vit_s16")       # [FeatureInfo(name='stem', channels=384, stride=16), ...]

    # Your own mixer / block / downsampling layer, usable by name:
    @vitjax.register_mixer("my_mixer")
    class MyMixer(nn.Module): ...
"""
__version__ = "0.1.0"

from vitjax.models import create_model, list_mixers, list_models  # noqa: E402,F401
from vitjax.models.backbone import FeatureInfo  # noqa: E402,F401
from vitjax.models.registry import (register_block, register_downsample,  # noqa: E402,F401
                                    register_mixer, register_model)


def feature_info(name: str, **overrides) -> list[FeatureInfo]:
  """Per feature map of `create_model(name, **overrides)`: its key in the `out` dict of
  `apply(..., features=True)`, its channels and its stride relative to the input image."""
  return create_model(name, **overrides).feature_info()
