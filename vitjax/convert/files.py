"""Reading checkpoint files into flat state dicts (name -> array), one reader per file type.

  * .pth / .pt / .bin / .pth.tar / .tar : `torch.load(..., map_location='cpu', weights_only=True)`
    (torch needed); a training checkpoint that wraps the weights under 'state_dict', 'model' or
    'module' is unwrapped, and the 'module.' prefix of DistributedDataParallel, when every key has
    it, is dropped;
  * .safetensors      : the `safetensors` package (its torch reader when torch is installed, so
    bfloat16 files load too);
  * .npz              : numpy, for big_vision / vit_jax checkpoints.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".tar")  # .tar: the .pth.tar of many released checkpoints
EXTENSIONS = TORCH_EXTENSIONS + (".safetensors", ".npz")
_WRAPPERS = ("state_dict", "model", "module", "model_ema")


def _load_torch(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"Reading {path!r} needs PyTorch (pip install torch): {e}") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  for key in _WRAPPERS:  # training checkpoints nest the weights one level down.
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
  state = {k: v for k, v in state.items() if hasattr(v, "shape")}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def _load_safetensors(path: str) -> dict[str, Any]:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(f"Reading {path!r} needs the safetensors package "
                       f"(pip install safetensors): {e}") from e
  return dict(load_file(path))


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def load_state_dict(path: str) -> dict[str, Any]:
  """A checkpoint file -> flat {name: array or tensor}, chosen by the file's extension."""
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint={path!r} is not a file")
  ext = os.path.splitext(path)[1].lower()
  if ext in TORCH_EXTENSIONS:
    return _load_torch(path)
  if ext == ".safetensors":
    return _load_safetensors(path)
  if ext == ".npz":
    return _load_npz(path)
  raise ValueError(f"checkpoint={path!r} has an unsupported extension {ext!r}. Allowed values: "
                   f"{', '.join(EXTENSIONS)}.")
