"""The optimizer: AdamW with linear warmup and cosine decay, gradient clipping, no decay on 1-D params."""
from __future__ import annotations

import jax
import optax


def lr_schedule(config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1),
      end_value=config.lr * config.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices and conv kernels only: not on biases, norm scales, positions or CLS."""
  return jax.tree.map(lambda p: p.ndim > 1 and p.size != p.shape[-1], params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = lr_schedule(config)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b2=config.b2, weight_decay=config.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
