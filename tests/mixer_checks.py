"""A shared check for every token mixer: it trains inside a tiny ViT (finite logits and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import create_model, list_mixers


def tiny_vit_block_grads(mixer: str, **overrides):
  """Gradients of a cross-entropy loss for a 2-block vit_nano4 using `mixer`, first block's subtree.

  Checks the logits' shape and that logits and every gradient are finite; the caller checks that the
  mixer's own parameters receive a non-zero gradient.
  """
  assert mixer in list_mixers()
  model = create_model("vit_nano4", mixer=mixer, num_classes=10, depth=2, head_zero_init=False,
                       **overrides)
  images = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 1)), jnp.float32)
  labels = jnp.array([3, 5])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

  def loss(params):
    logits = model.apply({"params": params}, images)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
    return jnp.mean(nll), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits))) and np.isfinite(value)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  return grads["Transformer"]["encoderblock_0"]
