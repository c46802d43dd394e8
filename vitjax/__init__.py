"""vitjax: Vision Transformer variants in JAX/Flax, with LookupViT as the flagship.

    import vitjax, jax, jax.numpy as jnp
    model = vitjax.create_model("vit_s16", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
    vitjax.list_models("lookupvit*")
"""
__version__ = "0.1.0"

from vitjax.models import create_model, list_mixers, list_models  # noqa: E402,F401
