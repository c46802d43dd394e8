"""Classifies image files with a checkpoint: `python -m vitjax.predict`.

    python -m vitjax.predict --checkpoint=DIR [--model=NAME] [--labels=FILE] [--top=5] IMAGE...

DIR is a training run's workdir (its latest checkpoint) or a directory written by `python -m
vitjax.convert`. The model and its overrides (width, depth, ...) are what DIR records: the run's
config.json, or the converter's meta. --model is needed only when DIR records none (parameter
checkpoints saved by hand with an empty meta).

Class names, first found of: --labels=FILE (one name per line; its line count must equal the head's
classes), the run's dataset.json (the dataset's ClassLabel names, e.g. an image folder's class folder
names), ImageNet-1k's names for a 1000-class head (shipped in vitjax/data/imagenet_classes.txt), else
'class <i>'.

Preprocessing is the model's own:
  * a vitjax run: what its pipeline does at eval time (vitjax/data/preprocess.py): the whole image
    resized to data.image_size (antialiased bilinear), converted to the run's channels, scaled to
    [-1, 1];
  * converted timm weights: timm's eval transform recorded in the meta (`preprocess`: resize to
    image_size / crop_pct, centre crop, mean/std of the pretrained config);
  * other parameter checkpoints (big_vision): the vitjax pipeline at the meta's image_size, whose
    [-1, 1] scaling is big_vision's.
LookupViT runs predict at their headline eval setting (the largest of config.eval_grids).

For each image, prints its path and the top classes with their probabilities, to stdout.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from vitjax import main as vmain

BATCH = 16  # images per forward pass


def open_images(paths: Sequence[str]) -> list[Image.Image]:
  """Decodes every path; one error listing each path that is missing or not an image."""
  if not paths:
    raise ValueError("No IMAGE given; expected one or more image files (JPEG, PNG, WebP, ...) "
                     "after the options")
  images, bad = [], []
  for path in paths:
    try:
      with Image.open(path) as img:
        img.load()
        images.append(img.copy())
    except FileNotFoundError:
      bad.append(f"{path!r} does not exist")
    except IsADirectoryError:
      bad.append(f"{path!r} is a directory")
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many types for bad files)
      bad.append(f"{path!r} is not an image PIL can read ({type(e).__name__}: {e})")
  if bad:
    raise ValueError(f"IMAGE: {len(bad)} of {len(paths)} files cannot be classified: "
                     + "; ".join(bad) + ". Expected image files (JPEG, PNG, WebP, ...)")
  return images


@dataclasses.dataclass
class Predictor:
  """A model with its variables, apply kwargs, preprocessing and class names."""
  model: Any
  variables: dict
  apply_kwargs: dict
  transform: Callable[[Image.Image], np.ndarray]  # PIL image -> float32 (S, S, C)
  class_names: tuple[str, ...]
  description: str                                # what was loaded, for the console

  def __call__(self, images: Sequence[Image.Image], top: int = 5) -> list[list[tuple[int, float]]]:
    """Per image, the `top` (class index, probability) pairs, most probable first."""
    import jax  # pylint: disable=g-import-not-at-top
    apply = jax.jit(lambda v, x: jax.nn.softmax(
        self.model.apply(v, x, train=False, **self.apply_kwargs), axis=-1))
    out = []
    for i in range(0, len(images), BATCH):
      x = np.stack([self.transform(im) for im in images[i:i + BATCH]])
      probs = np.asarray(apply(self.variables, x))
      for p in probs:
        order = np.argsort(-p, kind="stable")[:top]
        out.append([(int(c), float(p[c])) for c in order])
    return out


def _vitjax_transform(image_size: int, channels: int):
  from vitjax.data import preprocess  # pylint: disable=g-import-not-at-top

  def transform(image: Image.Image) -> np.ndarray:
    # As the pipeline: grey files decode to one channel, others to RGB; preprocess_batch converts.
    image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
    x = np.asarray(image, np.uint8)
    x = x[..., None] if x.ndim == 2 else x
    return preprocess.preprocess_batch(x[None], image_size=image_size, channels=channels,
                                       augment=False)[0]
  return transform


def _timm_transform(image_size: int, settings: dict):
  from vitjax.data import preprocess  # pylint: disable=g-import-not-at-top
  keys = ("crop_pct", "crop_mode", "interpolation", "mean", "std")

  def transform(image: Image.Image) -> np.ndarray:
    # timm's dataset loader converts every image to RGB before its transform.
    return preprocess.center_crop_eval(image.convert("RGB"), image_size,
                                       **{k: settings[k] for k in keys if k in settings})
  return transform


def load(checkpoint_dir: str, *, model_name: str | None = None, labels: str | None = None
         ) -> Predictor:
  """Reads DIR and builds what `Predictor` needs (see the module doc); clear errors otherwise."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitjax import evaluate  # pylint: disable=g-import-not-at-top
  from vitjax.configs import common  # pylint: disable=g-import-not-at-top
  from vitjax.data import pretrained  # pylint: disable=g-import-not-at-top
  from vitjax.models import create_model  # pylint: disable=g-import-not-at-top
  from vitjax.models import schedules  # pylint: disable=g-import-not-at-top
  variables, record = checkpoint.read_for_inference(checkpoint_dir)
  rec = evaluate.recorded(variables, record)
  name = evaluate.check_model_name(rec, model_name, "--model")
  if rec.num_classes is None:
    raise ValueError(f"--checkpoint={rec.path!r} has no classifier head (params['head']); "
                     "predict needs a model with one")
  model = create_model(name, num_classes=rec.num_classes, **rec.overrides)
  config = rec.config
  if config is None:
    config = common.base_config()
    config.model_name = name
  apply_schedule = schedules.for_model(model, config)
  kwargs = dict(apply_schedule.evals())[apply_schedule.headline]
  init_kwargs = apply_schedule.init_kwargs()

  if rec.kind == "run":
    size = int(config.data.image_size)
    shape = (rec.dataset or {}).get("image_shape")
    channels = int(shape[-1]) if shape else int(config.data.channels) or _channels(
        model, variables, size, init_kwargs)
    transform = _vitjax_transform(size, channels)
    how = f"vitjax pipeline at {size}x{size}x{channels}"
  else:
    settings = rec.meta.get("preprocess")
    sizes = [int(rec.meta.get("image_size", [0])[0])]
    if settings:  # timm: its pretrained size if the weights take it, else the converted size
      sizes = [int(settings["input_size"][0])] * ("input_size" in settings) + sizes
    # timm models take RGB; other parameter checkpoints may have been made for grey images.
    shapes = [(s, s, c) for s in sizes if s for c in ((3,) if settings else (3, 1))]
    size, _, channels = next((shape for shape in shapes
                              if _fits(model, variables, shape, init_kwargs)), (0, 0, 0))
    if not size:
      raise ValueError(f"--checkpoint={rec.path!r} does not fit model_name={name!r} "
                       f"{rec.overrides} at any image shape it records ({shapes}); it is a "
                       "checkpoint for another model")
    if settings:
      transform = _timm_transform(size, settings)
      how = (f"timm eval transform at {size}x{size}: crop_pct {settings['crop_pct']}, "
             f"{settings['interpolation']}, mean {settings['mean']}, std {settings['std']}")
    else:
      transform = _vitjax_transform(size, channels)
      how = f"resize to {size}x{size}x{channels}, scaled to [-1, 1]"
  evaluate.check_fits(model, variables, rec, name, (size, size, channels), init_kwargs)

  if labels:
    class_names, source = pretrained.read_labels(labels, rec.num_classes), labels
  elif rec.dataset and len(rec.dataset.get("class_names") or ()) == rec.num_classes:
    class_names, source = tuple(rec.dataset["class_names"]), f"dataset {rec.dataset['name']}"
  elif rec.num_classes == 1000:
    class_names, source = pretrained.imagenet_class_names(), "ImageNet-1k"
  else:
    class_names = tuple(f"class {i}" for i in range(rec.num_classes))
    source = "none recorded (pass --labels=FILE)"
  variables = jax.device_put(variables)
  where = f"step {rec.step}" if rec.step is not None else rec.meta.get("source", "parameters")
  description = (f"{name} ({where}), {rec.num_classes} classes, names: {source}; "
                 f"preprocessing: {how}")
  return Predictor(model, variables, kwargs, transform, class_names, description)


