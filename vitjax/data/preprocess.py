"""Batch-level image preprocessing in numpy: decode, grey<->RGB, resize, crop/flip, scale to [-1, 1].

Everything here works on whole batches of uint8/float32 NHWC arrays so the per-example Python cost
stays at one PNG/JPEG decode. None of it touches JAX: the data pipeline runs on host threads and
must not compete with the model for the accelerator.

The resize is the separable triangle (bilinear) filter with half-pixel centres. When downsampling
the triangle is widened by the inverse scale, which makes it an antialiasing (area-weighted) filter;
this is the same definition as `jax.image.resize(method='linear', antialias=True)` and PIL's
BILINEAR, and the tests compare against the former.

The pad-4 random crop + horizontal flip is the CIFAR augmentation of He et al., "Deep Residual
Learning for Image Recognition" (CVPR 2016), §4.2.
"""
from __future__ import annotations

import functools
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones PIL's 'RGB' -> 'L' conversion uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)
# Padding of the random-crop augmentation, in pixels on each side.
CROP_PAD = 4


def decode_image(data: bytes | np.ndarray, channels: int) -> np.ndarray:
  """Decodes one encoded image (PNG/JPEG/...) to uint8 (H, W, channels).

  Palette, alpha and 16-bit images are converted by PIL rather than read as raw indices, so the result
  always holds intensities. An ndarray (a dataset storing raw tensors) is passed through.
  """
  if isinstance(data, np.ndarray):
    return data if data.ndim == 3 else data[..., None]
  with Image.open(io.BytesIO(data)) as img:
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
      img = img.convert(mode)
    arr = np.asarray(img, dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size, in_size) matrix of the 1-D antialiased bilinear resize.

  Output pixel i has its centre at input coordinate x_i = (i + 0.5) * in/out - 0.5. Its weights are the
  triangle max(0, 1 - |x_i - j| / s) over input pixels j, where s = max(in/out, 1) widens the triangle
  only when downsampling (low-pass before subsampling), normalised to sum to one.
  """
  inv_scale = in_size / out_size
  kernel_scale = max(inv_scale, 1.0)
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * inv_scale - 0.5  # (out,)
  dist = np.abs(centres[:, None] - np.arange(in_size, dtype=np.float64)[None, :])  # (out, in)
  weights = np.maximum(0.0, 1.0 - dist / kernel_scale)
  weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
  weights.setflags(write=False)  # cached and shared between threads
  return weights


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Antialiased bilinear resize of a batch (B, H, W, C) -> float32 (B, S_h, S_w, C).

  Separable: one matmul per axis (BLAS, releases the GIL), so a whole batch costs two GEMMs.
  """
  b, h, w, c = images.shape
  out_h, out_w = size
  x = images.astype(np.float32, copy=False)
  if h != out_h:
    # x'[b, s, w, c] = sum_h R[s, h] x[b, h, w, c], as one GEMM per example.
    x = np.matmul(resize_matrix(h, out_h), x.reshape(b, h, w * c)).reshape(b, out_h, w, c)
  if w != out_w:
    # x'[b, s, t, c] = sum_w C[t, w] x[b, s, w, c], with (b, s) folded into the batch of GEMMs.
    x = np.matmul(resize_matrix(w, out_w), x.reshape(b * out_h, w, c)).reshape(b, out_h, out_w, c)
  return x


def to_grey(images: np.ndarray) -> np.ndarray:
  """RGB -> luma, float32 (B, H, W, 3) -> (B, H, W, 1)."""
  return np.einsum("bhwc,c->bhw", images.astype(np.float32, copy=False), LUMA_WEIGHTS)[..., None]


def random_crop_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pads each side by CROP_PAD with black, takes a random crop of the original size, flips half.

  Vectorised over the batch: a strided view lists every possible crop window, one gather picks each
  example's window (a block copy, not per-pixel indexing), and one `where` applies the flips.
  """
  b, h, w, _ = images.shape
  p = CROP_PAD
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # (B, H+2p, W+2p, C), black border
  dy = rng.integers(0, 2 * p + 1, size=b)
  dx = rng.integers(0, 2 * p + 1, size=b)
  flip = rng.random(b) < 0.5
  # Every crop of every example as a view: (B, 2p+1, 2p+1, C, H, W).
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
  crops = windows[np.arange(b), dy, dx]  # (B, C, H, W)
  crops = np.where(flip[:, None, None, None], crops[..., ::-1], crops)
  return crops.transpose(0, 2, 3, 1)  # (B, H, W, C)


def preprocess_batch(images: Sequence[np.ndarray] | np.ndarray, *, image_size: int, channels: int,
                     augment: bool, rng: np.random.Generator | None = None) -> np.ndarray:
  """Decoded uint8 images -> float32 (B, S, S, C) in [-1, 1].

  Args:
    images: a uint8 batch (B, H, W, C) or a list of uint8 (H_i, W_i, C) of differing sizes.
    image_size: output side S; images already S x S are not resampled.
    channels: 0 keeps the input channel count, 1 or 3 converts grey <-> RGB.
    augment: apply the random crop + flip (training only).
    rng: the generator for the augmentation.

  Returns:
    float32 (B, S, S, C).
  """
  size = (image_size, image_size)
  same_shape = isinstance(images, np.ndarray) or len({im.shape for im in images}) == 1
  if same_shape:
    x = np.asarray(images) if not isinstance(images, np.ndarray) else images
    # Channel mixing and resizing are both linear and commute, so reduce RGB -> grey first (3x less
    # resize work) and expand grey -> RGB last.
    if channels == 1 and x.shape[-1] == 3:
      x = to_grey(x)
    x = resize(x, size) if x.shape[1:3] != size else x.astype(np.float32)
  else:
    per_example = []
    for im in images:
      im = im[None]
      if channels == 1 and im.shape[-1] == 3:
        im = to_grey(im)
      per_example.append(resize(im, size) if im.shape[1:3] != size else im.astype(np.float32))
    x = np.concatenate(per_example, axis=0)
  if augment:
    if rng is None:
      raise ValueError("preprocess_batch(augment=True) needs an rng.")
    x = random_crop_flip(x, rng)
  x = x * np.float32(1.0 / 127.5) - np.float32(1.0)  # [0, 255] -> [-1, 1]
  if channels == 3 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


# PIL filters by the names timm's pretrained configs use.
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def center_crop_eval(image: Image.Image, image_size: int, *, crop_pct: float = 1.0,
                     crop_mode: str = "center", interpolation: str = "bicubic",
                     mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> np.ndarray:
  """timm's eval transform of one PIL image -> float32 (S, S, C), written without torch.

  Step by step what `timm.data.create_transform(is_training=False)` does on a PIL image: resize to
  floor(S / crop_pct) (the shorter side, keeping the aspect ratio, for crop_mode 'center'; both
  sides for 'squash') with PIL's filter, crop the centre S x S (torchvision's rounding), scale to
  [0, 1] and normalise with mean/std. Using the same PIL resize as torchvision keeps predictions of
  converted timm weights the same as timm's on the same files.
  """
  if crop_mode not in ("center", "squash"):
    raise ValueError(f"Unknown crop_mode={crop_mode!r}. Allowed values: center, squash.")
  if interpolation not in PIL_FILTERS:
    raise ValueError(f"Unknown interpolation={interpolation!r}. Allowed values: "
                     f"{', '.join(PIL_FILTERS)}.")
  scale = math.floor(image_size / crop_pct)
  w, h = image.size
  if crop_mode == "squash":
    new_w, new_h = scale, scale
  elif w <= h:  # torchvision's Resize(int): the shorter side becomes `scale`
    new_w, new_h = scale, int(scale * h / w)
  else:
    new_w, new_h = int(scale * w / h), scale
  image = image.resize((new_w, new_h), PIL_FILTERS[interpolation])
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  image = image.crop((left, top, left + image_size, top + image_size))
  x = np.asarray(image, np.float32) / np.float32(255.0)
  x = x[..., None] if x.ndim == 2 else x
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