def _fits(model, variables, image_shape, init_kwargs) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    like = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *image_shape)), **init_kwargs),
                          jax.random.key(0))
  except ValueError:
    return False
  return not checkpoint.fit_problems(variables, dict(like))


def _channels(model, variables, size, init_kwargs) -> int:
  """The input channels the weights were made for (an old workdir without dataset.json)."""
  return 1 if _fits(model, variables, (size, size, 1), init_kwargs) else 3


def predict(checkpoint_dir: str, images: Sequence[str], *, model_name: str | None = None,
            labels: str | None = None, top: int = 5) -> list[list[tuple[str, float]]]:
  """Per image path, the `top` (class name, probability) pairs; also what the CLI prints."""
  from vitjax import console  # pylint: disable=g-import-not-at-top
  console.setup()
  if not isinstance(top, int) or top < 1:
    raise ValueError(f"--top={top!r} must be a positive int")
  pil_images = open_images(images)  # bad paths are reported before any model is loaded
  predictor = load(checkpoint_dir, model_name=model_name, labels=labels)
  console.log("%s", predictor.description)
  results = []
  for path, preds in zip(images, predictor(pil_images, top=min(top, len(predictor.class_names)))):
    named = [(predictor.class_names[c], p) for c, p in preds]
    results.append(named)
    print(path)
    for (c, p), (label, _) in zip(preds, named):
      print(f"  {p:7.4f}  {label} ({c})")
  sys.stdout.flush()
  return results


def main(argv):
  from vitjax import console  # pylint: disable=g-import-not-at-top
  console.setup(flags.FLAGS.verbosity)
  if not flags.FLAGS.checkpoint:
    raise app.UsageError("--checkpoint=DIR is required: a training run's workdir or a "
                         "`python -m vitjax.convert` output.")
  vmain.cli_errors(predict, flags.FLAGS.checkpoint, argv[1:], model_name=flags.FLAGS.model,
                   labels=flags.FLAGS.labels, top=flags.FLAGS.top)


def run():
  flags.DEFINE_string("checkpoint", None, "A training run's workdir or a vitjax.convert output.")
  flags.DEFINE_string("model", None, "vitjax model name, only for a DIR that records none.")
  flags.DEFINE_string("labels", None, "Class names, one per line (default: what DIR records).")
  flags.DEFINE_integer("top", 5, "How many classes to print per image.")
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
